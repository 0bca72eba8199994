"""netmoe: dynamic sample placement for Mixture-of-Experts training.

Subpackages: ``netmoe.solver`` (cost model and placement optimization, numpy + OR-Tools),
``netmoe.server`` (gRPC solver service), ``netmoe.client`` (torch client), ``netmoe.protos``
(generated gRPC contract), ``netmoe.reference`` (the reference MoE the demo trains),
``netmoe.cluster`` (the emulated multi-node cluster) and ``netmoe.bench`` (benchmarks).
"""

__version__ = "0.1.0"
