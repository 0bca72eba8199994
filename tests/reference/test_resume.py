"""A training run saving a checkpoint every K steps and interrupted goes on from its last saved
state, and ends with the checkpoint an uninterrupted run writes."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netmoe.app.reference.data import load_corpus
from netmoe.app.reference.launch import run_ranks
from netmoe.app.reference.train import TrainConfig, resume_path

from support import TINY_TRAIN

STEPS, EVERY = 60, 5


def _config(tmp_path: Path, name: str) -> TrainConfig:
    return TrainConfig(**{**TINY_TRAIN, "steps": STEPS}, nodes=1, gpus_per_node=1,
                       experts_per_device=4, cache_dir=str(tmp_path),
                       save_checkpoint=str(tmp_path / f"{name}.pt"), checkpoint_every=EVERY)


def test_an_interrupted_run_goes_on_from_its_last_saved_state(tmp_path: Path) -> None:
    import torch

    load_corpus(TINY_TRAIN["vocab"], tmp_path)
    whole = run_ranks(_config(tmp_path, "whole"))
    assert whole[0].first_step == 0 and not Path(resume_path(str(tmp_path / "whole.pt"))
                                                    ).exists()
    cfg = _config(tmp_path, "cut")
    saved = Path(resume_path(cfg.save_checkpoint))
    code = ("import json, sys\nfrom netmoe.app.reference.launch import run_ranks\n"
            "from netmoe.app.reference.train import TrainConfig\n"
            "run_ranks(TrainConfig.from_dict(json.loads(sys.argv[1])))")
    launcher = subprocess.Popen([sys.executable, "-c", code, json.dumps(dataclasses.asdict(cfg))],
                                start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not saved.exists() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert saved.exists(), "no state saved"
        os.killpg(launcher.pid, signal.SIGINT)  # Ctrl-C in the launcher's terminal
        assert launcher.wait(60) != 0
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert not Path(cfg.save_checkpoint).exists()
    cut_at = torch.load(saved, weights_only=True)["step"]
    assert cut_at % EVERY == 0 and 0 < cut_at < STEPS
    again = run_ranks(cfg)
    assert again[0].first_step == cut_at
    assert again[0].loss == whole[0].loss[cut_at:]
    assert not saved.exists()
    want = torch.load(tmp_path / "whole.pt", weights_only=True)
    got = torch.load(cfg.save_checkpoint, weights_only=True)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_saved_state_of_another_configuration_is_refused(tmp_path: Path) -> None:
    import torch

    load_corpus(TINY_TRAIN["vocab"], tmp_path)
    cfg = _config(tmp_path, "a")
    other = {**dataclasses.asdict(cfg), "lr": cfg.lr / 2}
    torch.save({"model": {}, "opt": {}, "step": EVERY, "config": other},
               resume_path(cfg.save_checkpoint))
    with pytest.raises(RuntimeError, match=r"a\.pt\.resume was saved by a run with other lr; "
                                           r"delete it to start over"):
        run_ranks(cfg)
