"""Benchmark: what does a MixLoRA layer cost next to a LoRA layer of the same rank?

Measures, side by side in one run, forward + backward of one adapted linear layer (the frozen
base included, the input requiring grad as it does mid-network) for: the base alone, LoRA,
MixLoRA (batched gathers + bmm, with and without CFS), and the per-instance-ΔW formulation of
the authors' released code (build ΔW_n = B_n A_n per instance, then matmul). Then a whole
training step of the tiny model with LoRA vs MixLoRA, and its greedy generation with the KV
cache vs re-reading the whole sequence at every step. Prints median times, memory, ratios.

    python -m experiments.bench                              # CPU, fp32
    python -m experiments.bench --device cuda --dtype bf16   # GPU: CUDA events, bf16 autocast
    python -m experiments.bench --quick                      # a seconds-long smoke run
    python -m experiments.bench --only generation            # just the generation table
    python -m experiments.bench --only tiny --compile        # the tiny model's step, eager and compiled (minutes)
    python -m experiments.bench --only data                  # the share of a step spent waiting for data

Memory: on a GPU, the peak allocated during the step; on the CPU (no allocator statistics),
the bytes of the tensors autograd saves for backward, each storage counted once (not measured for
compiled steps). Operators: the aten ops torch.profiler records in one training step of the tiny
model (nested ones included), by phase: on a GPU a model of width 128 is bound by their launches.
"""

import math
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

import cli
import train_toy
from mixlora import LoRALinear, MixLoRALinear
from tiny_mllm import TinyMLLM
from train_toy import TOK, Config

USER_SHAPES = [(16, 128, 1024), (8, 256, 2048), (4, 512, 4096)]  # (N, T, d), d_in = d_out = d


