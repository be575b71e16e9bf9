"""Tests of experiments/routers.py: the routers and remedies on cases with a known answer, the
diagnostics, and that a curve along one schedule is the uninterrupted run."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn

import train_toy
from experiments import common, routers
from mixlora import LoRALinear, MixLoRALinear, adapter_state_dict
from tiny_mllm import TinyMLLM

F64 = torch.float64


def layer_pair(cls, E: int, r: int, seed: int = 0, conditional: bool = True,
               **kwargs) -> tuple[MixLoRALinear, MixLoRALinear]:
    """The plain MixLoRA layer and the variant `cls`, with the same base, pools and routers."""
    torch.manual_seed(seed)
    base = nn.Linear(6, 5, dtype=F64)
    plain = MixLoRALinear(base, E, r, scores="sigmoid", conditional=conditional)
    nn.init.normal_(plain.lora_B)
    variant = cls(base, E, r, scores="sigmoid", conditional=conditional, **kwargs)
    variant.load_state_dict(plain.state_dict(), strict=False)
    return plain, variant


def test_credit_is_the_identity_forward_and_the_first_order_change_of_every_unchosen_factor():
    torch.manual_seed(0)
    N, r, E, d = 3, 2, 5, 4
    F = torch.randn(N, r, d, dtype=F64, requires_grad=True)
    p = torch.rand(N, E, dtype=F64, requires_grad=True)
    pool, G = torch.randn(E, d, dtype=F64), torch.randn(N, r, d, dtype=F64)
    index = torch.tensor([[0, 3], [1, 2], [2, 4]])
    out = routers._Credit.apply(F, p, index, pool)
    assert torch.equal(out, F)
    (out * G).sum().backward()  # ∂L/∂F = G
    assert torch.equal(F.grad, G)
    expected = torch.einsum("njd,ed->nje", G, pool).min(1).values  # the best slot for each factor
    expected[torch.arange(N)[:, None], index] = 0  # the chosen get theirs through their gates
    torch.testing.assert_close(p.grad, expected, rtol=0, atol=1e-12)


def test_credit_changes_only_the_routers_gradient_and_is_lora_at_e_equal_r():
    # IFS only: with CFS the a-pool also scores the b-factors, so it would get some of the credit too.
    plain, credit = layer_pair(routers.CounterfactualCredit, E=8, r=3, conditional=False)
    x = torch.randn(4, 7, 6, dtype=F64)
    for layer in (plain, credit):
        layer.train()
        layer(x).pow(2).sum().backward()
    torch.testing.assert_close(credit(x), plain(x), rtol=0, atol=0)
    assert torch.equal(credit.lora_B.grad, plain.lora_B.grad) and torch.equal(credit.lora_A.grad, plain.lora_A.grad)
    assert not torch.allclose(credit.router_A.grad, plain.router_A.grad)  # the unchosen factors are credited
    # E = r: every factor is chosen, nothing is left to credit, and the layer is LoRA.
    plain, credit = layer_pair(routers.CounterfactualCredit, E=3, r=3)
    lora = LoRALinear(plain.base, 3)
    lora.load_state_dict({k: v for k, v in plain.state_dict().items() if k.startswith(("lora", "base"))})
    torch.testing.assert_close(credit(x), lora(x), rtol=0, atol=1e-12)
    credit(x).pow(2).sum().backward()
    plain(x).pow(2).sum().backward()
    torch.testing.assert_close(credit.router_A.grad, plain.router_A.grad, rtol=0, atol=1e-12)


def test_gumbel_explores_in_training_on_its_schedule_and_is_mixlora_in_eval():
    plain, gumbel = layer_pair(routers.GumbelTopR, E=16, r=4, explore=10)
    x = torch.randn(64, 5, 6, dtype=F64)
    assert torch.equal(gumbel.eval().route(x).index_a, plain.route(x).index_a)
    gumbel.train()
    explored = gumbel.route(x).index_a
    assert gumbel.tau == 1.0 and int(gumbel.trained_steps) == 1
    assert not torch.equal(explored, plain.route(x).index_a)  # noise at τ = 1 changes some choices
    for _ in range(9):
        gumbel.route(x)
    assert gumbel.tau == pytest.approx(0.1) and int(gumbel.trained_steps) == 10
    assert torch.equal(gumbel.route(x).index_a, plain.route(x).index_a) and gumbel.tau == 0.0  # explored
    assert "trained_steps" in gumbel.state_dict()  # a resumed run goes on where it was


def test_task_table_routes_each_task_by_its_row():
    torch.manual_seed(0)
    layer = routers.TaskTable(nn.Linear(6, 5, dtype=F64), 8, 2, num_tasks=3).eval()
    with torch.no_grad():
        layer.router_table.zero_()
        layer.router_table[:, 0, :2] = layer.router_table[:, 1, 2:4] = layer.router_table[:, 2, 6:] = 5.0
    layer.task = torch.tensor([2, 0, 1, 0])
    routing = layer.route(torch.randn(4, 3, 6, dtype=F64))
    assert routing.index_a.tolist() == [[6, 7], [0, 1], [2, 3], [0, 1]] and torch.equal(routing.index_b, routing.index_a)
    assert torch.equal(routing.gate_a, torch.ones_like(routing.gate_a))


def test_k_means_finds_separated_clusters_and_the_probe_reads_them():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 8, dtype=F64) * 10
    labels = torch.arange(300) % 3
    x = centres[labels] + torch.randn(300, 8, dtype=F64, generator=gen)
    found = routers.k_means(x, 3, 20, torch.Generator().manual_seed(1))
    assert torch.cdist(centres, found).min(1).values.max() < 0.5  # every centre found
    assert routers.probe(x.numpy(), labels.numpy()) == 1.0
    noise = torch.randn(300, 8, dtype=F64, generator=gen).numpy()
    assert routers.probe(noise, labels.numpy()) < 0.55  # chance is 1/3


def test_steps_to_and_separation():
    run = {"steps": [0, 50, 100, 150], "seen": [10.0, 89.9, 90.0, 100.0]}
    assert routers.steps_to(run) == 100 and routers.steps_to(run, 101.0) is None
    assert routers.separation({"within": [0.5, 0.9], "between": [0.4, 0.2]}) == pytest.approx(0.7)


def test_router_lr_scales_the_routers_step_only(tmp_path):
    # Two steps: in the first the b-pool is zero, so the gates carry no gradient and no router moves.
    config = replace(train_toy.quick(train_toy.Config(checkpoints=str(tmp_path))), method="mixlora", steps=2,
                     conflict=(2, 1.0))
    moved = {}
    for scale in (1.0, 100.0):
        run = replace(config, router_lr=scale)
        model = common.untrained(run)
        before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
        train_toy.train(model, "instruct", run, tmp_path / f"{scale}.ckpt")
        moved[scale] = {k: (v - before[k]).abs().sum() for k, v in adapter_state_dict(model).items()}
    for k in moved[1.0]:  # the same gradients, and Adam's step is proportional to lr: 100 times for the routers
        assert moved[1.0][k] > 0, k
        assert float(moved[100.0][k] / moved[1.0][k]) == pytest.approx(100.0 if ".router_" in k else 1.0, rel=1e-3), k


def test_targets_put_adapters_on_the_named_linears_only():
    config = replace(train_toy.Config(), method="mixlora", targets=("down_proj",))
    assert train_toy.run_name(config) == "mixlora-E16-r4-on-down_proj-s0-steps800"
    torch.manual_seed(0)
    model = train_toy.adapt(TinyMLLM(train_toy.model_config(len(train_toy.TOK), quick=True)), config)
    adapted = [n for n, m in model.named_modules() if isinstance(m, MixLoRALinear)]
    assert adapted and all(n.endswith("mlp.down_proj") for n in adapted) and len(adapted) == len(model.layers)


def test_a_curve_is_the_uninterrupted_run(tmp_path):
    config = replace(train_toy.quick(train_toy.Config(checkpoints=str(tmp_path))), conflict=(2, 1.0), seed=1)
    for label in ("MixLoRA sigmoid", "Gumbel top-r"):  # Gumbel: its noise and step count resume too
        changes, adapt = routers.METHODS[label]
        run = replace(config, **changes)
        *_, (step, along) = routers.along(run, adapt, [0, 5, 9, 12])
        assert step == 12
        whole = common.trained(run, adapt)
        assert all(torch.equal(v, whole_v) for v, whole_v in zip(adapter_state_dict(along).values(),
                                                                   adapter_state_dict(whole).values()))


def test_quick_run_writes_its_tables_and_figure(tmp_path):
    results = routers.main(["--quick", "--seeds", "0", "--out", str(tmp_path), "--checkpoints", str(tmp_path)])
    curves = results["curves"]["K2"]
    assert list(curves) == list(routers.METHODS)
    for label, (run,) in curves.items():
        assert run["steps"] == [0, 4, 8, 12] and len(run["seen"]) == 4
        assert bool(run["routing"]) == (label in routers.ROUTED)
    oracle = curves["oracle"][0]["routing"][-1]
    assert oracle["within"] == [1.0, 1.0] and oracle["between"] == [0.0, 0.0]  # its own factors, always
    assert all(0 <= v <= 1 for point in curves["MixLoRA sigmoid"][0]["routing"] for v in point["probe"])
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {label} |" in table for label in routers.METHODS)
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_cached_with_nothing_cached_refuses_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        routers.main(["--cached", "--out", str(tmp_path / "out"), "--checkpoints", str(tmp_path)])
    assert exit_info.value.code == 2 and "no cached runs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # the committed report is not overwritten by an empty one
