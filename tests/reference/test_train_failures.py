"""Failures a containerised trainer meets: an unwritable HOME cache and an error raised before
the placement client exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from netmoe.app.reference.data import build_corpus, default_cache_dir, load_corpus
from netmoe.app.reference.launch import free_port
from netmoe.app.reference.train import TrainConfig, train

from support import TINY_TRAIN


def test_corpus_loads_uncached_when_the_default_cache_cannot_be_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`user: "10001:10001"` in compose: no passwd entry, HOME=/, so ~/.cache is /.cache, which
    that uid cannot create (tests/docker/test_engine.py runs exactly that). Here HOME is a
    regular file, which fails the same mkdir for root too. The job trains uncached."""
    home = tmp_path / "home"
    home.write_text("")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("NETMOE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == home / ".cache" / "netmoe"
    corpus = load_corpus(512)
    assert corpus.vocab == build_corpus(512).vocab
    assert f"corpus cache {home}/.cache/netmoe is not writable" in caplog.text
    assert "NETMOE_CACHE" in caplog.text


def test_failure_before_the_client_exists_raises_itself_and_destroys_the_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.distributed as dist

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    missing = tmp_path / "missing.pt"
    cfg = TrainConfig(**{**TINY_TRAIN, "nodes": 1, "gpus_per_node": 1, "placement": "service",
                         "server": "127.0.0.1:1", "cache_dir": str(tmp_path),
                         "init_checkpoint": str(missing)})
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        train(cfg)  # fails loading the checkpoint, before the client is created
    assert not dist.is_initialized()
