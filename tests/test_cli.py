"""Every command line refuses bad input in one line that names the flag, exit code 2, before any work."""

import importlib

import pytest
import torch

NO_CUDA = [] if torch.cuda.is_available() else [("--device", "cuda")]
# (module, function, leading arguments): each function parses first and exits on a bad argument.
ENTRY_POINTS = {
    "train_toy.py": ("train_toy", "parse_args", []),
    "experiments/analysis.py": ("experiments.analysis", "main", ["sweep"]),
    "experiments/mechanism.py": ("experiments.mechanism", "main", []),
    "experiments/bench.py": ("experiments.bench", "main", []),
    "experiments/conflict.py": ("experiments.conflict", "main", []),
    "experiments/routers.py": ("experiments.routers", "main", []),
    "hf/finetune_vlm.py": ("hf.finetune_vlm", "parse_args", ["--out", "runs/x", "--model", "m", "--data", "d.json"]),
    "hf/count_7b.py": ("hf.count_7b", "parse_args", []),
    "hf/qlora_bench.py": ("hf.qlora_bench", "main", []),
}
NEEDS = {"hf/finetune_vlm.py": "transformers", "hf/count_7b.py": "transformers",  # optional: skip without them
         "hf/qlora_bench.py": "transformers"}
BAD = {  # every numeric and device flag of every entry point, with values out of range
    "train_toy.py": [("--rank", "0"), ("--factors", "0"), ("--steps", "0"), ("--base-steps", "-5"),
                     ("--batch-size", "0"), ("--lr", "-1"), ("--lr", "0"), ("--lr", "nan"), ("--alpha", "-1"),
                     ("--alpha", "0"), ("--seed", "-1"), ("--eval-size", "0"), ("--steps", "ten"),
                     ("--device", "tpu"), ("--methods", "dora"), ("--tasks", "colour,juggling"),
                     ("--scores", "softmax2"), ("--data-workers", "-1")] + NO_CUDA,
    "experiments/analysis.py": [("--seeds", "0,-1"), ("--seeds", "0,x"), ("--tune-seeds", "-2"), ("--interference-lr", "0"),
                    ("--steps", "0"), ("--eval-size", "-1"), ("--device", "tpu")] + NO_CUDA,
    "experiments/mechanism.py": [("--seeds", "-1"), ("--seeds", "one")],
    "experiments/bench.py": [("--factors", "0"), ("--rank", "0"), ("--repeats", "0"), ("--device", "tpu"),
                         ("--dtype", "fp8")] + NO_CUDA,
    "experiments/conflict.py": [("--num-tasks", "7"), ("--num-tasks", "1"), ("--seeds", "-1"), ("--steps", "0"),
                    ("--threads", "0"), ("--device", "tpu")] + NO_CUDA,
    "experiments/routers.py": [("--cells", "K9"), ("--methods", "LoRA r=4,magic"), ("--seeds", "-1"), ("--steps", "0"),
                               ("--points", "0"), ("--threads", "0"), ("--device", "tpu")] + NO_CUDA,
    "hf/finetune_vlm.py": [("--factors", "0"), ("--rank", "0"), ("--alpha", "0"), ("--lr", "-1"), ("--lr", "inf"),
                          ("--dropout", "-0.1"), ("--dropout", "1"), ("--epochs", "0"), ("--steps", "0"),
                          ("--batch-size", "0"), ("--grad-accum", "0"), ("--seed", "-1"), ("--max-new-tokens", "0"),
                          ("--method", "dora"), ("--scores", "softmax2"), ("--device", "tpu")] + NO_CUDA,
    "hf/count_7b.py": [("--factors", "0"), ("--rank", "0"), ("--rank", "two")],
    "hf/qlora_bench.py": [("--steps", "0"), ("--bases", "float32,fp8")],
}
CASES = [(entry, flag, value) for entry, flags in BAD.items() for flag, value in flags]


@pytest.mark.parametrize("entry, flag, value", CASES, ids=[f"{e} {f} {v}" for e, f, v in CASES])
def test_bad_input_is_one_line_that_names_the_flag(entry, flag, value, capsys):
    if entry in NEEDS:
        pytest.importorskip(NEEDS[entry])
    module, function, leading = ENTRY_POINTS[entry]
    with pytest.raises(SystemExit) as exit_info:
        getattr(importlib.import_module(module), function)(leading + [flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert f"argument {flag}" in err and value.split(",")[-1] in err


@pytest.mark.parametrize("entry, argv, says", [
    ("train_toy.py", ["--rank", "8", "--factors", "4"], "expected E >= --rank 8"),
    ("experiments/bench.py", ["--rank", "8", "--factors", "4"], "expected E >= --rank 8"),
    ("hf/finetune_vlm.py", ["--rank", "8", "--factors", "4"], "expected E >= --rank 8"),
    ("hf/finetune_vlm.py", ["--batch-size", "6", "--grad-accum", "4"], "must divide evenly into 4 micro-batches"),
    ("hf/count_7b.py", ["--rank", "8", "--factors", "4"], "expected E >= --rank 8"),
])
def test_flags_that_must_agree(entry, argv, says, capsys):
    if entry in NEEDS:
        pytest.importorskip(NEEDS[entry])
    module, function, leading = ENTRY_POINTS[entry]
    with pytest.raises(SystemExit) as exit_info:
        getattr(importlib.import_module(module), function)(leading + argv)
    assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_every_entry_point_is_covered():
    import pathlib
    root = pathlib.Path(__file__).parents[1]
    scripts = {p.relative_to(root).as_posix() for p in root.rglob("*.py")
               if not p.name.startswith("test_") and 'if __name__ == "__main__"' in p.read_text()}
    assert scripts == set(ENTRY_POINTS) == set(BAD)
