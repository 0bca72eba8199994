"""`netmoe evaluate --micro-batch-size m --ep-size G`: each round (one dispatch and combine of
one EP group) solved alone with its samples at their real homes, against a brute-force recount.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from netmoe.app.cli import main
from netmoe.trace import load_trace, sample_counts, save_trace

FLAME = Path(__file__).parents[1] / "fixtures" / "flame_290m_2048tok_layers2-9.npz"
EXPERTS, SEQ = 64, 1024


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["evaluate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def long_samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer trace of 8 samples of 1024 real tokens: sample 2a + h is half h of the
    fixture's stream at its MoE layers (a, a + 1), a = 0..3 (each sample's pair is real)."""
    topk = load_trace(FLAME).topk_ids  # [8, 2048, 6]
    pairs = [topk[a : a + 2, h * SEQ : (h + 1) * SEQ] for a in range(4) for h in range(2)]
    path = tmp_path_factory.mktemp("long") / "long.npz"
    save_trace(path, np.concatenate(pairs, axis=1), np.repeat(np.arange(8), SEQ), EXPERTS)
    return path


def recount(counts: np.ndarray, placement: tuple[int, ...], gpus: int, devices: int) -> int:
    """Inter-node routes of the pair (counts [2, I, E]: gather of layer 0, scatter of layer 1)
    with sample i on device placement[i] and expert e on device e // (E / devices)."""
    node_of_expert = np.arange(counts.shape[2]) // (counts.shape[2] // devices) // gpus
    inter = 0
    for i, dev in enumerate(placement):
        far = node_of_expert != dev // gpus
        inter += int(counts[:, i, far].sum())
    return inter


def best(counts: np.ndarray, m: int, gpus: int, devices: int) -> int:
    """The fewest inter-node routes over every placement with m samples per device (brute
    force over all orderings of the round's samples)."""
    slots = [d for d in range(devices) for _ in range(m)]
    return min(recount(counts, order, gpus, devices)
               for order in set(itertools.permutations(slots)))


