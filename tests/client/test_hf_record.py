"""`netmoe record` and HFRecorder on tiny randomly initialised transformers MoE models.

One model per supported family is built from its config (nothing downloaded), saved to a
temporary directory and recorded through the CLI; the expected ids are collected separately,
by calling each MoE layer's router on the hidden states its MoE block received.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from netmoe.app.cli import main  # noqa: E402
from netmoe.client.hf_recorder import FAMILIES, HFRecorder  # noqa: E402
from netmoe.trace import load_trace  # noqa: E402

VOCAB, SEQ, EXPERTS = 96, 16, 8
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2)

# model_type -> (config, MoE layer indices the config implies)
CONFIGS = {
    "mixtral": (lambda: transformers.MixtralConfig(**SMALL, num_hidden_layers=2,
                                                   num_local_experts=EXPERTS), [0, 1]),
    "qwen2_moe": (lambda: transformers.Qwen2MoeConfig(
        **SMALL, num_hidden_layers=3, num_experts=EXPERTS, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, mlp_only_layers=[1]), [0, 2]),
    "qwen3_moe": (lambda: transformers.Qwen3MoeConfig(
        **SMALL, num_hidden_layers=3, num_experts=EXPERTS, moe_intermediate_size=16,
        head_dim=8, mlp_only_layers=[0]), [1, 2]),
    "olmoe": (lambda: transformers.OlmoeConfig(**SMALL, num_hidden_layers=2,
                                               num_experts=EXPERTS), [0, 1]),
    "deepseek_v3": (lambda: transformers.DeepseekV3Config(
        **(SMALL | {"num_key_value_heads": 4}), num_hidden_layers=3, first_k_dense_replace=1,
        n_routed_experts=EXPERTS, moe_intermediate_size=16, n_shared_experts=1, n_group=2,
        topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8), [1, 2]),
    "gpt_oss": (lambda: transformers.GptOssConfig(**SMALL, num_hidden_layers=2, head_dim=8,
                                                  num_local_experts=EXPERTS,
                                                  sliding_window=8), [0, 1]),
}


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[model_type][0]()
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    fam = FAMILIES[model_type]
    for layer in model.model.layers:
        router = getattr(layer.mlp, fam.attr, None)
        if type(router).__name__ == fam.router:
            # Some families initialise routers to zero: every token would tie on experts 0, 1.
            torch.nn.init.normal_(router.weight, std=1.0)
    return model


def expected_ids(model: torch.nn.Module, layers: list[int], ids: np.ndarray,
                 mask: np.ndarray, batch: int) -> np.ndarray:
    """[L, T, K]: each router applied by hand to its MoE block's input, padding rows dropped."""
    fam = FAMILIES[model.config.model_type]
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    handles = [
        model.model.layers[i].mlp.register_forward_pre_hook(
            lambda _m, args, i=i: seen[i].append(args[0].detach()))
        for i in layers
    ]
    with torch.no_grad():
        for first in range(0, ids.shape[0], batch):
            model(input_ids=torch.from_numpy(ids[first : first + batch]),
                  attention_mask=torch.from_numpy(mask[first : first + batch]), use_cache=False)
        for h in handles:
            h.remove()
        out = []
        for i in layers:
            router = getattr(model.model.layers[i].mlp, fam.attr)
            rows = [router(hs.reshape(-1, hs.shape[-1]))[2] for hs in seen[i]]
            out.append(torch.cat(rows).numpy())
    return np.stack(out)[:, mask.reshape(-1) == 1]


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_record_every_family(model_type: str, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path / "model")
    stream = np.random.default_rng(1).integers(0, VOCAB, 7 * SEQ + 5)  # 8 samples, last padded
    np.save(tmp_path / "ids.npy", stream)
    out = tmp_path / "trace.npz"
    assert main(["record", "--hf-model", str(tmp_path / "model"), "--token-ids",
                 str(tmp_path / "ids.npy"), "--seq-length", str(SEQ), "--batch-size", "3",
                 "--out", str(out)]) == 0
    assert f"wrote {out}: {model_type}" in capsys.readouterr().out

    trace = load_trace(out)
    layers = CONFIGS[model_type][1]
    assert trace.model_type == model_type and trace.num_experts == EXPERTS
    assert list(trace.layer_ids) == layers  # dense layers absent
    ids = np.zeros(8 * SEQ, dtype=np.int64)
    ids[: stream.size] = stream
    mask = (np.arange(8 * SEQ) < stream.size).astype(np.int64)
    want = expected_ids(model, layers, ids.reshape(8, SEQ), mask.reshape(8, SEQ), batch=3)
    np.testing.assert_array_equal(trace.topk_ids, want)
    assert len(np.unique(want)) > 2  # routing is not degenerate
    # Padding excluded: the last sample has its 5 real tokens only.
    assert trace.tokens == stream.size
    np.testing.assert_array_equal(np.bincount(trace.sample_ids), [SEQ] * 7 + [5])

    assert main(["evaluate", "--trace", str(out), "--nodes", "2", "--gpus-per-node", "2",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert (rep["samples"], rep["experts"], len(rep["pairs"])) == (8, EXPERTS, 1)


def test_text_and_api(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--text tokenizes with the checkpoint's tokenizer; the API records the same ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(VOCAB - 2)]
    vocab = {"[PAD]": 0, "[UNK]": 1} | {w: i + 2 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                                pad_token="[PAD]")
    model = tiny_model("mixtral", seed=3)
    model.save_pretrained(tmp_path / "model")
    fast.save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(2)
    text = " ".join(rng.choice(words, 3 * SEQ))
    (tmp_path / "t.txt").write_text(text)
    out = tmp_path / "text.npz"
    assert main(["record", "--hf-model", str(tmp_path / "model"), "--text",
                 str(tmp_path / "t.txt"), "--seq-length", str(SEQ), "--samples", "2",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    got = load_trace(out)

    ids = torch.tensor([vocab[w] for w in text.split()][: 2 * SEQ]).reshape(2, SEQ)
    recorder = HFRecorder(model)
    recorder.record(ids)  # default batch size 8 > 2: one forward, like the CLI
    api = recorder.trace()
    np.testing.assert_array_equal(got.topk_ids, api.topk_ids)
    np.testing.assert_array_equal(got.sample_ids, api.sample_ids)


def test_capture_keeps_one_call_per_router(tmp_path: Path) -> None:
    """Inside capture() a router that runs twice (e.g. a recompute) is recorded once."""
    model = tiny_model("olmoe")
    ids = torch.from_numpy(np.random.default_rng(4).integers(0, VOCAB, (2, SEQ)))
    mask = torch.ones_like(ids)
    recorder = HFRecorder(model)
    with torch.no_grad(), recorder.capture(mask):
        model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids, attention_mask=mask)
    assert recorder.trace().tokens == 2 * SEQ
    with pytest.raises(ValueError, match="attention_mask must be"), recorder.capture(mask[:1]):
        model(input_ids=ids, attention_mask=mask)


def test_unsupported_and_missing_models(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=4
                             ).save_pretrained(tmp_path / "llama")
    np.save(tmp_path / "ids.npy", np.arange(SEQ))
    args = ["--token-ids", str(tmp_path / "ids.npy"), "--seq-length", str(SEQ), "--out",
            str(tmp_path / "x.npz")]
    assert main(["record", "--hf-model", str(tmp_path / "llama"), *args]) == 2
    err = capsys.readouterr().err
    assert "model_type 'llama' is not a supported MoE family; supported: deepseek_v3, gpt_oss, " \
        "mixtral, olmoe, qwen2_moe, qwen3_moe" in err
    assert main(["record", "--hf-model", str(tmp_path / "nowhere"), *args]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["record", "--hf-model", str(tmp_path / "empty"), *args]) == 2
    assert "no readable transformers config (local files only)" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def _record_rank(rank: int, port: int, out: str) -> None:
    """One data-parallel rank of a training job: 2 steps of 2 micro-batches of 2 samples, each
    rank its own data; save() gathers both ranks' routing on rank 0."""
    from support import gloo_group

    with gloo_group(rank, 2, port):
        model = tiny_model("mixtral", seed=5)
        recorder = HFRecorder(model, dp_rank=rank)
        rng = np.random.default_rng(10 + rank)
        for step in (3, 8):
            recorder.advance_step(step)
            for _ in range(2):
                recorder.record(torch.from_numpy(rng.integers(0, VOCAB, (2, SEQ))))
        recorder.save(out)


def test_data_parallel_recording_carries_rounds(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from support import spawn_ranks

    out = tmp_path / "dp.npz"
    spawn_ranks(_record_rank, 2, str(out), timeout=300)
    got = load_trace(out)
    assert got.has_rounds and np.unique(got.sample_ids).size == 16
    per_sample = [f[::SEQ] for f in (got.step_ids, got.micro_batch_ids, got.dp_ranks)]
    # Rank 0's samples, then rank 1's; each rank: steps 3 and 8, micro-batches 0 and 1 of 2
    # samples each.
    assert per_sample[0].tolist() == ([3] * 4 + [8] * 4) * 2
    assert per_sample[1].tolist() == [0, 0, 1, 1] * 4
    assert per_sample[2].tolist() == [0] * 8 + [1] * 8
    # The same routing, recorded again in one process, rank by rank.
    model = tiny_model("mixtral", seed=5)
    for rank in range(2):
        rng = np.random.default_rng(10 + rank)
        for k in range(4):
            ids = torch.from_numpy(rng.integers(0, VOCAB, (2, SEQ)))
            want = HFRecorder(model)
            want.record(ids)
            first = (rank * 4 + k) * 2 * SEQ
            np.testing.assert_array_equal(got.topk_ids[:, first : first + 2 * SEQ],
                                          want.trace().topk_ids)
    assert main(["evaluate", "--trace", str(out), "--nodes", "2", "--gpus-per-node", "1",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["micro_batch_size"] == 2
    assert [(r["step"], r["micro_batch"]) for r in rep["rounds"]] == [(3, 0), (3, 1), (8, 0),
                                                                     (8, 1)]
    assert rep["rounds"][0]["samples"] == [0, 1, 8, 9]  # rank 0's pair, then rank 1's


def test_recorder_round_arguments_are_checked() -> None:
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="dp_rank must be a non-negative integer or None, got -1"):
        HFRecorder(model, dp_rank=-1)
    with pytest.raises(ValueError, match="step must be a non-negative integer, got 'x'"):
        HFRecorder(model, dp_rank=0).advance_step("x")  # type: ignore[arg-type]
