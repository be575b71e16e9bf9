"""Tests for the toy suite, the tiny model and train_toy.py (fast, on the CPU)."""

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import toy_tasks
import train_toy
from dataclasses import replace
from functools import partial
from mixlora import MixLoRALinear, add_mixlora, load_adapter_state_dict, load_adapters, read_adapters
from tiny_mllm import TinyMLLM, TinyMLLMConfig, Tokenizer

TOK = Tokenizer(toy_tasks.vocabulary())


def examples(n: int, seed: int = 0) -> list[toy_tasks.Example]:
    return train_toy.training_examples("instruct", seed, 0, n)


def small_model(seed: int = 0) -> TinyMLLM:
    torch.manual_seed(seed)
    return TinyMLLM(train_toy.model_config(len(TOK), quick=True))


# ---- the task suite ---------------------------------------------------------------------------

def test_tasks_are_deterministic_and_cover_all_skills():
    a, b = examples(32, seed=3), examples(32, seed=3)
    assert all((x.image == y.image).all() and (x.prompt, x.answer) == (y.prompt, y.answer) for x, y in zip(a, b))
    assert any((x.image != y.image).any() for x, y in zip(a, examples(32, seed=4)))
    assert len(toy_tasks.TASKS) >= 8
    assert {e.task for e in examples(64)} == set(toy_tasks.TASKS)
    specialist = train_toy.training_examples("instruct", 0, 0, 16, tasks=[toy_tasks.TASKS["count"]])  # --tasks count
    assert {e.task for e in specialist} == {"count"}


def test_every_text_is_in_the_vocabulary_and_heldout_phrasings_are_unseen():
    rng = random.Random(0)
    for task in [*toy_tasks.TASKS.values(), *toy_tasks.HELDOUT_TASKS.values()]:
        assert not set(task.templates) & set(task.heldout_templates)
        for heldout in ([False, True] if task.templates else [True]):
            for _ in range(50):
                e = toy_tasks.sample(task, rng, heldout=heldout)
                assert Tokenizer.UNK not in TOK.encode(e.prompt + " " + e.answer)
                assert TOK.decode(TOK.encode(e.answer)) == e.answer
                assert e.image.shape == (32, 32, 3)
    for _ in range(50):
        e = toy_tasks.sample_caption(rng)
        assert Tokenizer.UNK not in TOK.encode(e.prompt + " " + e.answer)


@pytest.mark.parametrize("task", ["presence", "spatial", "size"])
def test_binary_answers_are_balanced(task):
    rng = random.Random(1)
    answers = [toy_tasks.sample(toy_tasks.TASKS[task], rng).answer for _ in range(400)]
    assert 0.4 < answers.count(answers[0]) / len(answers) < 0.6


# ---- the tiny model ---------------------------------------------------------------------------

def test_shapes_and_loss_on_answer_tokens_only():
    model = small_model()
    batch = examples(6)
    images, tokens, prompt_lens = train_toy.collate(batch, TOK, torch.device("cpu"))
    logits, loss = model(images, tokens, prompt_lens)
    assert logits.shape == (6, tokens.shape[1], len(TOK))
    expected = []
    for n, e in enumerate(batch):  # the answer and its EOS, each predicted from the position before it
        p, a = int(prompt_lens[n]), len(TOK.encode(e.answer)) + 1
        expected.append(F.cross_entropy(logits[n, p - 1:p + a - 1], tokens[n, p:p + a], reduction="sum"))
        assert tokens[n, p + a - 1] == Tokenizer.EOS
    count = sum(len(TOK.encode(e.answer)) + 1 for e in batch)
    torch.testing.assert_close(loss, torch.stack(expected).sum() / count)


