"""Tests of the conflict knob (toy_tasks.conflict_tasks) and of conflict.py, on known answers."""

import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

import toy_tasks
import train_toy
from experiments import common, conflict
from experiments.common import OracleRouting
from tiny_mllm import TinyMLLM, Tokenizer

TOK = Tokenizer(toy_tasks.vocabulary())


def mapping(task: toy_tasks.Task, n: int = 300) -> dict[str, str]:
    """Colour of the drawn shape (read from the caption) -> the task's answer; must be a function."""
    pairs = {}
    for i in range(n):
        _, caption, _, answer = task.draw(random.Random(f"map-{task.name}-{i}"))
        colour = next(w for w in caption.split() if w in toy_tasks.COLOURS)
        assert pairs.setdefault(colour, answer) == answer
    return pairs


@pytest.mark.parametrize("num_tasks", [2, 4, 6])
@pytest.mark.parametrize("kappa", [0.0, 0.5, 1.0])
def test_the_tasks_disagree_on_a_fraction_kappa_of_the_images(num_tasks, kappa):
    tasks = toy_tasks.conflict_tasks(num_tasks, kappa)
    assert list(tasks) == toy_tasks.CONFLICT_WORDS[:num_tasks]
    maps = [mapping(t) for t in tasks.values()]
    colours = list(toy_tasks.COLOURS)
    assert all(sorted(m) == sorted(colours) and set(m.values()) <= set(colours) for m in maps)
    for j in range(num_tasks):
        for k in range(j + 1, num_tasks):
            assert sum(maps[j][c] != maps[k][c] for c in colours) / len(colours) == kappa
    assert maps[0] == {c: c for c in colours}  # the first task is the plain colour question


def test_the_task_word_is_in_every_prompt_and_every_word_in_the_vocabulary():
    for name, task in toy_tasks.conflict_tasks(6, 0.5).items():
        for heldout in (False, True):
            e = toy_tasks.sample(task, random.Random(0), heldout=heldout)
            assert e.prompt.split()[0] == name and Tokenizer.UNK not in TOK.encode(e.prompt + " " + e.answer)
            templates = task.heldout_templates if heldout else task.templates
            assert any(re.fullmatch(re.escape(t).replace(r"\{w\}", name), e.prompt) for t in templates)
        assert not set(task.templates) & set(task.heldout_templates)


@pytest.mark.parametrize("num_tasks, kappa, message", [(7, 1.0, "num_tasks"), (4, 0.3, "multiple of 1/6"),
                                                       (4, 1.5, "multiple of 1/6")])
def test_bad_knob_values_raise(num_tasks, kappa, message):
    with pytest.raises(ValueError, match=message):
        toy_tasks.conflict_tasks(num_tasks, kappa)


def test_oracle_gives_each_task_its_own_factors_in_training_and_generation():
    torch.manual_seed(0)
    model = TinyMLLM(train_toy.model_config(len(TOK), quick=True))
    config = train_toy.Config(method="oracle", rank=3, conflict=(4, 1.0))
    common.add_oracle(model, config)
    tasks = list(train_toy.suite(config).values())
    examples = [toy_tasks.sample(tasks[k], random.Random(i)) for i, k in enumerate([2, 0, 3, 1, 2])]
    expected = torch.tensor([[3 * k + j for j in range(3)] for k in [2, 0, 3, 1, 2]])
    layers = [m for m in model.modules() if isinstance(m, OracleRouting)]
    assert len(layers) == 6 * 2 and all(m.num_factors == 12 for m in layers)
    model(*train_toy.collate(examples, TOK, torch.device("cpu")))
    assert all(torch.equal(m.last_routing.index_a, expected) and torch.equal(m.last_routing.index_b, expected)
               for m in layers)
    model.generate(*train_toy.collate(examples[::-1], TOK, torch.device("cpu"), with_answer=False), max_new_tokens=3)
    assert all(m.held is None for m in layers)  # generate's routing_mask has ended and given back
    assert all(torch.equal(m.last_routing.index_a, expected.flip(0)) for m in layers)  # the prefill, routed by task


def test_d_prime_is_the_centroid_distance_in_units_of_the_spread():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (4000, 16)), rng.normal(0, 1, (4000, 16)) + 3 * np.eye(16)[0]])
    labels = np.repeat([0, 1], 4000)
    assert conflict.d_prime(x, labels) == pytest.approx(3, abs=0.1)
    assert conflict.d_prime(x * 5, labels) == pytest.approx(3, abs=0.1)  # units of the spread
    assert conflict.d_prime(rng.normal(0, 1, (8000, 16)), labels) < 0.2  # no signal


def test_quick_run_writes_its_tables_and_figure(tmp_path):
    results = conflict.main(["--quick", "--seeds", "0,1", "--out", str(tmp_path), "--checkpoints", str(tmp_path)])
    assert list(results["runs"]) == ["2,0", "2,1"]
    for point in results["runs"].values():
        assert list(point) == list(conflict.METHODS)
        for runs in point.values():
            assert len(runs) == 2 and all(sorted(r["seen"]) == sorted(r["heldout"]) == ["house", "tree"] for r in runs)
    for point in results["cosine"].values():
        for cos in point.values():
            assert -1 <= cos["off_diagonal_min"] <= cos["off_diagonal"] <= 1 and -1 <= cos["diagonal"] <= 1
    for point in results["separation"].values():
        assert [r["within"] for r in point["MixLoRA oracle routing"]] == [1.0, 1.0]  # its own factors, always
        assert [r["between"] for r in point["MixLoRA oracle routing"]] == [0.0, 0.0]  # and no other task's
    for by_signal in results["prediction"].values():  # mechanism.py's oracle fits where LoRA r=q cannot (κ = 1)
        assert list(by_signal) == ["s=2", "s=0.5"] and all(max(p["oracle routing"]) < 0.1 for p in by_signal.values())
    assert min(results["prediction"]["2,1"]["s=2"]["LoRA r=q"]) > 0.4
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n| 2 | 0 | ") == table.count("\n| 2 | 1 | ") == 8  # a row in each of the seven tables, two in the prediction's
    assert Image.open(tmp_path / "gap.png").size[0] > 600
