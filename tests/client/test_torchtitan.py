"""torchtitan MoE models expert-parallel with netmoe on real gloo process groups.

Tiny qwen3 MoE and deepseek_v3 models from torchtitan's own config builders (float32, D = 32,
8 experts, top-2), every rank builds them from one seed. Each rank trains the same batches on
torchtitan's own EP path (its AllToAllTokenDispatcher over an "ep" CPU device mesh) and on
netmoe's adapter with plans from a real placement service on loopback, with seeded random
plans (every sample moves), and with an unreachable service; AdamW with torchtitan's
load-balancing bias update; then both paths again under torchtitan's FullAC (qwen3) and
SelectiveAC (deepseek_v3) with 2 micro-batches per step. Losses and gradients must agree within
1e-4 relative and expert biases exactly, and the service's plans must send fewer routes between
nodes than the stock path (split sizes of both). The experts compute in float32 here
(torchtitan's GroupedExperts casts to bfloat16); the demo test runs them as torchtitan does.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from support import gloo_group, spawn_ranks

pytest.importorskip("torchtitan", reason="needs the torchtitan extra: pip install "
                    "'netmoe[torchtitan]'")  # fmt: skip

STEPS, SAMPLES, SEQ, LR = 3, 2, 16, 3e-3
FAMILIES = ("qwen3", "deepseek_v3")


def _batches(world: int, rank: int, steps: int, samples: int = SAMPLES
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per step this rank's (tokens [samples, S], labels [samples, S]) of the demo corpus."""
    from netmoe.app.reference.data import load_corpus
    from netmoe.app.reference.torchtitan_demo import VOCAB

    corpus = load_corpus(VOCAB, None)
    out = []
    for step in range(steps):
        rows = torch.from_numpy(corpus.batch(step, world * samples, SEQ, 0)).long()
        mine = rows[rank * samples : (rank + 1) * samples]
        out.append((mine[:, :-1], mine[:, 1:]))
    return out


class _Run:
    """One way of training the model: its model, optimizer, dense parameters, netmoe side."""

    def __init__(self, family: str, experts: int, placement: Any = None, stock: bool = False,
                 gpus: int = 2, dtype: str = "float32", ac: str = "", mesh: Any = None
                 ) -> None:
        from netmoe.app.reference.torchtitan_demo import (
            SplitSpy,
            TitanConfig,
            load_balancing,
            stock_parallelize,
            tiny_model,
        )
        from netmoe.client.torchtitan import parallelize

        self.model = tiny_model(TitanConfig(family, experts=experts, expert_dtype=dtype),
                                seed=0)
        self.ep, self.spy = None, None
        if stock:
            self.spy = SplitSpy(self.model)
            local = {id(p) for p in stock_parallelize(self.model)}
        else:
            self.ep = parallelize(self.model, mesh, mesh_dim=None if mesh is None else "ep",
                                  placement=placement, gpus_per_node=gpus)
            local = {id(p) for p in self.ep.expert_parameters()}
        self.dense = [p for p in self.model.parameters() if id(p) not in local]
        if ac:
            from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

            policy = {"full": FullAC, "selective": SelectiveAC}[ac]
            policy(policy.Config()).apply(self.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR)
        if self.ep is not None:
            self.ep.attach(self.opt)
        load_balancing(self.model, self.opt)
        self.losses: list[float] = []

    def step(self, tokens: torch.Tensor, labels: torch.Tensor, total_tokens: int,
             micro_batches: int = 1) -> None:
        """One optimizer step's gradients over micro_batches forward/backward passes of equal
        row slices (gradient accumulation)."""
        from torchtitan.components.loss import cross_entropy_loss

        from netmoe.client.gradients import all_reduce_gradients

        self.opt.zero_grad(set_to_none=False)
        losses = []
        for part, part_labels in zip(tokens.chunk(micro_batches), labels.chunk(micro_batches),
                                     strict=True):  # fmt: skip
            pred = self.model(part)
            if self.ep is not None:
                part_labels = self.ep.follow(part_labels)
            loss = cross_entropy_loss(pred, part_labels) / total_tokens
            loss.backward()
            losses.append(loss.detach())
        (total,) = all_reduce_gradients(self.dense, [sum(losses)], None)
        self.losses.append(float(total))

    def grads(self) -> dict[str, torch.Tensor]:
        return {name: p.grad.clone() for name, p in self.model.named_parameters()}