def test_routing_ignores_the_answer_tokens():
    model = add_mixlora(small_model(), train_toy.TARGETS, num_factors=8, rank=2)
    for layer in model.modules():
        if isinstance(layer, MixLoRALinear):
            torch.nn.init.normal_(layer.lora_B)
    batch = examples(8)
    images, tokens, prompt_lens = train_toy.collate(batch, TOK, torch.device("cpu"))
    logits, _ = model(images, tokens, prompt_lens)
    routings = [m.last_routing for m in model.modules() if isinstance(m, MixLoRALinear)]
    other = tokens.clone()
    answer = torch.arange(tokens.shape[1]) >= prompt_lens[:, None]
    other[answer] = torch.randint(3, len(TOK), (int(answer.sum()),))
    logits2, _ = model(images, other, prompt_lens)
    for before, m in zip(routings, [m for m in model.modules() if isinstance(m, MixLoRALinear)]):
        assert torch.equal(before.index_a, m.last_routing.index_a)
        assert torch.equal(before.index_b, m.last_routing.index_b)
    prompt = ~answer
    torch.testing.assert_close(logits2[prompt], logits[prompt], rtol=0, atol=0)
    assert not torch.allclose(logits2[answer], logits[answer])


# ---- train_toy.py ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One uninterrupted --quick run (base + LoRA + MixLoRA), shared by the tests below."""
    tmp = tmp_path_factory.mktemp("quick")
    result = train_toy.main(["--quick", "--out", str(tmp / "runs"), "--checkpoints", str(tmp / "ckpt")])
    return tmp, result


def test_quick_run_end_to_end(quick_run):
    tmp, result = quick_run
    report = json.loads((tmp / "runs" / "toy-s0-quick.json").read_text())
    assert [r["label"] for r in report["rows"]] == ["Base (stage 1)", "LoRA", "MixLoRA"]
    for row in report["rows"]:
        assert set(row["accuracy"]) == {"seen", "heldout"}
        assert set(row["accuracy"]["seen"]) == set(toy_tasks.TASKS)
        assert set(row["accuracy"]["heldout"]) == set(toy_tasks.TASKS) | set(toy_tasks.HELDOUT_TASKS)
        assert all(0 <= v <= 100 for split in row["accuracy"].values() for v in split.values())
    table = (tmp / "runs" / "toy-s0-quick.md").read_text()
    assert "| MixLoRA | 16 | 4 |" in table and "| LoRA | - | 4 |" in table
    for row in result["rows"][1:]:  # the adapters learned: B moved away from its zero init
        assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in row["adapters"].items())
        config, saved = read_adapters(tmp / "ckpt" / row["name"])  # and were saved, with what rebuilds them
        assert [group["method"] for group in config["adapters"]] == [row["label"].lower()]
        assert saved.keys() == row["adapters"].keys() and all(torch.equal(saved[k], v) for k, v in row["adapters"].items())
    assert not (tmp / "ckpt" / "base-quick-s0-steps12-bs16-cpu-fp32.ckpt").exists()  # stage 1 done: only the .pt stays


def test_cached_generation_equals_uncached_and_teacher_forcing_and_holds_the_prompts_routing(quick_run):
    tmp, result = quick_run
    model = load_adapters(small_model(), tmp / "ckpt" / result["rows"][2]["name"]).eval()
    layers = [m for m in model.modules() if isinstance(m, MixLoRALinear)]
    seen = {m: [] for m in layers}  # per layer: (positions, S^A, S^B) of every forward
    for m in layers:
        m.register_forward_hook(lambda m, args, out: seen[m].append(
            (args[0].shape[1], m.last_routing.index_a, m.last_routing.index_b)))
    images, prompts, prompt_lens = train_toy.collate(examples(10), TOK, torch.device("cpu"), with_answer=False)
    assert len(set(prompt_lens.tolist())) > 1  # rows of different lengths: right padding in the prompt
    new = 6
    answers = model.generate(images, prompts, prompt_lens, max_new_tokens=new)
    P = model.config.num_patches
    for m in layers:  # one prefill over image + prompt, then one token per step, all routed alike
        (T, a, b), *steps = seen[m]
        assert T == P + prompts.shape[1] and [t for t, _, _ in steps] == [1] * (new - 1)
        assert all(torch.equal(sa, a) and torch.equal(sb, b) for _, sa, sb in steps)
    assert torch.equal(model.generate(images, prompts, prompt_lens, max_new_tokens=new, use_cache=False), answers)
    # Teacher-force the generated answers: the same routing, and the same greedy tokens up to EOS.
    tokens = torch.cat([prompts, torch.zeros_like(answers)], dim=1)
    for n in range(10):
        tokens[n, prompt_lens[n]:prompt_lens[n] + new] = answers[n]
    logits, _ = model(images, tokens, prompt_lens)
    for m in layers:
        assert torch.equal(m.last_routing.index_a, seen[m][0][1]) and torch.equal(m.last_routing.index_b, seen[m][0][2])
    checked = 0
    for n in range(10):
        p = int(prompt_lens[n])
        for i in range(new):
            assert logits[n, p - 1 + i].argmax() == answers[n, i]
            checked += 1
            if answers[n, i] == Tokenizer.EOS:
                break
    assert checked > 10  # more than one token per answer was compared


