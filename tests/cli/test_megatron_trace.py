"""Megatron-core router traces: `netmoe evaluate --trace-format megatron` and `netmoe convert`.

Trace directories are written here the way megatron-core's RouterTracer writes them in training
(router_trace.py at commit d98e8a6): the router sees [S/T, B, H] sequence-first hidden states
and flattens them with view(-1, E); the tracer turns the boolean routing map into indices with
nonzero() (ascending experts per row) and writes one json.dumps(record) line per router call,
stamped with the iteration by advance_step(iteration).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from netmoe.cli import main
from netmoe.trace import load_trace, save_trace

FLAME = Path(__file__).parents[1] / "fixtures" / "flame_290m_2048tok_layers2-9.npz"
SEQ = 64  # the fixture cut into 32 samples of 64 tokens
EXPERTS = 64
LAYER_NUMBERS = [1, 2, 3, 5, 6, 7, 9, 10]  # decoder.layers.N of the MoE layers; gaps are dense
STEPS = [10, 11]


@dataclass(frozen=True)
class Run:
    """How the emulated Megatron job was laid out."""

    dp: int
    tp: int = 1
    sp: bool = False
    micro_batches: int = 1
    recompute: tuple[int, ...] = ()  # layers whose router runs again in the backward
    mtp: bool = False

    @property
    def micro_batch_size(self) -> int:
        return 32 // (len(STEPS) * self.dp * self.micro_batches)

    def flags(self) -> list[str]:
        out = ["--trace-format", "megatron", "--seq-length", str(SEQ), "--micro-batch-size",
               str(self.micro_batch_size), "--tensor-parallel", str(self.tp)]
        return out + (["--sequence-parallel"] if self.sp else [])


def by_sample() -> np.ndarray:
    """[L, I, S, K] int64: the fixture, sample-major (sample i = tokens 64 i .. 64 i + 63)."""
    topk = load_trace(FLAME).topk_ids
    return topk.reshape(topk.shape[0], -1, SEQ, topk.shape[2])


def mtp_ids(samples: np.ndarray) -> np.ndarray:
    """Routing of a made-up MTP layer: [I, S, K] (any valid top-k of distinct experts)."""
    return (samples[0] + 1) % EXPERTS


def router_indices(ids: np.ndarray) -> list[list[int]]:
    """[N, K] top-k -> what the tracer writes: nonzero() of the boolean routing map."""
    routing_map = np.zeros((ids.shape[0], EXPERTS), dtype=bool)
    np.put_along_axis(routing_map, ids, True, axis=1)
    _, expert = np.nonzero(routing_map)
    return expert.reshape(ids.shape[0], -1).tolist()


def record(step: int, block: str, layer: int, rank: int, ids: np.ndarray,
           mtp_idx: int | None = None) -> str:
    rec: dict = {"step": step, "stage": "pre_dispatch", "block": block, "layer": layer,
                 "rank": rank, "num_tokens": int(ids.shape[0]), "topk": int(ids.shape[1])}
    if mtp_idx is not None:
        rec["mtp_idx"] = mtp_idx
    rec["top_indices"] = router_indices(ids)
    return json.dumps(rec) + "\n"


def write_megatron(root: Path, run: Run, topk: np.ndarray) -> Path:
    """topk: [L, I, S, K] by sample. Sample ((step * DP + d) * M + m) * B + b is sequence b of
    micro-batch m of data-parallel rank d; global rank d * T + t (tp-cp-ep-dp-pp, PP = CP = 1)."""
    out = root / "trace"
    out.mkdir()
    b, s_local = run.micro_batch_size, SEQ // run.tp if run.sp else SEQ
    for d in range(run.dp):
        for t in range(run.tp):
            rank = d * run.tp + t
            lines = []
            for si, step in enumerate(STEPS):
                for m in range(run.micro_batches):
                    first = ((si * run.dp + d) * run.micro_batches + m) * b

                    def local(block: np.ndarray, first: int = first, t: int = t) -> np.ndarray:
                        seq_first = block[first : first + b].transpose(1, 0, 2)  # [S, B, K]
                        if run.sp:
                            seq_first = seq_first[t * s_local : (t + 1) * s_local]
                        return seq_first.reshape(-1, block.shape[-1])

                    for li, layer in enumerate(LAYER_NUMBERS):
                        lines.append(record(step, "decoder", layer, rank, local(topk[li])))
                    if run.mtp:
                        lines.append(record(step, "mtp", 0, rank, local(mtp_ids(topk)), 0))
                    for li in reversed(run.recompute):  # backward: recompute, last layer first
                        lines.append(record(step, "decoder", LAYER_NUMBERS[li], rank,
                                            local(topk[li])))
            (out / f"router_trace_rank{rank}.jsonl").write_text("".join(lines))
    return out


def evaluate_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    """The report without solver timings."""
    assert main(["evaluate", *args, "--experts", str(EXPERTS), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    for pair in rep["pairs"]:
        del pair["solve_ms"]
    return rep


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The fixture as an .npz with explicit sample ids, and its [L, I, S, K] routing."""
    topk = by_sample()
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    save_trace(path, topk.reshape(topk.shape[0], -1, topk.shape[-1]),
               np.repeat(np.arange(topk.shape[1]), SEQ), EXPERTS, LAYER_NUMBERS)
    return path, topk


