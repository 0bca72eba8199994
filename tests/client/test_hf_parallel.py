"""Hugging Face MoE models expert-parallel on real gloo process groups (4 ranks = 2 nodes x 2).

Tiny random models built from configs (4 layers, E = 8, top-2, float64). Every rank also runs
the unsharded model on the whole batch and checks its share against it: the summed loss, the
all-reduced dense gradients, its experts' gradients and the logits of the samples it ends up
holding, for home placement, random plans (every sample moves) and a non-contiguous expert map.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from netmoe.app.cli import main
from netmoe.trace import load_trace

from support import gloo_group, spawn_ranks

WORLD, GPUS, EXPERTS, SAMPLES, SEQ, VOCAB = 4, 2, 8, 2, 8, 96
TYPES = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe")


def tiny_model(model_type: str, experts: int = EXPERTS, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from netmoe.app.reference.hf_demo import tiny_config

    cfg = tiny_config(model_type, vocab=VOCAB, hidden=16, layers=4, experts=experts)
    torch.manual_seed(seed)
    # The default grouped_mm experts kernel has no float64; eager is the model's plain loop.
    return AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").double()


def _batch() -> tuple[torch.Tensor, ...]:
    """Global batch: ids [I, S], right-padded mask [I, S], labels [I, S] (-100 on padding) and
    position ids [I, S] starting at a per-sample offset (as for a continued document)."""
    gen = torch.Generator().manual_seed(3)
    big_i = WORLD * SAMPLES
    ids = torch.randint(0, VOCAB, (big_i, SEQ), generator=gen)
    length = torch.randint(SEQ // 2, SEQ + 1, (big_i,), generator=gen)
    mask = (torch.arange(SEQ)[None] < length[:, None]).long()
    positions = torch.arange(SEQ)[None] + torch.randint(0, 5, (big_i, 1), generator=gen)
    return ids, mask, ids.masked_fill(mask == 0, -100), positions


def _check(model_type: str, rank: int, placement: str, expert_map: list[int] | None) -> None:
    from netmoe.client.hf import parallelize
    from netmoe.client.planning import Placement, RandomPlans

    ids, mask, labels, positions = _batch()
    ref_model = tiny_model(model_type)
    ep_model = copy.deepcopy(ref_model)
    ref = ref_model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels)
    ref.loss.backward()
    assert ref.aux_loss is not None and float(ref.aux_loss) > 0
    hook = None
    if placement == "random":
        # Seed 12: after the 4 layers every rank holds other samples than its own (checked
        # below); RandomPlans draws per (seed, step, micro-batch, layer).
        hook = Placement(RandomPlans(rank, WORLD, SAMPLES, seed=12), rank, WORLD, SAMPLES, 5.0)
    ep = parallelize(ep_model, expert_map=expert_map, placement=hook, gpus_per_node=GPUS)
    mine = slice(rank * SAMPLES, (rank + 1) * SAMPLES)
    out = ep(ids[mine], attention_mask=mask[mine], position_ids=positions[mine],
             labels=labels[mine])
    out.loss.backward()
    loss, aux = ep.all_reduce_gradients(out.loss, out.aux_loss)
    assert abs(float(loss) / float(ref.loss) - 1) < 1e-5, (float(loss), float(ref.loss))
    assert abs(float(aux) / float(ref.aux_loss) - 1) < 1e-5, (float(aux), float(ref.aux_loss))
    holds = out.held_ids.tolist()
    if placement == "random":
        assert any(p.moves for p in out.plans) and hook is not None and hook.stats.fallbacks == 0
        assert holds != list(range(mine.start, mine.stop))
    torch.testing.assert_close(out.logits, ref.logits[holds], rtol=1e-5, atol=1e-8)
    # Labels followed their samples: each held row's labels are its sample's, shifted.
    torch.testing.assert_close(out.labels[:, :-1], labels[holds, 1:])
    assert (out.labels[:, -1] == -100).all()
    ref_grads = dict(ref_model.named_parameters())
    local = ep.local_experts
    for name, p in ep.model.named_parameters():
        want = ref_grads[name].grad
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            want = want[local]
        assert p.grad is not None, name
        err = float((p.grad - want).norm() / want.norm().clamp_min(1e-30))
        assert err < 1e-5, (name, err)


def _param_counts_and_bad_input(model_type: str, rank: int) -> None:
    from netmoe.client.hf import parallelize

    with pytest.raises(ValueError,
                       match="experts=6 is not divisible by the expert-parallel size ep_size=4"):
        parallelize(tiny_model(model_type, experts=6))
    with pytest.raises(ValueError, match=r"expert_map\[1\]=4 names a missing device: devices are "
                       r"0\.\.3"):
        parallelize(tiny_model(model_type), expert_map=[0, 4, 1, 1, 2, 2, 3, 3])
    with pytest.raises(ValueError, match=r"each device 2 experts, got \[3, 1, 2, 2\]"):
        parallelize(tiny_model(model_type), expert_map=[0, 0, 0, 1, 2, 2, 3, 3])
    full = tiny_model(model_type)
    total = sum(p.numel() for p in full.parameters())
    experts = [p for n, p in full.named_parameters() if ".experts." in n]
    expert_total = sum(p.numel() for p in experts)
    ep = parallelize(full, gpus_per_node=GPUS)
    assert sum(p.numel() for p in ep.parameters()) == total - expert_total * (WORLD - 1) // WORLD
    assert all(p.shape[0] == EXPERTS // WORLD for p in ep.expert_parameters())
    assert ep.local_experts == list(range(rank * 2, rank * 2 + 2))


def _worker(rank: int, port: int, runs: list[Any]) -> None:
    with gloo_group(rank, WORLD, port):
        _param_counts_and_bad_input("mixtral", rank)
        for model_type, placement, expert_map in runs:
            try:
                _check(model_type, rank, placement, expert_map)
            except Exception as err:
                raise AssertionError(f"{model_type}, {placement} plans, expert map "
                                     f"{expert_map}") from err


# A non-contiguous map: every rank holds two experts from both halves of the id range.
SCATTERED = [3, 2, 1, 0, 0, 1, 2, 3]


def test_sharded_loss_and_gradients_equal_the_unsharded_model() -> None:
    # One spawn for every family: starting 4 processes that import transformers dominates.
    runs: list[Any] = [(t, p, None) for t in TYPES for p in ("home", "random")]
    runs.append(("mixtral", "random", SCATTERED))
    spawn_ranks(_worker, WORLD, runs, timeout=300)


def test_unsupported_model_type_lists_the_supported_ones() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from netmoe.client.hf import parallelize

    cfg = AutoConfig.for_model("llama", vocab_size=32, hidden_size=16, intermediate_size=16,
                               num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(ValueError, match="model type 'llama' is not supported; supported: "
                       "mixtral, olmoe, qwen2_moe, qwen3_moe"):
        parallelize(AutoModelForCausalLM.from_config(cfg))


def test_demo_trains_a_saved_checkpoint_home_and_with_the_service(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``netmoe demo --hf-model`` on a checkpoint saved by ``write_tiny``: 10 steps home, then 10
    with plans of a real embedded placement service (4 ranks, 2 nodes x 2)."""
    from netmoe.app.reference.hf_demo import write_tiny

    model = write_tiny(tmp_path / "tiny", "qwen3_moe", experts=8)
    args = ["demo", "--hf-model", str(model), "--nodes", "2", "--gpus-per-node", "2", "--steps",
            "10", "--samples-per-device", "2", "--seq-len", "16", "--cache-dir",
            str(tmp_path / "cache"), "--record-trace", str(tmp_path / "home.npz"),
            "--json"]  # fmt: skip
    assert main(args) == 0
    rep = json.loads(capsys.readouterr().out)
    trace = load_trace(tmp_path / "home.npz")
    assert trace.topk_ids.shape == (4, 10 * 8 * 16, 2)
    home, net = rep["home"], rep["netmoe"]
    assert len(home["loss"]) == len(net["loss"]) == 10
    np.testing.assert_allclose(net["loss"], home["loss"], rtol=1e-5)
    assert rep["max_loss_rel_diff"] < 1e-5
    assert net["fallbacks"] == 0, net["fallback_reasons"]
    assert net["moved_per_plan"] > 0
    # Same routes in total (routing does not depend on placement), fewer across nodes.
    total = lambda r: r["inter_routes"] + r["intra_routes"] + r["local_routes"]  # noqa: E731
    assert total(net) == total(home)
    assert net["inter_routes"] < home["inter_routes"], (net["inter_routes"], home["inter_routes"])
    assert rep["config"]["model_type"] == "qwen3_moe" and rep["config"]["layers"] == 4


