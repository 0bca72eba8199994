"""Runs several reference test modules compare with, trained once per session."""

from __future__ import annotations

import pytest

from netmoe.app.reference.data import load_corpus
from netmoe.app.reference.launch import run_ranks
from netmoe.app.reference.results import RankResult
from netmoe.app.reference.train import TrainConfig

from support import TINY_TRAIN


@pytest.fixture(scope="session")
def two_groups(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, list[RankResult]]:
    """8 ranks on 4 nodes x 2 as two EP groups of 4, home placement, two steps (parameters
    whose gradient is zero analytically, attention key biases, take Adam steps from float
    summation noise, which grows per step): the config and its results."""
    cache = tmp_path_factory.mktemp("netmoe-cache")
    load_corpus(512, cache)
    cfg = TrainConfig(nodes=4, gpus_per_node=2, ep_size=4, cache_dir=str(cache),  # type: ignore[arg-type]
                      **{**TINY_TRAIN, "steps": 2})
    return cfg, run_ranks(cfg)