class Interrupted(Exception):
    pass


def test_resume_reaches_the_uninterrupted_result(quick_run, tmp_path, monkeypatch):
    _, uninterrupted = quick_run
    argv = ["--quick", "--methods", "mixlora", "--out", str(tmp_path / "runs"), "--checkpoints", str(tmp_path / "ckpt")]
    real_save, saves = train_toy.save_atomically, []

    def save_then_crash(write, path):
        real_save(write, path)
        saves.append(path)
        if "mixlora" in path.name and len([p for p in saves if "mixlora" in p.name]) == 5:
            raise Interrupted  # killed right after the 5th stage-2 checkpoint (step 5 of 12)

    monkeypatch.setattr(train_toy, "save_atomically", save_then_crash)
    with pytest.raises(Interrupted):
        train_toy.main(argv)
    monkeypatch.setattr(train_toy, "save_atomically", real_save)
    saved = torch.load(saves[-1], weights_only=True)
    assert saved["step"] == 5
    resumed = train_toy.main(argv + ["--resume"])
    expected, got = uninterrupted["rows"][2]["adapters"], resumed["rows"][1]["adapters"]
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert resumed["rows"][1]["accuracy"] == uninterrupted["rows"][2]["accuracy"]


def test_prefetched_batches_are_the_inline_ones_and_train_alike(tmp_path):
    draw = partial(train_toy.training_batch, "instruct", 0, 6, 0, 1, list(toy_tasks.TASKS.values()))
    inline = [draw(step) for step in range(3, 6)]
    for got, expected in zip(train_toy.prefetch(draw, range(3, 6), workers=2), inline, strict=True):
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    sets = {key: examples[:5] for key, examples in list(train_toy.evaluation_sets(5).items())[:2]}
    keys = [(task, split, i) for task, split in sets for i in (0, 3)]
    fetched = list(train_toy.prefetch(partial(train_toy.evaluation_batch, sets, TOK, 3), keys, workers=1))
    for (task, split, i), got in zip(keys, fetched, strict=True):
        expected = train_toy.collate(sets[task, split][i:i + 3], TOK, torch.device("cpu"), with_answer=False)
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    adapters = []
    for workers in (0, 2):  # drawn in the loop, and by two processes ahead of it: the same adapters
        config = replace(train_toy.quick(train_toy.Config()), steps=3, data_workers=workers)
        model = train_toy.adapt(small_model(), config)
        train_toy.train(model, "instruct", config, tmp_path / f"{workers}.ckpt")
        adapters.append(train_toy.adapter_state_dict(model))
    assert any(v.abs().sum() > 0 for k, v in adapters[0].items() if k.endswith("lora_B"))
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def stage_2_checkpoint_at(step: int, one: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """A --quick MixLoRA run on the CPU stopped at `step`, on the quick run's stage-1 base: its argv and checkpoint."""
    argv = ["--quick", "--methods", "mixlora", "--device", "cpu", "--out", str(tmp_path / "runs"),
            "--checkpoints", str(tmp_path / "ckpt")]
    config, = train_toy.parse_args(argv)
    (tmp_path / "ckpt").mkdir()
    for numerics in ("cpu-fp32", "cuda-bf16"):  # the same cached base under both names: only stage 2 moves
        shutil.copy(one / "ckpt" / "base-quick-s0-steps12-bs16-cpu-fp32.pt",
                    tmp_path / "ckpt" / f"base-quick-s0-steps12-bs16-{numerics}.pt")
    base, _ = train_toy.base_model(config)
    ckpt = tmp_path / "ckpt" / f"{train_toy.run_name(config)}.ckpt"
    train_toy.train(train_toy.adapt(base, config), "instruct", config, ckpt, until=step)
    return argv, ckpt


def test_a_checkpoint_from_a_gpu_resumes_on_the_cpu_with_a_note(quick_run, tmp_path, capsys):
    one, uninterrupted = quick_run
    argv, ckpt = stage_2_checkpoint_at(6, one, tmp_path)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["numerics"] == "cpu-fp32"
    saved["rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)  # as a CUDA run writes it: its GPU's RNG state too
    saved["numerics"] = "cuda-bf16"
    torch.save(saved, ckpt)
    resumed = train_toy.main(argv + ["--resume"])
    out = capsys.readouterr().out
    assert "resumed from" in out and "written with cuda-bf16 and resumes with cpu-fp32" in out
    expected, got = uninterrupted["rows"][2]["adapters"], resumed["rows"][1]["adapters"]
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # the weights, optimizer and step came over


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_cpu_checkpoint_resumes_on_a_gpu(quick_run, tmp_path, capsys):
    one, _ = quick_run
    argv, ckpt = stage_2_checkpoint_at(6, one, tmp_path)
    argv[argv.index("--device") + 1] = "cuda"
    train_toy.main(argv + ["--resume"])  # no KeyError for the CUDA RNG state the CPU run never saved
    out = capsys.readouterr().out
    assert "at step 6/12" in out and "written with cpu-fp32 and resumes with cuda-bf16" in out
    assert torch.load(ckpt, weights_only=True)["step"] == 12


def test_every_adapter_parameter_gets_a_gradient_so_ddp_needs_no_unused_parameter_search():
    config, = train_toy.parse_args(["--quick", "--methods", "mixlora", "--factors", "32", "--rank", "1"])
    model = train_toy.adapt(small_model(), config)
    images, tokens, prompt_lens = train_toy.collate(examples(2), TOK, torch.device("cpu"))
    model(images, tokens, prompt_lens)[1].backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable)
    # 2 instances x rank 1 choose at most 2 of 32 rows: the other rows get zeros, not None.
    pool = model.layers[0].attn.q_proj.lora_A.grad
    assert (pool.abs().sum(1) == 0).sum() >= 30


def test_torchrun_with_two_processes_matches_one_process(quick_run, tmp_path):
    """Two gloo processes, each on half of every global batch, end where one process ends."""
    one, _ = quick_run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_toy.py",
           "--quick", "--device", "cpu", "--out", str(tmp_path / "runs"), "--checkpoints", str(tmp_path / "ckpt")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "runs" / "toy-s0-quick.json").read_text())["processes"] == 2
    base = "base-quick-s0-steps12-bs16-cpu-fp32.pt"
    expected, got = (torch.load(d / base, weights_only=True)["model"] for d in (one / "ckpt", tmp_path / "ckpt"))
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
    for name in ["lora-r4-s0-steps12-quick.ckpt", "mixlora-E16-r4-s0-steps12-quick.ckpt"]:
        expected, got = (torch.load(d / name, weights_only=True) for d in (one / "ckpt", tmp_path / "ckpt"))
        assert got["step"] == expected["step"] == 12
        assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in got["trainable"].items())
        torch.testing.assert_close(got["trainable"], expected["trainable"], rtol=1e-3, atol=1e-4)


