"""Tests of experiments/routers.py: the routers and remedies on cases with a known answer, the
diagnostics, and that a curve along one schedule is the uninterrupted run."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn

import toy_tasks
import train_toy
import mixlora
from experiments import common, routers
from mixlora import LoRALinear, MixLoRALinear, adapter_state_dict
from tiny_mllm import TinyMLLM, answer_mask

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
    found = mixlora.k_means(x, 3, 20, torch.Generator().manual_seed(1))
    assert torch.cdist(centres, found).min(1).values.max() < 0.5  # every centre found
    assert routers.probe(x.numpy(), labels.numpy()) == 1.0
    noise = torch.randn(300, 8, dtype=F64, generator=gen).numpy()
    assert routers.probe(noise, labels.numpy()) < 0.55  # chance is 1/3


def test_nmi_and_explained_variance_on_labellings_with_a_known_answer():
    a = np.arange(600) % 6
    assert routers.nmi(a, a) == pytest.approx(1.0) and routers.nmi(a, (a + 1) % 6) == pytest.approx(1.0)
    assert routers.nmi(a, np.arange(600) // 100 % 5) == pytest.approx(0.0, abs=0.02)  # nearly independent
    assert routers.nmi(np.arange(4) % 2, np.arange(4) // 2) == 0.0  # exactly crossed
    gen = torch.Generator().manual_seed(0)
    x = torch.eye(6, 3, dtype=F64)[a]  # determined by the group
    assert routers.explained(x, a) == pytest.approx(1.0)
    noisy = x + torch.randn(600, 3, dtype=F64, generator=gen)
    # x's variance is 3 · (1/6)(5/6) ≈ 0.42 beside the noise's 3, and the noise's group means add 5/600 of its 3:
    assert routers.explained(noisy, a) == pytest.approx((0.417 + 0.025) / 3.417, abs=0.03)
    assert routers.explained(torch.randn(600, 3, dtype=F64, generator=gen), a) < 0.03


def test_fitted_keeps_what_the_instruction_predicts_and_drops_what_varies_within_it():
    # 12 instructions; U = a per-instruction update plus per-instance noise of twice its size.
    gen = torch.Generator().manual_seed(0)
    instruction = torch.arange(1200) % 12
    X = torch.eye(12, dtype=F64)[instruction] + 0.01 * torch.randn(1200, 12, dtype=F64, generator=gen)
    per_instruction = torch.randn(12, 40, dtype=F64, generator=gen)
    U = per_instruction[instruction] + 2 * torch.randn(1200, 40, dtype=F64, generator=gen)
    features = mixlora.fitted(X, U @ U.T, m=12)  # (n, 12)
    truth = per_instruction[instruction] - per_instruction[instruction].mean(0)
    error = lambda gram: float((gram - truth @ truth.T).norm() / (truth @ truth.T).norm())
    centred = U - U.mean(0)
    assert error(features @ features.T) < 0.25 < 2.0 < error(centred @ centred.T)  # the noise is gone (but its group means)
    assert routers.nmi(torch.cdist(features, features[:12]).argmin(1).numpy(), instruction.numpy()) == 1.0
    W = torch.randn(12, 3, dtype=F64, generator=gen)
    torch.testing.assert_close(mixlora.ridge(X, X @ W), W, rtol=0, atol=0.05)  # the map, up to the ridge


def test_answer_update_gram_is_the_gradient_of_a_linear_image_to_logits_map(tmp_path):
    config = replace(train_toy.quick(train_toy.Config(checkpoints=str(tmp_path))), conflict=(2, 1.0), method="mixlora")
    model = common.untrained(config).eval()
    examples = train_toy.training_examples("test", 0, 0, 6, tasks=train_toy.training_tasks(config))
    images, tokens, prompt_lens = train_toy.collate(examples, train_toy.TOK, torch.device("cpu"))
    gram = routers.answer_update_gram(model, images, tokens, prompt_lens)
    with torch.no_grad():
        logits, _ = model(images, tokens, prompt_lens)
        v = model.encode_images(images).mean(1).double()
    v = v - v.mean(0)
    grads = []
    for i in range(len(examples)):  # written out: ∂/∂M of instance i's summed answer loss at M = 0
        M = torch.zeros(logits.shape[-1], v.shape[1], dtype=F64, requires_grad=True)
        z = logits[i, :-1].double() + M @ v[i]  # (L - 1, vocab)
        ce = nn.functional.cross_entropy(z, tokens[i, 1:], reduction="none")
        (ce * answer_mask(tokens, prompt_lens)[i]).sum().backward()
        grads.append(M.grad.flatten())
    G = torch.stack(grads)
    torch.testing.assert_close(gram, G @ G.T, rtol=1e-9, atol=1e-12)


def test_update_kmeans_routes_instances_of_one_cluster_alike(tmp_path):
    # The start's targets come from one clustering for every layer: at step 0 two instances of one
    # task then share more of their selections than two of different tasks, in the first block.
    config = replace(train_toy.quick(train_toy.Config(checkpoints=str(tmp_path))), conflict=(2, 1.0))
    changes, adapt = routers.METHODS["instruction-only + update k-means; frozen"]
    model = common.untrained(replace(config, **changes), adapt)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".router_" in n)
    tasks = list(train_toy.suite(config).values())
    report = routers.diagnose(model.eval(), tasks, 32, None)
    assert report["within"][0] - report["between"][0] > 0.2


def test_instruction_words_route_on_the_words_alone_the_same_x_bar_in_every_layer(tmp_path):
    # x̄ is the mean embedding of the instruction's tokens: another image (and so every deeper
    # layer's input) changes no selection, a changed word does, and the plain MixLoRA layer's does move.
    config = replace(train_toy.quick(train_toy.Config(checkpoints=str(tmp_path))), conflict=(2, 1.0))
    changes, adapt = routers.METHODS["instruction words"]
    model = common.untrained(replace(config, **changes), adapt).eval()
    layers = [m for m in model.modules() if isinstance(m, routers.InstructionWords)]
    assert layers and all(m.router_A.shape == (m.num_factors, model.config.d_model) for m in layers)
    tasks = list(train_toy.suite(config).values())
    examples = [e for t in tasks for e in toy_tasks.samples(t, 8, f"words-{t.name}")]
    images, tokens, lens = train_toy.collate(examples, train_toy.TOK, "cpu", with_answer=False)

    def chosen(images: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            model(images, tokens, lens)
        return [torch.cat([m.last_routing.index_a, m.last_routing.index_b], 1) for m in layers]

    before = chosen(images, tokens)
    in_prompt = torch.arange(tokens.shape[1]) < lens[:, None]
    x_bar = common.masked_mean(model.embed(tokens), in_prompt)  # (N, d_model)
    expected = (x_bar @ layers[0].router_A.T).sigmoid().topk(layers[0].rank).indices.sort(1).values
    assert torch.equal(before[0][:, :layers[0].rank], expected)
    assert all(torch.equal(a, b) for a, b in zip(before, chosen(images.flip(0), tokens)))
    other = tokens.clone()
    other[:, 0] = train_toy.TOK.stoi[tasks[1].name]  # the task word, the instruction's first token
    assert any(not torch.equal(a, b) for a, b in zip(before, chosen(images, other)))
    plain = common.untrained(replace(config, method="mixlora")).eval()
    first = next(m for m in plain.modules() if isinstance(m, MixLoRALinear))
    with torch.no_grad():
        plain(images, tokens, lens)
        s = first.last_routing.index_a.clone()
        plain(images.flip(0), tokens, lens)
    assert not torch.equal(s, first.last_routing.index_a)
    with pytest.raises(ValueError, match="IFS only"):
        routers.InstructionWords(nn.Linear(4, 3), 4, 2, d_words=8)


def test_instruction_words_update_start_separates_the_tasks_in_every_block(tmp_path):
    # The layer-input update start separates the tasks in block 0 only (`signal`: deeper inputs are
    # mostly the image); on the words every block reads the same x̄, fitted to the same target.
    config = replace(train_toy.quick(train_toy.Config(checkpoints=str(tmp_path))), conflict=(2, 1.0))
    changes, adapt = routers.METHODS["instruction words + update k-means; frozen"]
    model = common.untrained(replace(config, **changes), adapt)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".router_" in n)
    report = routers.diagnose(model.eval(), list(train_toy.suite(config).values()), 32, None)
    gaps = np.subtract(report["within"], report["between"])
    assert len(gaps) == len(model.layers) and (gaps > 0.2).all() and np.ptp(gaps) < 1e-9


def test_known_words_routing_ignores_words_the_fit_never_saw(tmp_path):
    # known=True: x̄ is the mean embedding of the words of the start's prompts only, so a word no
    # training prompt used moves no selection; without it, the same word does. An instruction of
    # unknown words only falls back to all its words.
    config = replace(train_toy.quick(train_toy.Config(checkpoints=str(tmp_path))), conflict=(2, 1.0))
    tasks = list(train_toy.suite(config).values())
    examples = [e for t in tasks for e in toy_tasks.samples(t, 8, f"known-{t.name}")]
    images, tokens, lens = train_toy.collate(examples, train_toy.TOK, "cpu", with_answer=False)
    unseen = train_toy.TOK.stoi["tell"]  # a word of the held-out phrasings only
    with_unseen = torch.cat([torch.full((len(tokens), 1), unseen), tokens], 1)  # "tell" before each prompt

    def chosen(label: str, tokens: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        changes, adapt = routers.METHODS[label]
        model = common.untrained(replace(config, **changes), adapt).eval()
        with torch.no_grad():
            model(images, tokens, lens)
        layer = next(m for m in model.modules() if isinstance(m, routers.InstructionWords))
        return layer, torch.cat([layer.last_routing.index_a, layer.last_routing.index_b], 1)

    layer, before = chosen("words + update k-means + known words; frozen", tokens, lens)
    assert not layer.known[unseen] and layer.known[tokens[0, 0]]
    assert torch.equal(chosen("words + update k-means + known words; frozen", with_unseen, lens + 1)[1], before)
    _, plain = chosen("instruction words + update k-means; frozen", tokens, lens)
    assert not torch.equal(chosen("instruction words + update k-means; frozen", with_unseen, lens + 1)[1], plain)
    only_unseen = torch.full((2, 3), unseen)
    x = torch.randn(2, 3, 8)
    layer.embedded, layer.tokens = x, only_unseen
    torch.testing.assert_close(layer.x_bar(None, torch.ones(2, 3, dtype=torch.bool)), x.mean(1))


def test_universal_factors_are_chosen_for_every_instance():
    torch.manual_seed(0)
    layer = routers.UniversalWords(nn.Linear(6, 5), 8, 4, d_words=3, universal=2, conditional=False,
                                   scores="sigmoid")
    layer.embedded, layer.tokens = torch.randn(50, 4, 3), torch.zeros(50, 4, dtype=torch.long)
    routing = layer.route(torch.randn(50, 4, 6), torch.ones(50, 4, dtype=torch.bool))
    for index in (routing.index_a, routing.index_b):
        assert (index[:, :2] == torch.tensor([0, 1])).all()  # the universal ones, first in canonical order
        assert len(torch.unique(index[:, 2:], dim=0)) > 1  # the other two are routed: they differ
    with pytest.raises(ValueError, match="scores must be 'sigmoid'"):
        routers.UniversalWords(nn.Linear(6, 5), 8, 4, d_words=3, universal=2, conditional=False)


def test_arrow_routes_by_the_top_right_singular_vector_of_each_factor_less_the_mean():
    # Written out: v_e is the unit vector that (ΔW_e − mean_f ΔW_f) stretches most; an x̄ along v_e
    # (and orthogonal to the others) scores e highest, whatever its sign.
    torch.manual_seed(0)
    E, r, d = 4, 1, 6
    trained = MixLoRALinear(nn.Linear(d, 5, dtype=F64), E, r, conditional=False)
    with torch.no_grad():
        trained.lora_A.copy_(torch.eye(E, d, dtype=F64) * torch.tensor([[2.0], [2.5], [3.0], [3.5]], dtype=F64))
        trained.lora_B.copy_(torch.eye(5, E, dtype=F64))
    arrow = routers.ArrowRouting(trained)
    with torch.no_grad():
        delta = torch.stack([torch.outer(trained.lora_B[:, e], trained.lora_A[e]) for e in range(E)])
        delta = delta - delta.mean(0)
    for e in range(E):
        v = arrow.prototypes[e].double()
        assert torch.linalg.vector_norm(delta[e] @ v) == pytest.approx(float(torch.linalg.matrix_norm(delta[e], 2)), rel=1e-6)
    x = torch.zeros(E, 1, d)
    x[torch.arange(E), 0, torch.arange(E)] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # instance e along a_e, either sign
    signs = torch.sign(arrow.prototypes[torch.arange(E), torch.arange(E)])
    assert (arrow.prototypes[torch.arange(E), torch.arange(E)].abs() > 0.5).all() and signs.abs().min() == 1
    assert torch.equal(arrow.route(x).index_a[:, 0], torch.arange(E))
    assert arrow.lora_A is trained.lora_A and arrow.lora_B is trained.lora_B  # the trained factors themselves


def test_heldout_routing_of_the_oracle_is_its_tasks(tmp_path):
    config = replace(train_toy.quick(train_toy.Config(checkpoints=str(tmp_path))), conflict=(2, 1.0))
    changes, adapt = routers.METHODS["oracle"]
    model = common.untrained(replace(config, **changes), adapt).eval()
    report = routers.diagnose(model, list(train_toy.suite(config).values()), 8, None)
    assert report["heldout_within"] == [1.0, 1.0] and report["heldout_between"] == [0.0, 0.0]
    changes, adapt = routers.METHODS["MixLoRA sigmoid"]
    model = common.untrained(replace(config, **changes), adapt).eval()
    report = routers.diagnose(model, list(train_toy.suite(config).values()), 8, None)
    assert all(0 < w < 1 for w in report["heldout_within"])


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