def _inter(routes: dict[tuple[int, str], Any], rank: int, gpus: int) -> int:
    from netmoe.app.reference.train import route_totals

    layers = 1 + max(layer for layer, _ in routes)
    return int(route_totals(routes, rank, gpus, layers)[:, 0].sum())


def _compare(runs: dict[str, _Run], world: int, rank: int, family: str, micro_batches: int,
             label: str) -> None:
    """Trains every run STEPS steps on the same batches; after each backward every gradient
    and at the end every loss and expert bias must equal the stock run's."""
    batches = _batches(world, rank, STEPS, SAMPLES * micro_batches)
    worst = {name: (0.0, 0.0) for name in runs}  # (loss, gradient) relative differences
    for step, (tokens, labels) in enumerate(batches):
        for run in runs.values():
            run.step(tokens, labels, world * SAMPLES * micro_batches * SEQ, micro_batches)
        ref = runs["stock"].grads()
        for name, run in runs.items():
            for pname, grad in run.grads().items():
                # Relative to the tensor's norm: float32 summation order differs.
                rel = float((grad - ref[pname]).norm() / ref[pname].norm())
                assert rel < 1e-4, (label, family, name, pname, step, rel)
                worst[name] = (worst[name][0], max(worst[name][1], rel))
        for run in runs.values():
            run.opt.step()
    stock = runs["stock"].losses
    for name, run in runs.items():
        rel = max(abs(a - b) / abs(b) for a, b in zip(run.losses, stock, strict=True))
        assert rel < 1e-4, (label, family, name, run.losses, stock)
        worst[name] = (rel, worst[name][1])
        biases = [b.moe.expert_bias_E for b in _moe_blocks(run.model)]
        for b, r in zip(biases, [b.moe.expert_bias_E for b in _moe_blocks(runs["stock"].model)],
                        strict=True):  # fmt: skip
            torch.testing.assert_close(b, r, rtol=0, atol=1e-7)
            assert float(r.abs().sum()) > 0  # the bias update ran
    if rank == 0:
        print(f"{label} {family} {world} ranks: losses {stock}; vs stock, max relative "
              f"differences (loss, gradient): "
              + ", ".join(f"{k} {v[0]:.1e} {v[1]:.1e}" for k, v in worst.items() if k != "stock"))


def _moe_blocks(model: Any) -> list[Any]:
    """The MoE blocks, inside their checkpoint wrappers if any."""
    blocks = [getattr(b, "_checkpoint_wrapped_module", b) for b in model.layers.values()]
    return [b for b in blocks if b.moe_enabled]


def _hooks(rank: int, world: int, gpus: int, family: str, address: str, dead: str | None,
           label: str) -> tuple[dict[str, Any], list[Any]]:
    """Placement hooks and their clients: the service at address, seeded random plans, and
    unless dead is None a service that is down (nobody listens at dead)."""
    from netmoe.client.placement_client import PlacementClient, job_spec
    from netmoe.client.planning import Placement, RandomPlans

    spec = job_spec(world // gpus, gpus, 8, SAMPLES, hidden_size=32, dtype_bytes=4,
                    deadline_ms=4000)  # fmt: skip
    client = PlacementClient(address, f"tt-{label}-{family}-{world}", rank, spec)
    hooks = {
        "service": Placement(client, rank, world, SAMPLES, 5.0),
        "random": Placement(RandomPlans(rank, world, SAMPLES, seed=5), rank, world, SAMPLES,
                            5.0),
    }  # fmt: skip
    if dead is None:
        return hooks, [client]
    down = PlacementClient(dead, f"tt-down-{family}-{world}", rank, spec, connect_timeout=0.5)
    hooks["down"] = Placement(down, rank, world, SAMPLES, 0.3)
    return hooks, [client, down]


