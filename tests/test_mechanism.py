"""Tests of mechanism.py's pieces on cases whose answer is known."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from experiments import common, mechanism
from experiments.mechanism import Config
from mixlora import MixLoRALinear

torch.set_num_threads(1)


@pytest.mark.parametrize("method", ["oracle routing", "LoRA specialists r=q"])
def test_oracle_and_specialists_reach_zero_error_where_learnable(method):
    # Every task's ΔW_k is rank q and the oracle gives each task its own q factors: exact fit.
    cfg = Config(steps=150, eval_instances=128, log_every=150)
    assert mechanism.run(method, cfg, seed=0)["error"] < 0.01


@pytest.mark.parametrize("num_tasks,conflict", [(2, 0.0), (2, 0.5), (4, 0.3), (4, 1.0)])
def test_best_single_delta_has_the_closed_form_error(num_tasks, conflict):
    # Least squares over every input dimension, signal dimensions included (s = 2): the offset
    # must not let one linear map do better than κ (1 - 1/K).
    cfg = Config(num_tasks=num_tasks, conflict=conflict, signal=2.0)
    gen = torch.Generator().manual_seed(1)
    _, delta = mechanism.make_tasks(cfg, gen)
    x, _, y = mechanism.sample(cfg, delta, 4000, gen)
    X, Y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    W = torch.linalg.lstsq(X, Y).solution  # (d_in, d_out)
    x2, _, y2 = mechanism.sample(cfg, delta, 4000, gen)
    unexplained = float(((x2.double() @ W - y2) ** 2).sum() / (y2 ** 2).sum())
    expected = conflict * (1 - 1 / num_tasks)
    assert mechanism.single_delta_floor(cfg) == pytest.approx(expected)
    assert unexplained == pytest.approx(expected, abs=0.01)
    # The same floor from the updates themselves, and pairwise cosine 1 - κ, equal energies.
    full_rank = delta.shape[1]
    assert mechanism.rank_floor(delta, full_rank) == pytest.approx(expected, abs=1e-5)
    flat = delta.flatten(1)
    cos = (flat @ flat.T) / flat.norm(dim=1)[:, None] / flat.norm(dim=1)[None, :]
    off = cos[~torch.eye(num_tasks, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, 1 - conflict), atol=1e-5)
    assert torch.allclose(flat.norm(dim=1) ** 2, torch.full((num_tasks,), float(cfg.task_rank)), atol=1e-4)


def test_rank_q_floor_for_disjoint_tasks():
    # κ = 1: M = (1/K) Σ B_k A_k has K·q singular values 1/K; rank q keeps q of them: 1 - 1/K².
    cfg = Config(num_tasks=4, conflict=1.0)
    _, delta = mechanism.make_tasks(cfg, torch.Generator().manual_seed(0))
    assert mechanism.rank_floor(delta, cfg.task_rank) == pytest.approx(1 - 1 / 16, abs=1e-5)
    assert mechanism.rank_floor(delta, 4 * cfg.task_rank) == pytest.approx(0.75, abs=1e-5)


def test_routing_consistency_is_one_for_oracle_and_chance_for_random():
    cfg = Config()
    base, delta = mechanism.make_tasks(cfg, torch.Generator().manual_seed(0))
    x, task, _ = mechanism.sample(cfg, delta, 400, torch.Generator().manual_seed(1))
    oracle = common.OracleRouting(base, cfg.num_tasks, cfg.task_rank, alpha=2 * cfg.task_rank)
    oracle.task = task
    routing = oracle.route(x)
    E = cfg.num_tasks * cfg.task_rank
    assert mechanism.consistency(routing.index_a, task, E) == 1.0
    assert mechanism.distinct_factors(routing.index_b, task, cfg.num_tasks) == E

    random = torch.rand(2000, E, generator=torch.Generator().manual_seed(2)).topk(cfg.task_rank, -1).indices
    task = torch.arange(2000) % cfg.num_tasks
    chance = mechanism.chance_consistency(E, cfg.task_rank)
    assert chance == pytest.approx(12 / 28 * (1 / 3) + 1 / 28 * 1, abs=1e-12)  # E=8, r=2: P(1 shared) = 12/28, P(2) = 1/28
    assert mechanism.consistency(random, task, E) == pytest.approx(chance, abs=0.02)
    same = torch.tensor([[0, 1]]).expand(2000, -1)  # every task the same factors: consistent, not distinct
    assert mechanism.consistency(same, task, E) == 1.0
    assert mechanism.distinct_factors(same, task, cfg.num_tasks) == cfg.task_rank


def test_quick_run_writes_its_table(tmp_path):
    subprocess.run([sys.executable, "-m", "experiments.mechanism", "--quick", "--out", str(tmp_path)], check=True,
                   cwd=Path(__file__).parents[1], capture_output=True)
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:]
            for line in (tmp_path / "table.md").read_text().splitlines() if line.startswith("| ")}
    assert set(mechanism.METHODS) <= rows.keys()
    err = {m: float(rows[m][0].split(" ± ")[0]) for m in mechanism.METHODS}
    # LoRA cannot beat the best linear update of its rank; the oracle is far below it.
    assert err["LoRA r=q"] >= float(rows["LoRA r=q"][1]) - 0.01
    assert err["LoRA r=K·q"] >= float(rows["LoRA r=K·q"][1]) - 0.01
    assert err["oracle routing"] < 0.1 < err["LoRA r=K·q"]
    assert float(rows["oracle routing"][2].split(" ± ")[0]) == 1.0  # routing consistency
    assert Image.open(tmp_path / "routing.png").size[0] > 600


def test_same_seed_same_numbers_other_seed_other_numbers():
    cfg = Config(steps=20, eval_instances=64, log_every=20)
    a, b, c = (mechanism.run("MixLoRA", cfg, seed)["error"] for seed in (0, 0, 1))
    assert a == b != c


def test_collapse_measures_on_known_scores():
    index = torch.tensor([[0, 1], [2, 3]])
    even = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.1, 0.1, 0.4, 0.4]])  # the chosen two share evenly
    taken = torch.tensor([[0.999, 0.001, 0.0, 0.0], [0.0, 0.0, 0.001, 0.999]])  # one takes it all
    assert common.top1_share(even, index) == pytest.approx(0.5)
    assert common.effective_chosen(even, index) == pytest.approx(2.0)
    assert common.top1_share(taken, index) == pytest.approx(0.999)
    assert common.effective_chosen(taken, index) == pytest.approx(1.0, abs=0.01)
    E, r = 8, 2
    spread = torch.rand(4000, E, generator=torch.Generator().manual_seed(0)).topk(r, -1).indices
    assert common.usage_perplexity(spread, E) == pytest.approx(E, abs=0.05)  # every factor as often
    assert common.usage_perplexity(torch.tensor([[3, 5]]).expand(100, -1), E) == pytest.approx(r)


def test_remedy_variants_route_as_they_say():
    cfg = Config()
    base, delta = mechanism.make_tasks(cfg, torch.Generator().manual_seed(0))
    x, _, _ = mechanism.sample(cfg, delta, 16, torch.Generator().manual_seed(1))
    E, q = cfg.num_tasks * cfg.task_rank, cfg.task_rank
    # Renormalised gates: exactly 1 in value, with the gradient of p[S] / Σ p[S].
    torch.manual_seed(0)
    layer = mechanism.RenormalisedGates(base, E, q)
    routing = layer.route(x)
    assert torch.equal(routing.gate_a, torch.ones_like(routing.gate_a))
    u = torch.randn(16, q, generator=torch.Generator().manual_seed(2))
    chosen = routing.p_a.gather(1, routing.index_a)
    expected = torch.autograd.grad(((chosen / chosen.sum(1, keepdim=True)) * u).sum(), layer.router_A, retain_graph=True)[0]
    got = torch.autograd.grad((routing.gate_a * u).sum(), layer.router_A)[0]
    torch.testing.assert_close(got, expected)
    assert got.abs().sum() > 0
    # Sigmoid scores with the CFS softmax kept: p^B = σ(R^B x̄) + λ softmax(c), and S^B its top-r.
    torch.manual_seed(0)
    layer = mechanism.SoftmaxCFS(base, E, q, scores="sigmoid")
    routing = layer.route(x)
    c = MixLoRALinear.cfs_logits(layer, routing.index_a, torch.float32)  # c itself, not the override
    p_b = torch.sigmoid(x.mean(1) @ layer.router_B.T) + torch.softmax(c, -1)
    torch.testing.assert_close(routing.p_b, p_b)
    assert torch.equal(routing.index_b, p_b.topk(q).indices.sort().values)