def per_instance_delta_forward(layer: MixLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The released code's formulation: materialise ΔW_n (N, d_out, d_in), then one bmm with it."""
    routing = layer.route(x)
    A, B = layer.factors(routing)  # (N, r, d_in), (N, r, d_out)
    w = (routing.gate_a * routing.gate_b).to(A.dtype)  # (N, r)
    delta = layer.scaling * torch.bmm((B * w[..., None]).transpose(1, 2), A)  # (N, d_out, d_in)
    return layer.base(x) + torch.bmm(layer.dropout(x), delta.transpose(1, 2).to(x.dtype))


def wall_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def memory_mib(fn, device: torch.device, params: list[torch.Tensor]) -> float:
    """Peak allocated on a GPU; on the CPU, the bytes autograd saves for backward (params excluded)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    storages: dict[int, int] = {}
    skip = {p.untyped_storage().data_ptr() for p in params}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in skip:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / 2**20


def measure(fns: dict[str, Callable[[], None]], device: torch.device, repeats: int,
            params: list[torch.Tensor], no_memory: Sequence[str] = ()) -> dict[str, tuple[float, float]]:
    """Median ms and MiB (nan for the variants in no_memory) of each variant. Rounds interleave the
    variants, so that a change in the machine's load hits all of them alike."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(wall_ms(fn, device))
    return {name: (statistics.median(times[name]), math.nan if name in no_memory else memory_mib(fn, device, params))
            for name, fn in fns.items()}


def layer_rows(N: int, T: int, d: int, E: int, r: int, device: torch.device, dtype: str, repeats: int) -> list[tuple]:
    torch.manual_seed(0)
    base = nn.Linear(d, d, device=device).requires_grad_(False)
    lora = LoRALinear(base, r)
    mix = MixLoRALinear(base, E, r)
    ifs = MixLoRALinear(base, E, r, conditional=False)
    for layer in (lora, mix, ifs):
        nn.init.normal_(layer.lora_B, std=0.01)
    x = torch.randn(N, T, d, device=device, requires_grad=True)
    grad = torch.randn(N, T, d, device=device)
    cast = train_toy.autocast(device, dtype == "bf16")

    def step(forward):
        def run():
            with cast:
                y = forward(x)
            y.backward(grad.to(y.dtype))
            x.grad = None
            for p in (*lora.parameters(), *mix.parameters(), *ifs.parameters()):
                p.grad = None
        return run

    variants = [("base", base), (f"LoRA r={r}", lora), (f"MixLoRA E={E} r={r}", mix),
                (f"MixLoRA E={E} r={r} IFS only", ifs), ("per-instance ΔW", lambda x: per_instance_delta_forward(mix, x))]
    params = [*lora.parameters(), *mix.parameters(), *ifs.parameters()]
    results = measure({name: step(fn) for name, fn in variants}, device, repeats, params)
    return [((N, T, d), name, *results[name]) for name, _ in variants]


def tiny_model_steps(device: torch.device, dtype: str, quick: bool, compiled: bool = False) -> dict[str, tuple]:
    """A stage-2 training step of the toy model for LoRA and MixLoRA, each as (forward, backward, AdamW step)
    closures over its own model and one fixed batch; compiled: the model through torch.compile."""
    config = train_toy.quick(Config()) if quick else Config()
    batch = train_toy.collate(train_toy.training_examples("instruct", 0, 0, config.batch_size), TOK, device)
    cast = train_toy.autocast(device, dtype == "bf16")
    steps = {}
    for method in ("lora", "mixlora"):
        torch.manual_seed(0)
        model = TinyMLLM(train_toy.model_config(len(TOK), quick)).to(device)
        model = train_toy.adapt(model, replace(config, method=method))
        forward = torch.compile(model) if compiled else model
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        loss = []

        def forward_pass(forward=forward, loss=loss):
            with cast:
                loss[:] = [forward(*batch)[1]]

        def backward(loss=loss, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss.pop().backward()

        name = f"LoRA r={config.rank}" if method == "lora" else f"MixLoRA E={config.factors} r={config.rank}"
        steps[name] = (forward_pass, backward, opt.step, list(model.parameters()))
    return steps


def tiny_model_rows(device: torch.device, dtype: str, repeats: int, quick: bool, compile: bool) -> list[tuple]:
    """A whole stage-2 training step of the toy model (forward, backward, AdamW), eager (and compiled)."""
    batch_size = (train_toy.quick(Config()) if quick else Config()).batch_size
    fns, params = {}, []
    for suffix in ("", ", compiled") if compile else ("",):
        for name, (*phases, model_params) in tiny_model_steps(device, dtype, quick, compiled=bool(suffix)).items():
            fns[f"tiny model, batch {batch_size}{suffix}", name] = lambda phases=phases: [f() for f in phases]
            params += model_params
    results = measure(fns, device, repeats, params, no_memory=[key for key in fns if key[0].endswith("compiled")])
    return [(shape, name, *results[shape, name]) for shape, name in fns]


def op_counts(device: torch.device, dtype: str, quick: bool, compiled: bool = False) -> dict[str, dict[str, int]]:
    """The aten ops torch.profiler records in each phase of one training step (after a warm-up step)."""
    counts = {}
    for name, (*phases, _) in tiny_model_steps(device, dtype, quick, compiled).items():
        for phase in phases:
            phase()
        counts[name] = {}
        for label, phase in zip(("forward", "backward", "AdamW"), phases):
            with torch.profiler.profile() as prof:
                phase()
            counts[name][label] = sum(e.name.startswith("aten::") for e in prof.events())
    return counts


def data_wait(device: torch.device, steps: int = 30) -> None:
    """train_toy's stage-2 loop (MixLoRA, from a random base) for `steps` steps, its batches drawn inline
    (as before the loader) and by the workers it starts by default (at least one): the log's last line
    says which share of the time the loop spent waiting for data."""
    for workers in (0, max(1, train_toy.data_workers(device))):
        config = replace(Config(), steps=steps, data_workers=workers, device=str(device), checkpoints=tempfile.mkdtemp())
        torch.manual_seed(0)
        model = train_toy.adapt(TinyMLLM(train_toy.model_config(len(TOK), False)).to(device), config)
        print(f"\n{workers} data worker(s), {torch.get_num_threads()} torch thread(s):")
        train_toy.train(model, "instruct", config, Path(config.checkpoints) / "data-wait.ckpt")


def generation_rows(device: torch.device, dtype: str, repeats: int, quick: bool) -> list[tuple]:
    """Greedy generation of the toy model with MixLoRA: KV cache vs re-reading the sequence each step."""
    torch.manual_seed(0)
    model = TinyMLLM(train_toy.model_config(len(TOK), quick)).to(device)
    model = train_toy.adapt(model, train_toy.quick(Config()) if quick else Config()).eval()  # MixLoRA E=16 r=4
    batch = 16 if quick else 256  # train_toy.evaluate's batch
    examples = train_toy.training_examples("instruct", 0, 0, batch)
    images, prompts, prompt_lens = train_toy.collate(examples, TOK, device, with_answer=False)
    cast = train_toy.autocast(device, dtype == "bf16")
    rows = []
    for new in (4, model.config.max_text_len - prompts.shape[1]):  # the toy's answers; as long as fits
        def run(use_cache: bool, new: int = new):
            with cast:
                model.generate(images, prompts, prompt_lens, max_new_tokens=new, use_cache=use_cache)
        results = measure({"uncached": lambda: run(False), "KV cache": lambda: run(True)}, device, repeats, [])
        rows += [(new, batch, name, ms) for name, (ms, _) in results.items()]
    return rows


def main(argv: list[str] | None = None) -> tuple[list[tuple], dict, list[tuple]]:
    p = cli.parser(__doc__)
    p.add_argument("--device", type=cli.device, default="cpu", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--factors", type=cli.at_least(1), default=32, help="E (>= r)")
    p.add_argument("--rank", type=cli.at_least(1), default=8, help="r")
    p.add_argument("--repeats", type=cli.at_least(1), default=20)
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats: a smoke run")
    p.add_argument("--only", choices=["training", "tiny", "generation", "data"],
                   help="training: layers and the tiny model's step; tiny: its step alone; "
                        "data: time waiting for data (default: all but data)")
    p.add_argument("--compile", action="store_true", help="the tiny model's step through torch.compile too")
    args = p.parse_args(argv)
    if args.factors < args.rank:
        p.error(f"argument --factors: expected E >= --rank {args.rank}, got {args.factors}")
    device = torch.device(args.device)
    repeats = 2 if args.quick else args.repeats
    rows, ops, generation = [], {}, []
    if args.only in (None, "training"):
        shapes = [(4, 16, 64)] if args.quick else USER_SHAPES
        rows = [row for N, T, d in shapes for row in layer_rows(N, T, d, args.factors, args.rank, device, args.dtype, repeats)]
    if args.only in (None, "training", "tiny"):
        rows += tiny_model_rows(device, args.dtype, repeats, args.quick, args.compile)
        print_training(rows, device, args.dtype, repeats)
        ops = {"eager": op_counts(device, args.dtype, args.quick)}
        if args.compile:
            ops["compiled"] = op_counts(device, args.dtype, args.quick, compiled=True)
        print_ops(ops, device, args.dtype, args.quick)
    if args.only in (None, "generation"):
        generation = generation_rows(device, args.dtype, repeats, args.quick)
        print_generation(generation, device, args.dtype, repeats)
    if args.only == "data":
        data_wait(device, steps=4 if args.quick else 30)
    return rows, ops, generation


def print_training(rows: list[tuple], device: torch.device, dtype: str, repeats: int) -> None:
    memory = "peak MiB" if device.type == "cuda" else "saved MiB"
    print(f"\nforward+backward, {device} {dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {repeats}, variants interleaved\n")
    print(f"| shape (N, T, d) | variant | ms | {memory} | ms / LoRA | {memory} / LoRA |")
    print("|---|---|---|---|---|---|")
    lora = {shape: (ms, mib) for shape, name, ms, mib in rows if name.startswith("LoRA")}
    for shape, name, ms, mib in rows:
        ref_ms, ref_mib = lora[shape]
        print(f"| {shape} | {name} | {ms:.2f} | {mib:.1f} | {ms / ref_ms:.2f} | {mib / ref_mib:.2f} |")
    print("\nratios at each shape: MixLoRA / LoRA (time, memory), per-instance ΔW / MixLoRA (time)")
    by = {(shape, name.split(" ")[0] + (" IFS" if "IFS" in name else "")): (ms, mib) for shape, name, ms, mib in rows}
    for shape in dict.fromkeys(shape for shape, *_ in rows):
        mix, lo = by[shape, "MixLoRA"], by[shape, "LoRA"]
        line = f"  {shape}: MixLoRA/LoRA {mix[0] / lo[0]:.2f} time, {mix[1] / lo[1]:.2f} memory"
        if (shape, "per-instance") in by:
            line += f"; per-instance ΔW/MixLoRA {by[shape, 'per-instance'][0] / mix[0]:.2f} time"
        print(line)


def print_ops(ops: dict[str, dict[str, dict[str, int]]], device: torch.device, dtype: str, quick: bool) -> None:
    batch = (train_toy.quick(Config()) if quick else Config()).batch_size
    print(f"\naten ops in one training step of the tiny model (torch.profiler, nested ops included), batch {batch}, "
          f"{device} {dtype}\n")
    print("| | phase | " + " | ".join(next(iter(ops.values()))) + " | MixLoRA / LoRA |")
    print("|---|---|---|---|---|")
    for mode, counts in ops.items():
        lora, mix = ({**c, "forward + backward": c["forward"] + c["backward"], "step": sum(c.values())}
                     for c in counts.values())
        for phase in ("forward", "backward", "forward + backward", "AdamW", "step"):
            print(f"| {mode} | {phase} | {lora[phase]:,} | {mix[phase]:,} | {mix[phase] / lora[phase]:.2f} |")


def print_generation(generation: list[tuple], device: torch.device, dtype: str, repeats: int) -> None:
    print(f"\ngreedy generation, tiny model with MixLoRA E=16 r=4 (eval, no_grad), {device} {dtype}, "
          f"{torch.get_num_threads()} threads, median of {repeats}, interleaved; same batch and prompts\n")
    print("| new tokens | batch | uncached ms | KV cache ms | uncached answers/s | KV cache answers/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    ms = {(new, name): t for new, _, name, t in generation}
    for new, batch in dict.fromkeys((new, batch) for new, batch, *_ in generation):
        slow, fast = ms[new, "uncached"], ms[new, "KV cache"]
        print(f"| {new} | {batch} | {slow:.1f} | {fast:.1f} | {batch / slow * 1e3:.0f} | {batch / fast * 1e3:.0f} "
              f"| {slow / fast:.2f} |")


if __name__ == "__main__":
    main()