def test_torch_compile_traces_the_toy_model_with_mixlora_in_one_graph():
    import torch._dynamo
    torch._dynamo.reset()
    config = replace(train_toy.quick(train_toy.Config()), method="mixlora")
    torch.manual_seed(0)  # one block is enough: every block is the same code
    model = train_toy.adapt(TinyMLLM(TinyMLLMConfig(len(TOK), vision_dim=16, vision_layers=1, d_model=16,
                                                    n_layers=1, n_heads=2)), config)
    explanation = torch._dynamo.explain(model)(*train_toy.collate(examples(4), TOK, torch.device("cpu")))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# ---- experiments/bench.py ----------------------------------------------------------------------------

def test_bench_quick_prints_the_table_and_its_baseline_computes_the_same(capsys):
    from experiments import bench
    rows, ops, generation = bench.main(["--quick"])
    out = capsys.readouterr().out
    assert [(new, name) for new, _, name, _ in generation][:2] == [(4, "uncached"), (4, "KV cache")]
    assert len(generation) == 4 and generation[2][0] > 4 and all(ms > 0 for *_, ms in generation)
    assert "| new tokens | batch | uncached ms | KV cache ms |" in out
    names = [name for _, name, _, _ in rows]
    assert names[:5] == ["base", "LoRA r=8", "MixLoRA E=32 r=8", "MixLoRA E=32 r=8 IFS only", "per-instance ΔW"]
    assert names[5:] == ["LoRA r=4", "MixLoRA E=16 r=4"]
    assert all(ms > 0 and mib >= 0 for _, _, ms, mib in rows)
    assert "| shape (N, T, d) | variant | ms |" in out and "MixLoRA/LoRA" in out and "per-instance ΔW/MixLoRA" in out
    lora, mix = ops["eager"].values()  # aten ops per phase of a step: MixLoRA's routing adds to each
    assert all(0 < lora[phase] < mix[phase] for phase in ("forward", "backward", "AdamW"))
    assert f"| eager | step | {sum(lora.values()):,} | {sum(mix.values()):,} |" in out
    torch.manual_seed(0)  # the authors' formulation, as benchmarked, is the same function as ours
    layer = MixLoRALinear(torch.nn.Linear(12, 10, dtype=torch.float64), 8, 3)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 7, 12, dtype=torch.float64)
    torch.testing.assert_close(bench.per_instance_delta_forward(layer, x), layer(x))


