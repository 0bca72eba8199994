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

from netmoe.app.cli import main
from netmoe.trace import load_trace, save_trace

FLAME = Path(__file__).parents[1] / "fixtures" / "flame_290m_2048tok_layers2-9.npz"
SEQ = 64  # the fixture cut into 32 samples of 64 tokens
EXPERTS = 64
LAYER_NUMBERS = [1, 2, 3, 5, 6, 7, 9, 10]  # decoder.layers.N of the MoE layers; gaps are dense
STEPS = [10, 11]


@dataclass(frozen=True)
class Run:
    """How the emulated Megatron job was laid out, and what else its loop did."""

    dp: int
    tp: int = 1
    sp: bool = False
    micro_batches: int = 1
    recompute: tuple[int, ...] = ()  # layers whose router runs again in the backward
    mtp: bool = False
    mtp_depths: int = 1  # > 1: one repeated MTP layer (mtp_use_repeated_layer) per depth
    recompute_noise: bool = False  # recomputed routing is not bit-identical to the forward's
    eval_before: tuple[int, ...] = ()  # steps whose records start with evaluate()'s forwards
    eval_micro_batch_size: int | None = None  # default: the training one
    eval_after: bool = False  # an evaluate() after the last step (stamped last step + 1)
    rerun: tuple[int, ...] = ()  # steps the rerun state machine runs twice

    @property
    def micro_batch_size(self) -> int:
        return 32 // (len(STEPS) * self.dp * self.micro_batches)

    def flags(self) -> list[str]:
        out = ["--trace-format", "megatron", "--seq-length", str(SEQ), "--micro-batch-size",
               str(self.micro_batch_size), "--tensor-parallel", str(self.tp)]
        return out + (["--sequence-parallel"] if self.sp else [])

    def cluster(self) -> list[str]:
        """A modelled cluster of one device per data-parallel rank, over two nodes."""
        return ["--nodes", "2", "--gpus-per-node", str(self.dp // 2)]

    def rounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(step, micro-batch, data-parallel rank) of each token of the 32 fixture samples,
        laid out as write_megatron lays them out."""
        i = np.arange(32)
        b, m = self.micro_batch_size, self.micro_batches
        step = np.asarray(STEPS)[i // (b * m * self.dp)]
        d = i // (b * m) % self.dp
        return tuple(np.repeat(x, SEQ) for x in (step, i // b % m, d))  # type: ignore[return-value]


def by_sample() -> np.ndarray:
    """[L, I, S, K] int64: the fixture, sample-major (sample i = tokens 64 i .. 64 i + 63)."""
    topk = load_trace(FLAME).topk_ids
    return topk.reshape(topk.shape[0], -1, SEQ, topk.shape[2])


def mtp_ids(samples: np.ndarray) -> np.ndarray:
    """Routing of a made-up MTP layer: [I, S, K] (any valid top-k of distinct experts)."""
    return (samples[0] + 1) % EXPERTS


def eval_ids(samples: np.ndarray) -> np.ndarray:
    """Routing of made-up validation samples: [L, I, S, K], none equal to a training one."""
    return (samples + 3) % EXPERTS


def router_indices(ids: np.ndarray) -> list[list[int]]:
    """[N, K] top-k -> what the tracer writes: nonzero() of the boolean routing map."""
    routing_map = np.zeros((ids.shape[0], EXPERTS), dtype=bool)
    np.put_along_axis(routing_map, ids, True, axis=1)
    _, expert = np.nonzero(routing_map)
    return expert.reshape(ids.shape[0], -1).tolist()


def record(step: int, block: str, layer: int, rank: int, ids: np.ndarray,
           mtp_idx: int | None = None) -> str:
    """One line as RouterTracer._make_index_record and _flush_records_to_disk write it."""
    rec: dict = {"step": step, "stage": "pre_dispatch", "block": block, "layer": layer,
                 "rank": rank, "num_tokens": int(ids.shape[0]), "topk": int(ids.shape[1])}
    if mtp_idx is not None:
        rec["mtp_idx"] = mtp_idx
    rec["top_indices"] = router_indices(ids)
    return json.dumps(rec) + "\n"


def write_megatron(root: Path, run: Run, topk: np.ndarray) -> Path:
    """topk: [L, I, S, K] by sample. Sample ((step * DP + d) * M + m) * B + b is sequence b of
    micro-batch m of data-parallel rank d; global rank d * T + t (tp-cp-ep-dp-pp, PP = CP = 1).
    Per step and rank, in the order the tracer flushes them: evaluate()'s forwards (buffered
    before the step, no backward), then each run of the step's forward-backward (twice for a
    rerun; the discarded first run routes differently), each micro-batch's forward (decoder
    layers, then the MTP layer once per depth) followed by the recomputed layers, last first."""
    out = root / "trace"
    out.mkdir()
    b, s_local = run.micro_batch_size, SEQ // run.tp if run.sp else SEQ
    b_eval = run.eval_micro_batch_size or b
    valid = eval_ids(topk)
    for d in range(run.dp):
        for t in range(run.tp):
            rank = d * run.tp + t
            lines = []

            def local(block: np.ndarray, first: int, size: int, t: int = t) -> np.ndarray:
                seq_first = block[first : first + size].transpose(1, 0, 2)  # [S, B, K]
                if run.sp:
                    seq_first = seq_first[t * s_local : (t + 1) * s_local]
                return seq_first.reshape(-1, block.shape[-1])

            def evaluation(step: int, rank: int = rank, d: int = d) -> list[str]:
                return [record(step, "decoder", layer, rank,
                               local(valid[li], (e * run.dp + d) * b_eval, b_eval))
                        for e in range(2) for li, layer in enumerate(LAYER_NUMBERS)]

            for si, step in enumerate(STEPS):
                if step in run.eval_before:
                    lines += evaluation(step)
                for again in range(2 if step in run.rerun else 1):
                    data = (topk + 1) % EXPERTS if again == 0 and step in run.rerun else topk
                    for m in range(run.micro_batches):
                        first = ((si * run.dp + d) * run.micro_batches + m) * b
                        for li, layer in enumerate(LAYER_NUMBERS):
                            lines.append(record(step, "decoder", layer, rank,
                                                local(data[li], first, b)))
                        for depth in range(run.mtp_depths if run.mtp else 0):
                            lines.append(record(step, "mtp", 0, rank,
                                                local((mtp_ids(data) + depth) % EXPERTS, first, b),
                                                0))
                        redo = (data + 1) % EXPERTS if run.recompute_noise else data
                        for li in reversed(run.recompute):  # the backward, last layer first
                            lines.append(record(step, "decoder", LAYER_NUMBERS[li], rank,
                                                local(redo[li], first, b)))
            if run.eval_after:
                lines += evaluation(STEPS[-1] + 1)
            (out / f"router_trace_rank{rank}.jsonl").write_text("".join(lines))
    return out


def evaluate_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    """The report without solver timings."""
    assert main(["evaluate", *args, "--experts", str(EXPERTS), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    for pair in rep["pairs"]:
        del pair["solve_ms"]
    return rep


def reference(root: Path, run: Run, topk: np.ndarray) -> Path:
    """The samples as an .npz with explicit sample ids and the round fields the run gives."""
    path = root / "ref.npz"
    save_trace(path, topk.reshape(topk.shape[0], -1, topk.shape[-1]),
               np.repeat(np.arange(topk.shape[1]), SEQ), EXPERTS, LAYER_NUMBERS,
               rounds=run.rounds())
    return path


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
    # Issue 25, case 1: evaluate() forwards are stamped with the next iteration.
    "evaluation": Run(dp=2, micro_batches=2, recompute=(2,), eval_before=(11,),
                      eval_after=True),
    "evaluation-own-micro-batch-size": Run(dp=2, eval_before=(10, 11),
                                           eval_micro_batch_size=2),
    # Case 2: the rerun state machine runs a step's forward-backward twice.
    "rerun": Run(dp=2, micro_batches=2, rerun=(10,)),
    "rerun-recompute-evaluation": Run(dp=4, micro_batches=2, recompute=(1, 4), rerun=(11,),
                                      recompute_noise=True, eval_before=(11,)),
    # Case 3: a recompute that is not bit-identical is still a recompute.
    "recompute-not-identical": Run(dp=2, micro_batches=2, recompute=(0, 3, 7),
                                   recompute_noise=True),
    # Case 4: a repeated MTP layer fires once per depth under one key.
    "mtp-repeated-skipped": Run(dp=2, micro_batches=2, mtp=True, mtp_depths=2,
                                recompute=(5,)),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_megatron_trace_gives_the_same_pairs(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    topk = by_sample()
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
    # Case 6: each sample's step, micro-batch and data-parallel rank.
    for have, want in zip((got.step_ids, got.micro_batch_ids, got.dp_ranks), run.rounds(),
                          strict=True):
        np.testing.assert_array_equal(have, want)
    want = evaluate_json(capsys, "--trace", str(reference(tmp_path, run, topk)),
                         *run.cluster())
    assert evaluate_json(capsys, "--trace", str(trace_dir), *run.flags(), *run.cluster()) == want
    assert len(want["rounds"]) == len(STEPS) * run.micro_batches


def test_evaluation_forwards_on_request(tmp_path: Path) -> None:
    """Case 1: --forwards evaluation reads evaluate()'s forwards, at their own batch size."""
    run = Run(dp=2, micro_batches=2, recompute=(2,), eval_before=(11,), eval_after=True,
              eval_micro_batch_size=3)
    topk = by_sample()
    trace_dir = write_megatron(tmp_path, run, topk)
    out = tmp_path / "eval.npz"
    assert main(["convert", "--trace", str(trace_dir), *run.flags(), "--forwards",
                 "evaluation", "--out", str(out)]) == 0
    got = load_trace(out)
    # Per step: data-parallel rank d's evaluation micro-batch e holds validation samples
    # (e * DP + d) * 3 .. + 2, read in (step, d, e) order.
    order = [(e * 2 + d) * 3 + b for d in range(2) for e in range(2) for b in range(3)]
    want = eval_ids(topk)[:, order * 2]
    np.testing.assert_array_equal(sorted_rows(got.topk_ids),
                                  sorted_rows(want.reshape(8, -1, 6)))
    samples = np.unique(got.sample_ids).size
    assert samples == 24
    per_sample = got.step_ids[::SEQ], got.micro_batch_ids[::SEQ], got.dp_ranks[::SEQ]
    assert per_sample[0].tolist() == [11] * 12 + [12] * 12
    assert per_sample[1].tolist() == ([0] * 3 + [1] * 3) * 4
    assert per_sample[2].tolist() == ([0] * 6 + [1] * 6) * 2


