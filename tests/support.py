"""Helpers shared by test files of several folders (importable: tests/ is on sys.path)."""

from __future__ import annotations

# The smallest reference-MoE training run worth checking (TrainConfig fields).
TINY_TRAIN = dict(steps=3, samples_per_device=2, seq_len=16, d_model=32, heads=2, layers=2,
                  ffn=32, vocab=512)  # fmt: skip
