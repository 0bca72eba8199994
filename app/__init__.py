"""netmoe's application: the ``netmoe`` command and everything it runs.

``cli`` (the command), ``demo`` (the main job), ``evaluate`` (the what-if on a trace),
``record`` / ``sources`` / ``megatron`` (trace recording and importers), ``bench`` (benchmarks),
``reference`` (the reference MoE the demo trains), ``cluster`` (the emulated multi-node cluster),
``text`` / ``progress`` (terminal output). It imports every other part; nothing imports it.
"""