def _train_and_compare(rank: int, world: int, gpus: int, family: str, address: str,
                       dead: str) -> None:
    hooks, clients = _hooks(rank, world, gpus, family, address, dead, "plain")
    try:
        from torch.distributed.device_mesh import init_device_mesh

        # Home placement over the "ep" dimension of a 2-D (dp, ep) device mesh.
        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "ep"))
        runs = {"stock": _Run(family, 8, stock=True, gpus=gpus),
                "home": _Run(family, 8, gpus=gpus, mesh=mesh)}
        runs.update({k: _Run(family, 8, hook, gpus=gpus) for k, hook in hooks.items()})
        _compare(runs, world, rank, family, 1, "plain")
        assert hooks["service"].stats.fallbacks == 0, hooks["service"].stats.reasons
        assert hooks["random"].stats.moved > 0 and hooks["random"].stats.fallbacks == 0
        assert hooks["down"].stats.plans == 0 and hooks["down"].stats.fallbacks > 0
        counts = torch.tensor([
            _inter(runs["stock"].spy.routes, rank, gpus),
            _inter(runs["home"].ep.stats.routes, rank, gpus),
            _inter(runs["service"].ep.stats.routes, rank, gpus),
            hooks["service"].stats.moved])  # fmt: skip
        torch.distributed.all_reduce(counts)
        stock_inter, home_inter, service_inter, moved = counts.tolist()
        assert home_inter == stock_inter  # the same routes, counted by both dispatchers
        assert moved > 0 and service_inter < stock_inter, counts.tolist()
        if rank == 0:
            print(f"{family} {world} ranks: inter-node routes stock {stock_inter}, with "
                  f"placement {service_inter}")
    finally:
        clients[0].close(unregister=rank == 0)
        clients[1].close()


def _recompute_and_micro_batches(rank: int, world: int, gpus: int, family: str, address: str,
                                 ac: str) -> None:
    """torchtitan's activation checkpointing (per block or selective) on both paths, with two
    micro-batches per step: the service's and random plans replay in the recompute."""
    hooks, clients = _hooks(rank, world, gpus, family, address, None, ac)
    try:
        runs = {"stock": _Run(family, 8, stock=True, gpus=gpus, ac=ac),
                "service": _Run(family, 8, hooks["service"], gpus=gpus, ac=ac),
                "random": _Run(family, 8, hooks["random"], gpus=gpus, ac=ac)}  # fmt: skip
        _compare(runs, world, rank, family, 2, f"{ac} AC, 2 micro-batches")
        for name in ("service", "random"):
            st = hooks[name].stats
            assert st.fallbacks == 0 and st.replays > 0, (name, st)
        assert hooks["random"].stats.moved > 0
    finally:
        clients[0].close(unregister=rank == 0)


def _bad_input(rank: int, world: int) -> None:
    """Every refusal names the setting and leaves the model as it was."""
    import copy

    from torchtitan.config import ParallelismConfig
    from torchtitan.models.common.attention import FlexAttention

    from netmoe.app.reference.torchtitan_demo import (
        TitanConfig,
        model_config,
        stock_parallelize,
        tiny_model,
    )
    from netmoe.client.torchtitan import parallelize

    def built(config: Any) -> Any:
        model = config.build()
        model.init_states()
        return model

    def refused(model: Any, match: str, **kw: Any) -> None:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises((ValueError, TypeError), match=match):
            parallelize(model, **kw)
        assert "forward" not in vars(model) and not hasattr(model, "_netmoe")
        after = model.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)

    refused(tiny_model(TitanConfig("qwen3", experts=6)),
            rf"num_experts=6 is not divisible by the expert-parallel size {world}")
    flex = model_config(TitanConfig("qwen3"))
    for layer in flex.layers:
        layer.attention.inner_attention = FlexAttention.Config()
    refused(built(flex), r"inner_attention is FlexAttention")
    dense = model_config(TitanConfig("deepseek_v3"))
    dense.layers = [copy.deepcopy(dense.layers[0]) for _ in dense.layers]
    refused(built(dense), r"has no MoE layers")
    for setting in ("context_parallel_degree", "pipeline_parallel_degree",
                    "tensor_parallel_degree"):  # fmt: skip
        refused(tiny_model(TitanConfig("qwen3")), rf"parallelism.{setting}=2",
                parallelism=ParallelismConfig(**{setting: 2}))
    refused(tiny_model(TitanConfig("qwen3")), r"gpus_per_node=3", gpus_per_node=3)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "ep"))
    refused(tiny_model(TitanConfig("qwen3")), r"name the expert-parallel one with mesh_dim",
            mesh=mesh)
    stocked = tiny_model(TitanConfig("qwen3"))
    stock_parallelize(stocked)
    refused(stocked, r"already expert-parallel")
    model = tiny_model(TitanConfig("qwen3"))
    ep = parallelize(model)
    with pytest.raises(ValueError, match="already expert-parallel with netmoe"):
        parallelize(model)
    tokens = torch.zeros(SAMPLES, SEQ, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_masks given"):
        model(tokens, None, object())
    assert ep.step == -1 and ep.stats.routes == {}  # nothing ran


def _worker(rank: int, port: int, world: int, gpus: int, address: str, dead: str) -> None:
    torch.manual_seed(0)
    with gloo_group(rank, world, port):
        for family in FAMILIES:
            _train_and_compare(rank, world, gpus, family, address, dead)
        _recompute_and_micro_batches(rank, world, gpus, "qwen3", address, "full")
        _recompute_and_micro_batches(rank, world, gpus, "deepseek_v3", address, "selective")
        _bad_input(rank, world)


def _run(world: int, gpus: int) -> None:
    from netmoe.app.reference.launch import free_port
    from netmoe.server.app import start
    from netmoe.server.config import ServerConfig

    handle = start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=0))
    try:
        spawn_ranks(_worker, world, world, gpus, handle.address, f"127.0.0.1:{free_port()}",
                    timeout=900)
    finally:
        handle.stop()