def test_demo_without_plans_fails_like_the_reference_demo(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service that refuses the job (it wants a token the ranks do not have; its health check
    needs none): both runs train, then exit code 1 and the reference demo's error (every layer
    fell back), not a quiet exit 0."""
    from netmoe.app.reference.hf_demo import write_tiny
    from netmoe.server.app import start
    from netmoe.server.config import ServerConfig

    monkeypatch.delenv("NETMOE_AUTH_TOKEN", raising=False)
    model = write_tiny(tmp_path / "tiny", "qwen3_moe", experts=4)
    with start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=None,
                            auth_token="not-given")) as handle:
        args = ["demo", "--hf-model", str(model), "--nodes", "1", "--gpus-per-node", "2",
                "--steps", "1", "--samples-per-device", "1", "--seq-len", "8", "--cache-dir",
                str(tmp_path / "cache"), "--server", handle.address]  # fmt: skip
        assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"netmoe demo: error: the netmoe run got no plan from the "
                              f"placement service at {handle.address}: all "), err[-3:]


def test_demo_rejects_a_vocabulary_that_does_not_cover_the_demo_ids(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from netmoe.app.reference.hf_demo import tiny_config

    tiny_config("mixtral", vocab=VOCAB, hidden=16).save_pretrained(tmp_path)
    assert main(["demo", "--hf-model", str(tmp_path), "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"netmoe demo: error: {tmp_path} has no tokenizer and its vocab_size={VOCAB} "
                   "does not cover the demo's 2048 token ids: give the checkpoint a tokenizer or "
                   "a vocab_size >= 2048"], err
    assert main(["demo", "--hf-model", str(tmp_path / "missing")]) == 2
    assert "holds no config.json" in capsys.readouterr().err


def test_demo_corpus_is_tokenised_by_the_checkpoint_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from netmoe.app.reference.data import DOMAINS, raw_texts
    from netmoe.app.reference.hf_demo import load_hf_corpus, tiny_config

    words = ["[UNK]", "def", "the", "self", "return", "(", ")", ":", "=", "a", "of", "to", "in"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    tiny_config("mixtral", vocab=VOCAB, hidden=16).save_pretrained(tmp_path)
    corpus = load_hf_corpus(str(tmp_path), VOCAB, str(tmp_path / "cache"))
    want = AutoTokenizer.from_pretrained(tmp_path)(raw_texts()["docs"])["input_ids"]
    assert corpus.streams["docs"].tolist() == want
    assert set(corpus.streams) == set(DOMAINS)
    with pytest.raises(ValueError, match=r"tokenizer gives ids up to 12, beyond its model's "
                       r"vocab_size=10"):
        load_hf_corpus(str(tmp_path), 10, str(tmp_path / "cache"))
