"""netmoe's reference MoE: model, corpus, trainer and launcher (what the demo and benches train).

Nothing here is needed by a training job that uses netmoe: a job imports ``netmoe.client``.
"""
