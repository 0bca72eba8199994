"""The netmoe solver service (gRPC, grpc.aio): collects routing reports, answers placements.

Modules: ``rounds`` (data plane, no gRPC), ``servicer`` (proto <-> domain), ``interceptors``,
``metrics`` (Prometheus), ``app`` (server lifecycle, embeddable ``start``), ``cli`` (``netmoe
serve``). Heavy imports stay in those modules so importing this package is cheap.
"""
