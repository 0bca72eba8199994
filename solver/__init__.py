"""Cost model and placement optimization (numpy + OR-Tools; no gRPC, no torch)."""

from netmoe.round import home_placement

from .cost import Traffic, bottleneck_routes, node_loads, traffic
from .plan import METHODS, OBJECTIVES, Plan, solve
from .topology import Topology
from .two_stage import Prices

__all__ = [
    "METHODS",
    "OBJECTIVES",
    "Plan",
    "Prices",
    "Topology",
    "Traffic",
    "bottleneck_routes",
    "home_placement",
    "node_loads",
    "solve",
    "traffic",
]