def test_global_batch_size_when_every_step_evaluates(tmp_path: Path) -> None:
    """Case 1 without recompute: evaluation forwards of training size at every step outnumber
    the training micro-batch; --global-batch-size says how many micro-batches a step has."""
    topk = by_sample()
    run = Run(dp=2, eval_before=tuple(STEPS))
    trace_dir = write_megatron(tmp_path, run, topk)
    out = tmp_path / "t.npz"
    batch = str(run.micro_batch_size * run.dp)
    assert main(["convert", "--trace", str(trace_dir), *run.flags(), "--global-batch-size",
                 batch, "--out", str(out)]) == 0
    got = load_trace(out)
    np.testing.assert_array_equal(sorted_rows(got.topk_ids), sorted_rows(topk.reshape(8, -1, 6)))
    assert main(["convert", "--trace", str(trace_dir), *run.flags(), "--global-batch-size",
                 "12", "--out", str(out)]) == 2


def test_identical_micro_batches_are_both_kept(tmp_path: Path) -> None:
    """Case 3: two micro-batches that route alike (the same data twice) are two samples each."""
    topk = by_sample().copy()
    run = Run(dp=2, micro_batches=2)
    b = run.micro_batch_size
    for first in range(0, 32, 2 * b):
        topk[:, first + b : first + 2 * b] = topk[:, first : first + b]
    trace_dir = write_megatron(tmp_path, run, topk)
    out = tmp_path / "t.npz"
    assert main(["convert", "--trace", str(trace_dir), *run.flags(), "--out", str(out)]) == 0
    got = load_trace(out)
    np.testing.assert_array_equal(sorted_rows(got.topk_ids), sorted_rows(topk.reshape(8, -1, 6)))