# ---- experiments/analysis.py ---------------------------------------------------------------------------------

def test_interference_is_negative_for_conflicting_tasks_and_positive_for_identical_ones():
    from experiments import analysis
    torch.manual_seed(0)
    # Columns of X orthogonal with XᵀX/n = I: one SGD step scales every example's residual alike.
    X = torch.linalg.qr(torch.randn(64, 5, dtype=torch.float64)).Q * 8
    w = torch.randn(5, dtype=torch.float64)
    theta = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))

    def losses(targets):  # (M tasks, n examples)
        return (X @ theta - targets) ** 2

    # Task 2 wants -w where task 1 wants w: a step on either provably raises the other's loss.
    conflicting = analysis.interference(losses, torch.stack([X @ w, -X @ w]), torch.stack([X @ w, -X @ w]),
                                        {"theta": [theta]}, lr=0.05)["theta"]
    np.testing.assert_allclose(conflicting, [[1 - 0.9 ** 2, 1 - 1.1 ** 2], [1 - 1.1 ** 2, 1 - 0.9 ** 2]])
    identical = analysis.interference(losses, torch.stack([X @ w, X @ w]), torch.stack([X @ w, X @ w]),
                                      {"theta": [theta]}, lr=0.05)["theta"]
    assert (identical > 0).all() and abs(identical[0, 1] - identical[0, 0]) < 1e-12
    assert (theta == 0).all()  # the parameters are put back


