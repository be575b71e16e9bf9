"""The experiments' caches cannot go stale: a result is read back only for the config (all of it),
METHOD_VERSION and the rest of what it was computed from; anything else computes it anew.

Training and evaluation are replaced by counters here: what is tested is which calls compute.
"""

from dataclasses import replace

import pytest
import torch

import train_toy
from experiments import common, routers

CONFIG = common.config(quick=True, device="cpu", checkpoints="unused")
# Each changes what a result would be, and none is in the run's name (train_toy.run_name), which
# was the whole cache key before: each of these read back another config's result.
OTHER_SETTINGS = [dict(batch_size=8), dict(base_steps=20), dict(eval_size=4), dict(device="cuda")]
SAME_RESULT = dict(resume=True, out="elsewhere", checkpoints="elsewhere")  # where files go changes no number


@pytest.fixture
def computed(monkeypatch) -> list[str]:
    """The names of the runs trained and evaluated (none is, really)."""
    calls: list[str] = []

    def trained(config, adapt=None, until=None):
        calls.append(train_toy.run_name(config))

    def along(config, adapt, steps):
        calls.append(train_toy.run_name(config))
        return ((step, None) for step in steps)

    monkeypatch.setattr(common, "trained", trained)
    monkeypatch.setattr(routers, "along", along)
    monkeypatch.setattr(train_toy, "evaluate", lambda model, tok, sets: {"seen": {"a": 50.0}, "heldout": {"a": 25.0}})
    return calls


def test_accuracy_and_curve_are_read_back_for_the_same_config(computed, tmp_path):
    first = common.accuracy(CONFIG, {}, "eval8", tmp_path)
    assert first == {"seen": {"a": 50.0}, "heldout": {"a": 25.0}}
    assert common.accuracy(replace(CONFIG, **SAME_RESULT), {}, "eval8", tmp_path) == first
    curve = routers.curve("LoRA r=4", CONFIG, tmp_path, points=2)
    assert curve["seen"] == [50.0] * 3
    assert routers.curve("LoRA r=4", replace(CONFIG, **SAME_RESULT), tmp_path, points=2, train=False) == curve
    assert computed == ["mixlora-E16-r4-s0-steps12-quick", "lora-r4-s0-steps12-quick"]


@pytest.mark.parametrize("changes", OTHER_SETTINGS)
def test_accuracy_and_curve_are_computed_anew_for_another_config(computed, tmp_path, changes):
    other = replace(CONFIG, **changes)
    assert train_toy.run_name(other) == train_toy.run_name(CONFIG)
    common.accuracy(CONFIG, {}, "eval8", tmp_path)
    common.accuracy(other, {}, "eval8", tmp_path)
    routers.curve("LoRA r=4", CONFIG, tmp_path, points=2)
    assert routers.curve("LoRA r=4", other, tmp_path, points=2, train=False) is None  # --cached: not reported
    routers.curve("LoRA r=4", other, tmp_path, points=2)
    assert len(computed) == 4


def test_other_sets_points_or_method_version_compute_anew(computed, tmp_path, monkeypatch):
    common.accuracy(CONFIG, {}, "eval8", tmp_path)
    common.accuracy(CONFIG, {}, "val8", tmp_path)
    routers.curve("LoRA r=4", CONFIG, tmp_path, points=2)
    routers.curve("LoRA r=4", CONFIG, tmp_path, points=3)
    assert len(computed) == 4
    monkeypatch.setattr(common, "METHOD_VERSION", common.METHOD_VERSION + 1)
    common.accuracy(CONFIG, {}, "eval8", tmp_path)
    routers.curve("LoRA r=4", CONFIG, tmp_path, points=2)
    assert len(computed) == 6
    assert len(list((tmp_path / "cache").iterdir())) == 6  # each kept under its own name


def test_a_checkpoint_is_read_back_resumed_or_trained_anew_by_its_recipe_and_method_version(tmp_path, monkeypatch):
    """common.trained: a finished checkpoint is read back, a killed one resumed, and one of another
    recipe or METHOD_VERSION is never touched: its name says what it was trained from."""
    events: list[str] = []

    def train(model, stage, config, ckpt, until=None):
        resumed = config.resume and ckpt.exists()
        events.append("resumed" if resumed else "trained")
        ckpt.parent.mkdir(parents=True, exist_ok=True)  # the first run is killed after one step
        torch.save({"step": config.steps if resumed else 1, "trainable": {}}, ckpt)

    class Model:
        def eval(self):
            return self

    monkeypatch.setattr(common, "untrained", lambda config, adapt: Model())
    monkeypatch.setattr(train_toy, "train", train)
    monkeypatch.setattr(train_toy, "load_trainable_state", lambda model, stage, state: events.append("loaded"))
    config = replace(CONFIG, checkpoints=str(tmp_path))
    for run in (config, config, config, replace(config, batch_size=8)):
        common.trained(run)
    monkeypatch.setattr(common, "METHOD_VERSION", common.METHOD_VERSION + 1)
    common.trained(config)
    assert events == ["trained", "resumed", "loaded", "trained", "trained"]