def test_equal_to_torchtitans_own_ep_path_on_2_nodes_x_2() -> None:
    """Both families: losses, gradients and expert biases equal torchtitan's own EP path (home,
    service, random plans, service down), fewer inter-node routes; bad input refused."""
    _run(4, 2)


@pytest.mark.slow
def test_equal_to_torchtitans_own_ep_path_on_2_nodes_x_4() -> None:
    _run(8, 4)


def test_demo_json_has_the_demos_keys_and_the_stock_run(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """``netmoe demo --torchtitan qwen3 --json`` on 2 ranks (2 nodes x 1): home, the embedded
    service and torchtitan's own EP path train the same losses."""
    import json

    from netmoe.app.cli import main

    args = ["demo", "--torchtitan", "qwen3", "--nodes", "2", "--gpus-per-node", "1", "--steps",
            "2", "--samples-per-device", "2", "--seq-len", "16", "--layers", "2",
            "--cache-dir", str(tmp_path), "--json"]  # fmt: skip
    assert main(args) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {"home", "netmoe", "solver_ms_median", "inter_reduction", "max_loss_rel_diff",
            "config", "stock"} <= rep.keys()  # fmt: skip
    home, net, stock = rep["home"], rep["netmoe"], rep["stock"]
    assert len(home["loss"]) == len(net["loss"]) == len(stock["loss"]) == 2
    # torchtitan's bfloat16 experts on equal inputs: only float32 summation order differs.
    assert rep["max_loss_rel_diff"] < 1e-5 and rep["max_stock_loss_rel_diff"] < 1e-5
    assert net["fallbacks"] == 0, net["fallback_reasons"]
    total = lambda r: r["inter_routes"] + r["intra_routes"] + r["local_routes"]  # noqa: E731
    assert total(net) == total(home) == total(stock)
    assert rep["config"]["model_type"] == "qwen3" and rep["config"]["experts"] == 4


def test_record_writes_a_trace_evaluate_reads(tmp_path: Any,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from netmoe.app.cli import main
    from netmoe.trace import load_trace

    out = tmp_path / "tt.npz"
    assert main(["record", "--torchtitan", "deepseek_v3", "--nodes", "2", "--gpus-per-node", "1",
                 "--steps", "2", "--batch-size", "2", "--seq-length", "16", "--out",
                 str(out)]) == 0  # fmt: skip
    assert f"wrote {out}: torchtitan deepseek_v3" in capsys.readouterr().out
    trace = load_trace(out)
    assert trace.num_experts == 4 and trace.topk_ids.shape == (2, 2 * 4 * 16, 2)
    assert main(["evaluate", "--trace", str(out), "--nodes", "2", "--gpus-per-node", "1",
                 "--json"]) == 0  # fmt: skip
    rep = json.loads(capsys.readouterr().out)
    assert rep["experts"] == 4


@pytest.mark.parametrize("argv, named", [
    (["record", "--torchtitan", "qwen3", "--hf-model", "x", "--out", "t.npz"], "--hf-model"),
    (["record", "--out", "t.npz"], "--torchtitan"),
    (["demo", "--torchtitan", "qwen3", "--expert-placement"], "--expert-placement"),
    (["demo", "--torchtitan", "qwen3", "--hf-model", "x"], "--hf-model"),
])  # fmt: skip
def test_cli_bad_input_names_the_flag(argv: list[str], named: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from netmoe.app.cli import main

    assert main(argv) == 2
    assert named in capsys.readouterr().err