def test_gradient_cosine_is_one_for_identical_tasks_minus_one_for_opposite_and_zero_for_orthogonal():
    from experiments import analysis, common
    torch.manual_seed(0)
    X = torch.linalg.qr(torch.randn(64, 4, dtype=torch.float64)).Q * 8  # XᵀX/n = I: ∇L_t ∝ -(target direction)
    e = torch.eye(4, dtype=torch.float64)
    theta_a = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))  # two groups: each its own cosine
    theta_b = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def losses(targets):  # (M tasks, n examples)
        return (X @ torch.cat([theta_a, theta_b]) - targets) ** 2

    # Tasks 0 and 1 want the same w, task 2 wants -w; task 3 wants a direction orthogonal to w
    # in group a and the same as w in group b.
    w, u = e[0] + e[2], e[1] + e[2]
    targets = torch.stack([X @ w, X @ w, -X @ w, X @ u])
    cos = common.gradient_cosines(losses, targets, targets.clone(), {"a": [theta_a], "b": [theta_b]})
    np.testing.assert_allclose(cos["a"], [[1, 1, -1, 0], [1, 1, -1, 0], [-1, -1, 1, 0], [0, 0, 0, 1]], atol=1e-12)
    np.testing.assert_allclose(cos["b"], [[1, 1, -1, 1], [1, 1, -1, 1], [-1, -1, 1, -1], [1, 1, -1, 1]], atol=1e-12)
    summary = analysis.conflict_summary({"toy": {"layer 0 A": cos["a"].round(9)}}, scale=1)  # exact zeros
    assert "| toy | 0 | A | 4/12 | -1.00 | -1.00 | -0.17 | 1.00 |" in summary


def test_alpha_and_lr_flags_set_the_scale_and_name_their_runs():
    config, = train_toy.parse_args(["--quick", "--methods", "mixlora"])
    assert (config.scaling, config.alpha) == (2.0, 8.0)  # α = 2r, this script's default, not mixlora's α = r
    assert train_toy.run_name(config) == "mixlora-E16-r4-s0-steps12-quick"
    config, = train_toy.parse_args(["--quick", "--methods", "mixlora", "--alpha", "32", "--lr", "1e-3"])
    assert (config.scaling, config.alpha) == (8.0, 32.0)
    assert train_toy.run_name(config) == "mixlora-E16-r4-lr0.001-alpha32-s0-steps12-quick"
    assert train_toy.run_name(replace(config, rank=8)) == "mixlora-E16-r8-lr0.001-alpha64-s0-steps12-quick"  # α/r kept
    model = train_toy.adapt(small_model(), config)
    assert {m.scaling for m in model.modules() if isinstance(m, MixLoRALinear)} == {8.0}  # α/r = 2E/r
    config, = train_toy.parse_args(["--quick", "--methods", "mixlora", "--alpha", "8"])
    assert train_toy.run_name(config) == "mixlora-E16-r4-s0-steps12-quick"  # α = 8 = 2r: the default run


def test_router_collapse_is_even_for_uniform_scores_and_one_for_a_saturated_block():
    from experiments import analysis, common
    config, = train_toy.parse_args(["--quick", "--methods", "mixlora"])
    model = train_toy.adapt(small_model(), config)
    examples = [e for batch in analysis.task_batches(4, "collapse-test").values() for e in batch]
    for block, scale in [(model.layers[0], 0.0), (model.layers[1], 1e4)]:
        with torch.no_grad():
            for m in block.modules():
                if isinstance(m, MixLoRALinear):
                    m.router_A.mul_(scale)
    report = common.router_collapse(model, examples)
    r = config.rank
    # Block 0: all-zero logits, p^A = 1/E for every factor: the chosen share evenly.
    assert report["layer 0"]["top1_share"] == pytest.approx(1 / r) and report["layer 0"]["effective_chosen"] == pytest.approx(r)
    assert report["layer 0"]["usage"] == pytest.approx(r)  # ties: every instance the same r factors
    # Block 1: logits x 10^4, the softmax is one-hot: the largest chosen factor has it all.
    assert report["layer 1"]["top1_share"] > 0.99 and report["layer 1"]["effective_chosen"] < 1.05
    assert r < report["layer 1"]["usage"] <= config.factors


def test_pick_lr_takes_the_best_validation_score_and_the_smaller_rate_on_a_tie():
    from experiments import analysis
    assert analysis.pick_lr({5e-4: 60.0, 1e-3: 70.0, 2e-3: 70.0, 4e-3: 65.0}) == 1e-3
    assert analysis.pick_lr({8e-3: 61.0, 2e-3: 60.0}) == 8e-3