def test_micro_batch_size_1_gives_the_per_round_optimum(
    long_samples: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rep = run_json(capsys, "--trace", str(long_samples), "--micro-batch-size", "1",
                   "--nodes", "2", "--gpus-per-node", "2")
    counts = sample_counts(load_trace(long_samples), EXPERTS)
    assert rep["micro_batch_size"] == 1 and rep["ep_size"] == 4 and len(rep["rounds"]) == 2
    homes, optima = 0, 0
    for r, got in enumerate(rep["rounds"]):
        assert got["samples"] == list(range(4 * r, 4 * r + 4))  # device j holds the j-th
        mine = counts[:, got["samples"]]
        home = recount(mine, (0, 1, 2, 3), 2, 4)
        assert got["baseline"]["inter"] == home
        optimum = best(mine, 1, 2, 4)
        assert got["netmoe"]["inter"] == optimum < home
        homes, optima = homes + home, optima + optimum
    total = rep["total"]
    assert (total["baseline"]["inter"], total["netmoe"]["inter"]) == (homes, optima)
    # The pair's placement lists each round's devices in round order; it recounts too.
    placement = rep["pairs"][0]["placement"]
    assert sum(recount(counts[:, 4 * r : 4 * r + 4], tuple(placement[4 * r : 4 * r + 4]), 2, 4)
               for r in range(2)) == optima
    # Pooled: all 8 samples in one All-to-All, 2 per device (homes as in their rounds).
    pooled = rep["pooled"]
    order = [0, 4, 1, 5, 2, 6, 3, 7]  # device j's samples of both rounds
    assert pooled["baseline"]["inter"] == homes
    assert pooled["netmoe"]["inter"] == best(counts[:, order], 2, 2, 4) <= optima


def test_round_fields_place_samples_at_their_homes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Round fields out of token order: samples go where their dp_ranks say, rounds follow
    (step, micro-batch), and the result equals the same samples written in home order."""
    trace = load_trace(FLAME)
    topk = trace.topk_ids.reshape(8, 32, 64, 6)
    perm = np.random.default_rng(3).permutation(32)
    # Sample k (in file order) is fixture sample perm[k]: step perm // 16, DP rank perm % 8,
    # micro-batch perm // 8 % 2 (1 sample per device and micro-batch).
    path = tmp_path / "shuffled.npz"
    fields = (perm // 16 + 5, perm // 8 % 2, perm % 8)
    save_trace(path, topk[:, perm].reshape(8, -1, 6), np.repeat(np.arange(32), 64), EXPERTS,
               rounds=tuple(np.repeat(f, 64) for f in fields))
    got = run_json(capsys, "--trace", str(path))
    assert [(r["step"], r["micro_batch"]) for r in got["rounds"]] == [(5, 0), (5, 1), (6, 0),
                                                                     (6, 1)]
    for r, rnd in enumerate(got["rounds"]):
        assert [int(perm[i]) for i in rnd["samples"]] == list(range(8 * r, 8 * r + 8))
    want = run_json(capsys, "--trace", str(FLAME), "--tokens-per-sample", "64",
                    "--micro-batch-size", "1")
    assert got["total"] == want["total"]
    assert [r["netmoe"] for r in got["rounds"]] == [r["netmoe"] for r in want["rounds"]]


def test_ep_groups_are_rounds_of_their_own(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--trace", str(FLAME), "--tokens-per-sample", "64", "--micro-batch-size", "2"]
    rep = run_json(capsys, *args, "--nodes", "4", "--gpus-per-node", "2", "--ep-size", "4")
    # 32 samples, 2 per device, 8 devices: 2 micro-batches x 2 EP groups of 2 nodes.
    assert [(r["batch"], r["ep_group"]) for r in rep["rounds"]] == [(0, 0), (0, 1), (1, 0),
                                                                    (1, 1)]
    assert rep["rounds"][1]["samples"] == list(range(8, 16))
    for kind in ("baseline", "netmoe"):
        for unit in ("inter", "intra"):
            assert rep["total"][kind][unit] == sum(r[kind][unit] for r in rep["rounds"])
    assert 0 < rep["total"]["netmoe"]["inter"] < rep["total"]["baseline"]["inter"]
    # An EP group inside one node has no inter-node routes at all.
    inside = run_json(capsys, *args, "--ep-size", "4")
    assert inside["total"]["baseline"]["inter"] == 0


def test_fit_on_the_first_rounds_replay_the_rest(capsys: pytest.CaptureFixture[str]) -> None:
    rep = run_json(capsys, "--trace", str(FLAME), "--tokens-per-sample", "64",
                   "--micro-batch-size", "1", "--expert-placement", "fit",
                   "--replica-budget", "1")
    assert [r["batch"] for r in rep["rounds"]] == [2, 3]  # held out: the second half
    assert rep["samples"] == 16
    total = rep["total"]
    for kind in ("baseline", "netmoe", "joint", "replicated"):
        assert total[kind]["inter"] == sum(r[kind]["inter"] for r in rep["rounds"])
    assert total["replicated"]["inter"] < total["joint"]["inter"] < total["baseline"]["inter"]
    pooled = rep["pooled"]
    assert pooled["baseline"]["inter"] == total["baseline"]["inter"]
    assert pooled["netmoe"]["inter"] <= total["netmoe"]["inter"]
    assert "joint" in pooled


def test_text_names_rounds_and_the_pooled_bound(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--trace", str(FLAME), "--tokens-per-sample", "64",
                 "--micro-batch-size", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 rounds (one All-to-All each: 1 sample per device, EP groups of 8 devices)" in out
    assert "pooled upper bound" in out and "not what training runs" in out


def _fields(step: list[int], micro: list[int], rank: list[int]) -> dict[str, np.ndarray]:
    return {"step_ids": np.repeat(step, 2), "micro_batch_ids": np.repeat(micro, 2),
            "dp_ranks": np.repeat(rank, 2)}


BASE = {"topk_ids": np.zeros((2, 8, 2), dtype=int), "sample_ids": np.repeat(np.arange(4), 2)}


@pytest.mark.parametrize(
    ("arrays", "args", "message"),
    [
        ({}, ["--micro-batch-size", "3"],
         "--micro-batch-size 3 x 2 devices = 6 samples per round does not divide the trace's 4 "
         "samples"),
        ({}, ["--ep-size", "3"],
         "--ep-size 3 with --nodes 2 x --gpus-per-node 1 = 2 devices: ep_size=3 does not divide "
         "world_size=2"),
        ({}, ["--nodes", "3", "--gpus-per-node", "4", "--ep-size", "6"],
         "ep_size=6 must be a multiple or a divisor of gpus_per_node=4"),
        ({"step_ids": np.zeros(7, dtype=int), "micro_batch_ids": np.zeros(8, dtype=int),
          "dp_ranks": np.zeros(8, dtype=int)}, [], "field step_ids must have shape (8,)"),
        ({"step_ids": np.zeros(8, dtype=int)}, [],
         "fields step_ids, micro_batch_ids, dp_ranks come together; the trace has only step_ids"),
        (_fields([0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]), [],
         "round fields give step 0 micro-batch 0 DP rank 1 3 samples, but step 0 micro-batch 0 "
         "DP rank 0 1"),
        (_fields([0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 1]), ["--micro-batch-size", "2"],
         "--micro-batch-size 2 disagrees with the trace's round fields: 1 samples per"),
        (_fields([0, 0, 0, 0], [0, 0, 1, 1], [0, 2, 0, 1]), [],
         "the trace's dp_ranks reach 2 (3 data-parallel ranks), but the cluster has 2 devices"),
        (_fields([0, 0, 0, 0], [0, 1, 2, 3], [0, 1, 1, 0]), [],
         "step 0 micro-batch 0 has no samples on DP ranks [1] of EP group 0"),
        ({"step_ids": np.array([0, 1] * 4), "micro_batch_ids": np.zeros(8, dtype=int),
          "dp_ranks": np.zeros(8, dtype=int)}, [],
         "field step_ids must be the same for every token of a sample; sample 0 has [0, 1]"),
        (_fields([0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 1]), ["--expert-placement", "fit"],
         "but the trace has 1 round per EP group"),
    ],
)
def test_bad_rounds_exit_2_with_the_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arrays: dict, args: list, message: str
) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **(BASE | arrays), num_experts=np.asarray(8))
    code = main(["evaluate", "--trace", str(path), "--nodes", "2", "--gpus-per-node", "1",
                 *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.count("\n") == 1


def test_merge_traces_keeps_samples_apart() -> None:
    from netmoe.trace import Trace, merge_traces

    def part(rank: int, sample_ids: list[int]) -> Trace:
        n = len(sample_ids)
        return Trace(np.full((2, n, 1), rank), np.array(sample_ids), 4, (3, 5), "mixtral",
                     np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64),
                     np.full(n, rank))

    merged = merge_traces([part(0, [0, 0, 1]), part(1, [4, 4, 9])])
    assert merged.sample_ids.tolist() == [0, 0, 1, 2, 2, 3]
    assert merged.dp_ranks.tolist() == [0, 0, 0, 1, 1, 1]
    assert merged.topk_ids[:, :, 0].tolist() == [[0, 0, 0, 1, 1, 1]] * 2
    other = Trace(np.zeros((2, 1, 1), dtype=np.int64), np.zeros(1, dtype=np.int64), 4, (3, 6))
    with pytest.raises(ValueError, match=r"disagree on layer_ids: \(3, 5\) and \(3, 6\)"):
        merge_traces([part(0, [0]), other])
