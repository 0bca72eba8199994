"""netmoe: dynamic sample placement for Mixture-of-Experts training.

This folder is the core every part imports (numpy only): ``netmoe.round`` (the round contract),
``netmoe.groups`` (EP groups), ``netmoe.batching`` (a trace's rounds), ``netmoe.trace`` (the trace
format), ``netmoe.checks`` (argument checks). The parts: ``netmoe.solver`` (cost model and
placement optimization, numpy + OR-Tools), ``netmoe.protos`` (the gRPC contract and its one
conversion module), ``netmoe.server`` (the solver service), ``netmoe.client`` (the torch client a
training job imports) and ``netmoe.app`` (the ``netmoe`` command: demo, evaluate, record, bench,
the reference model and the emulated cluster).
"""

__version__ = "0.1.0"