def test_tune_picks_on_the_validation_split_only(tmp_path, monkeypatch):
    from experiments import analysis, common
    # Fake training and evaluation: the validation split favours lr 1e-3, the evaluation sets
    # favour 8e-3. A pick that looked at the evaluation sets would choose 8e-3.
    monkeypatch.setattr(common, "trained", lambda config, adapt=None, until=None: config.lr)
    evaluated = []

    def evaluate(lr, tok, sets):
        splits = {split for _, split in sets}
        evaluated.append((lr, splits))
        best = 1e-3 if splits == {"validation"} else 8e-3
        return {split: {task: 90.0 if lr == best else 50.0 for task, s in sets if s == split} for split in splits}

    monkeypatch.setattr(train_toy, "evaluate", evaluate)
    monkeypatch.setattr(common, "router_collapse", lambda model, examples: {
        "layer 0": {"top1_share": 0.5, "effective_chosen": 2.0, "usage": 8.0}})
    results = analysis.main(["tune", "--quick", "--seeds", "0,1", "--out", str(tmp_path), "--checkpoints", str(tmp_path)])
    assert results["picked"] == {label: 1e-3 for label, _ in analysis.TUNED}
    assert sorted(results["table"]) == sorted(f"{label}, lr {lr}" for label, _ in analysis.TUNED
                                              for lr in ("0.001 (tuned)", "0.002"))
    # Validation runs only on the tuning seed; the evaluation sets only for the picked and the default lr.
    assert {lr for lr, splits in evaluated if splits == {"validation"}} == set(analysis.LEARNING_RATES)
    assert {lr for lr, splits in evaluated if splits != {"validation"}} == {1e-3, 2e-3}
    assert len(evaluated) == len(analysis.TUNED) * (5 + 2 * 2)
    # The validation split is new images of the trained tasks on seen templates, none of them an evaluation image.
    validation = train_toy.validation_sets(50)
    assert {task for task, _ in validation} == set(toy_tasks.TASKS)
    evaluation = {e.image.tobytes() for batch in train_toy.evaluation_sets(50).values() for e in batch}
    for (task, _), batch in validation.items():
        seen = [re.sub(r"\\\{\w+\\\}", ".+", re.escape(t)) for t in toy_tasks.TASKS[task].templates]
        assert all(any(re.fullmatch(t, e.prompt) for t in seen) for e in batch)
        assert not evaluation & {e.image.tobytes() for e in batch}


def random_selections(groups: list[list[int]], per_group: int, r: int, seed: int = 0):
    """Multi-hot (len(groups) * per_group, 16): instance of group g picks r factors from groups[g]."""
    rng = np.random.default_rng(seed)
    hot = np.zeros((len(groups) * per_group, 16), dtype=bool)
    for g, allowed in enumerate(groups):
        for n in range(per_group):
            hot[g * per_group + n, rng.choice(allowed, r, replace=False)] = True
    return hot, np.repeat(np.arange(len(groups)), per_group)


def test_tsne_puts_two_separated_clusters_apart():
    from experiments import analysis
    hot, labels = random_selections([list(range(8)), list(range(8, 16))], per_group=40, r=4)
    y = analysis.tsne(analysis.jaccard_distances(hot), perplexity=10, iters=500)
    a, b = y[labels == 0], y[labels == 1]
    radius = max(np.linalg.norm(a - a.mean(0), axis=1).mean(), np.linalg.norm(b - b.mean(0), axis=1).mean())
    assert np.linalg.norm(a.mean(0) - b.mean(0)) > 3 * radius
    euclidean = np.linalg.norm(y[:, None] - y[None], axis=-1)
    assert analysis.knn_purity(euclidean, labels) == 1.0


def test_knn_purity_is_one_for_task_aligned_routing_and_chance_for_random_routing():
    from experiments import analysis
    aligned, labels = random_selections([[2 * t, 2 * t + 1] for t in range(8)], per_group=50, r=2)
    assert analysis.knn_purity(analysis.jaccard_distances(aligned), labels) == 1.0
    random_hot, labels = random_selections([list(range(16))] * 8, per_group=50, r=4, seed=1)
    chance = 49 / 399  # another instance of the same task, among the 399 others
    assert abs(analysis.knn_purity(analysis.jaccard_distances(random_hot), labels) - chance) < 0.03