@pytest.mark.parametrize("depths", [1, 3])
def test_mtp_layers_on_request(depths: int, tmp_path: Path) -> None:
    """Case 4: a repeated MTP layer gives one trace layer per depth."""
    topk = by_sample()
    run = Run(dp=2, micro_batches=2, mtp=True, mtp_depths=depths)
    trace_dir = write_megatron(tmp_path, run, topk)
    out = tmp_path / "t.npz"
    assert main(["convert", "--trace", str(trace_dir), *run.flags(), "--mtp",
                 "--out", str(out)]) == 0
    got = load_trace(out)
    last = LAYER_NUMBERS[-1]
    assert list(got.layer_ids) == [*LAYER_NUMBERS, *range(last + 1, last + 1 + depths)]
    for depth in range(depths):
        np.testing.assert_array_equal(
            sorted_rows(got.topk_ids[8 + depth]),
            sorted_rows(((mtp_ids(topk) + depth) % EXPERTS).reshape(-1, 6)))


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


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_a_missing_router_record_is_token_dropping(
    micro_batches: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Case 5: the tracer writes no record for a router call that dropped tokens (its routing
    map then lacks top-k experts for some rows); the reader says so instead of reading on."""
    run = Run(dp=2, micro_batches=micro_batches)
    trace_dir = write_megatron(tmp_path, run, by_sample())
    path = trace_dir / "router_trace_rank0.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    del lines[8 * (micro_batches - 1) + 4]  # the last micro-batch's record of layer 6
    path.write_text("".join(lines))
    assert main(["evaluate", "--trace", str(trace_dir), *run.flags()]) == 2
    err = capsys.readouterr().err
    if micro_batches == 1:
        assert f"{path}:1: rank 0 has no record of layer 6 (decoder) at step 10" in err
    else:
        assert f"{path}:9: layer 1 (decoder) follows a complete forward pass at step 10" in err
    assert "token dropping" in err and "pipeline" not in err


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
    trace_dir = write_megatron(tmp_path, Run(dp=2), by_sample())
    assert main(["evaluate", "--trace", str(trace_dir), "--trace-format", "megatron"]) == 2
    assert "needs --seq-length" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", "--trace", str(empty), *Run(dp=1).flags()]) == 2
    assert "holds no router_trace_rank*.jsonl" in capsys.readouterr().err
    (empty / "router_trace_rank1.jsonl").write_text("")
    assert main(["evaluate", "--trace", str(empty), *Run(dp=1).flags()]) == 2
    assert "lacks router_trace_rank0.jsonl" in capsys.readouterr().err


def write_inference(root: Path, topk: np.ndarray, tokens: list[list[int]]) -> Path:
    """An inference trace as RouterTracer.record_indices writes it from the text generation
    controller: per engine step one record per MoE layer, numbered by layer_number (1-based),
    rows the step's tokens of every request flattened, then advance_step(). topk: [L, T, K]
    token stream; tokens[step][rank]: that rank's tokens at the step, taken in stream order."""
    out = root / "inference"
    out.mkdir()
    files: dict[int, list[str]] = {}
    at = 0
    for step, per_rank in enumerate(tokens):
        for rank, n in enumerate(per_rank):
            for li, layer in enumerate(LAYER_NUMBERS):
                ids = topk[li, at : at + n]
                rec = {"step": step, "stage": "pre_dispatch", "block": "decoder",
                       "layer": layer + 1, "rank": rank, "num_tokens": n,
                       "topk": int(ids.shape[1]), "top_indices": ids.tolist()}
                files.setdefault(rank, []).append(json.dumps(rec) + "\n")
            at += n
    for rank, lines in files.items():
        (out / f"router_trace_rank{rank}.jsonl").write_text("".join(lines))
    return out


def test_inference_trace_is_read_as_such(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Case 7: a prefill step, then decode steps of one token per request, on 2 ranks."""
    topk = load_trace(FLAME).topk_ids
    tokens = [[300, 200], [3, 2], [3, 2], [2, 2]]
    trace_dir = write_inference(tmp_path, topk, tokens)
    out = tmp_path / "inference.npz"
    assert main(["convert", "--trace", str(trace_dir), "--trace-format", "megatron",
                 "--out", str(out)]) == 0
    assert "8 layers, 514 tokens, 8 samples" in capsys.readouterr().out
    got = load_trace(out)
    assert got.model_type == "megatron-inference"
    assert list(got.layer_ids) == [n + 1 for n in LAYER_NUMBERS]  # as written
    total = sum(map(sum, tokens))
    np.testing.assert_array_equal(got.topk_ids, topk[:, :total])
    sizes = [n for per_rank in tokens for n in per_rank]
    np.testing.assert_array_equal(got.sample_ids, np.repeat(np.arange(8), sizes))
    np.testing.assert_array_equal(got.step_ids, np.repeat([0, 0, 1, 1, 2, 2, 3, 3], sizes))
    np.testing.assert_array_equal(got.dp_ranks, np.repeat([0, 1] * 4, sizes))
    rep = evaluate_json(capsys, "--trace", str(trace_dir), "--trace-format", "megatron",
                        "--nodes", "2", "--gpus-per-node", "1")
    assert [r["step"] for r in rep["rounds"]] == [0, 1, 2, 3]
    assert rep["micro_batch_size"] == 1