def sorted_rows(topk: np.ndarray) -> np.ndarray:
    return np.sort(topk, axis=-1)


RUNS = {
    "dp2": Run(dp=2),
    "dp4": Run(dp=4),
    "tp2": Run(dp=2, tp=2),
    "tp2-sp": Run(dp=2, tp=2, sp=True),
    "2-micro-batches": Run(dp=2, micro_batches=2),
    "recompute": Run(dp=2, tp=2, sp=True, micro_batches=2, recompute=(0, 3, 7)),
    "mtp-skipped": Run(dp=2, mtp=True),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_megatron_trace_gives_the_same_pairs(
    name: str, reference: tuple[Path, np.ndarray], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ref_path, topk = reference
    run = RUNS[name]
    trace_dir = write_megatron(tmp_path, run, topk)
    out = tmp_path / "converted.npz"
    assert main(["convert", "--trace", str(trace_dir), *run.flags(), "--experts",
                 str(EXPERTS), "--out", str(out)]) == 0
    assert "8 layers, 2048 tokens, 32 samples, top-6" in capsys.readouterr().out
    got = load_trace(out)
    assert got.model_type == "megatron" and got.num_experts == EXPERTS
    assert list(got.layer_ids) == LAYER_NUMBERS  # MoE layers in order, dense ones absent
    np.testing.assert_array_equal(got.sample_ids, np.repeat(np.arange(32), SEQ))
    np.testing.assert_array_equal(sorted_rows(got.topk_ids),
                                  sorted_rows(topk.reshape(8, -1, 6)))
    want = evaluate_json(capsys, "--trace", str(ref_path))
    assert evaluate_json(capsys, "--trace", str(trace_dir), *run.flags()) == want


def test_mtp_layers_on_request(tmp_path: Path) -> None:
    topk = by_sample()
    run = Run(dp=2, micro_batches=2, mtp=True)
    trace_dir = write_megatron(tmp_path, run, topk)
    out = tmp_path / "t.npz"
    assert main(["convert", "--trace", str(trace_dir), *run.flags(), "--mtp",
                 "--out", str(out)]) == 0
    got = load_trace(out)
    assert list(got.layer_ids) == [*LAYER_NUMBERS, LAYER_NUMBERS[-1] + 1]
    np.testing.assert_array_equal(sorted_rows(got.topk_ids[-1]),
                                  sorted_rows(mtp_ids(topk).reshape(-1, 6)))


def test_steps_select_iterations(tmp_path: Path) -> None:
    topk = by_sample()
    run = Run(dp=2)
    trace_dir = write_megatron(tmp_path, run, topk)
    out = tmp_path / "t.npz"
    assert main(["convert", "--trace", str(trace_dir), *run.flags(), "--steps", "11:",
                 "--out", str(out)]) == 0
    got = load_trace(out)
    # Step 11 holds samples 16..31 of the fixture, renumbered from 0.
    np.testing.assert_array_equal(sorted_rows(got.topk_ids),
                                  sorted_rows(topk[:, 16:].reshape(8, -1, 6)))
    np.testing.assert_array_equal(got.sample_ids, np.repeat(np.arange(16), SEQ))


def test_tp_copies_must_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A sequence-parallel trace read without --sequence-parallel: rows do not match."""
    run = Run(dp=2, tp=2, sp=True)
    trace_dir = write_megatron(tmp_path, run, by_sample())
    flags = Run(dp=2, tp=2).flags()
    flags[flags.index("--seq-length") + 1] = str(SEQ // 2)
    assert main(["evaluate", "--trace", str(trace_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert "router_trace_rank1.jsonl:1 differs from" in err and "--sequence-parallel" in err


def _rewrite(path: Path, line: int, edit) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[line - 1] = edit(lines[line - 1])
    path.write_text("".join(lines))


def _edit_record(change):
    def edit(line: str) -> str:
        rec = json.loads(line)
        change(rec)
        return json.dumps(rec) + "\n"
    return edit


BAD = {
    "missing field": (3, _edit_record(lambda r: r.pop("num_tokens")), "'num_tokens' is missing"),
    "truncated line": (3, lambda line: line[: len(line) // 2] + "\n", "not a complete JSON"),
    "shape": (3, _edit_record(lambda r: r.update(topk=5)), "'top_indices' has shape"),
    "ragged": (3, _edit_record(lambda r: r["top_indices"][4].pop()), "'top_indices' is not"),
    "rank": (3, _edit_record(lambda r: r.update(rank=7)), "'rank' is 7"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_record_names_file_line_field(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = Run(dp=2)
    trace_dir = write_megatron(tmp_path, run, by_sample())
    line, edit, message = BAD[case]
    path = trace_dir / "router_trace_rank1.jsonl"
    _rewrite(path, line, edit)
    assert main(["evaluate", "--trace", str(trace_dir), *run.flags()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"netmoe evaluate: error: {path}:{line}: ") and message in err
    assert len(err.splitlines()) == 1


def test_layers_with_different_token_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = Run(dp=2, micro_batches=2)
    trace_dir = write_megatron(tmp_path, run, by_sample())
    path = trace_dir / "router_trace_rank0.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    del lines[8 + 4]  # the second micro-batch's record of layer 6 (index 4)
    path.write_text("".join(lines))
    assert main(["evaluate", "--trace", str(trace_dir), *run.flags()]) == 2
    err = capsys.readouterr().err
    assert f"{path}:5: field 'layer' 6 (decoder) has 1 micro-batches at step 10" in err


def test_sequence_length_must_divide_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = Run(dp=2)
    trace_dir = write_megatron(tmp_path, run, by_sample())
    flags = run.flags()
    flags[flags.index("--seq-length") + 1] = "48"
    assert main(["evaluate", "--trace", str(trace_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert "router_trace_rank0.jsonl:1: field 'num_tokens' is 512, not a multiple of the 48" in err
    flags[flags.index("--seq-length") + 1] = "32"
    assert main(["evaluate", "--trace", str(trace_dir), *flags]) == 2
    assert "'num_tokens' is 512 = 16 sequences of 32, but --micro-batch-size=8" in \
        capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "3"], "--steps must be FIRST:LAST"),
        (["--steps", "9:3"], "FIRST <= LAST"),
        (["--micro-batch-size", "0"], "--micro-batch-size: must be a positive integer, got '0'"),
        (["--tensor-parallel", "3"], "--tensor-parallel=3 does not divide the 2 ranks"),
    ],
)
def test_bad_flags(args: list[str], message: str, tmp_path: Path,
                   capsys: pytest.CaptureFixture[str]) -> None:
    run = Run(dp=2)
    trace_dir = write_megatron(tmp_path, run, by_sample())
    try:
        code = main(["evaluate", "--trace", str(trace_dir), *run.flags(), *args])
    except SystemExit as exit_:  # argparse's own checks
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_flags_and_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--trace", str(tmp_path), "--trace-format", "megatron"]) == 2
    assert "needs --seq-length" in capsys.readouterr().err
    assert main(["evaluate", "--trace", str(tmp_path), *Run(dp=1).flags()]) == 2
    assert "holds no router_trace_rank*.jsonl" in capsys.readouterr().err
    (tmp_path / "router_trace_rank1.jsonl").write_text("")
    assert main(["evaluate", "--trace", str(tmp_path), *Run(dp=1).flags()]) == 2
    assert "lacks router_trace_rank0.jsonl" in capsys.readouterr().err
