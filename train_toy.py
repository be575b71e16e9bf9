"""Train the tiny vision-language model on the toy suite: LoRA vs MixLoRA, end to end.

Stage 1, as LLaVA's feature alignment: pretrain the whole tiny model on captions (cached
under checkpoints/, so later runs reuse it). Stage 2, instruction tuning: freeze the base,
add LoRA or MixLoRA at the same rank to every linear layer of the LM, train only the
adapters on the multi-task mixture, with the same steps, data order, lr schedule and seed
for every method. Then evaluate exact-match accuracy per task by greedy generation, on seen
and on held-out instruction templates, print a table like the paper's Table 1, and save it
with the raw numbers under runs/; each run's adapters go to checkpoints/NAME/ (save_adapters).

    python train_toy.py                                  # base + LoRA r=4 + MixLoRA E=16 r=4
    python train_toy.py --methods mixlora --factors 32 --rank 8 --no-cfs
    python train_toy.py --methods mixlora --scores sigmoid   # per-factor sigmoid router scores
    python train_toy.py --quick                          # a smoke run of a few seconds
    python train_toy.py --device cuda --compile          # a GPU: bf16 autocast, the training step compiled
    torchrun --nproc_per_node=4 train_toy.py             # each batch split over 4 processes (tested: 2 gloo = 1)

Under torchrun every process trains a DistributedDataParallel copy on its own shard of each
global batch (--batch-size is the global batch, as on one process); rank 0 logs, evaluates
and writes the checkpoints, which every process reads (so --checkpoints must be a shared
directory for multi-node runs and --resume).
"""

import copy
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import cli
import toy_tasks
from mixlora import (add_lora, add_mixlora, adapter_state_dict, load_adapter_state_dict,
                     mark_only_adapters_trainable, save_adapters, save_atomically)
from tiny_mllm import TinyMLLM, TinyMLLMConfig, Tokenizer, answer_mask

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")  # every LM linear
METHODS = ("lora", "mixlora")
TOK = Tokenizer(toy_tasks.vocabulary())


@dataclass(frozen=True)
class Config:
    """One stage-2 run and the stage-1 base it starts from. The command line fills it (one per
    --methods entry); the experiments derive theirs with dataclasses.replace(config, ...)."""
    method: str = "mixlora"  # "lora" or "mixlora" (experiments add their own, e.g. "oracle")
    rank: int = 4  # r, for LoRA and MixLoRA alike
    factors: int = 16  # E, MixLoRA's factors per pool
    conditional: bool = True  # CFS; False: IFS only (λ = 0, no W^CFS)
    router_grad: bool = True  # False: routers frozen at their random init (the released code)
    scores: str = "softmax"  # MixLoRA's router scores: "softmax" (the paper) or "sigmoid"
    scaling: float = 2.0  # the adapters' scale α/r: α = 2r at every rank (mixlora's own default is α = r)
    train_projector: bool = False  # also train the projector (LLaVA's recipe)
    targets: tuple[str, ...] = TARGETS  # the LM linears that get adapters
    router_lr: float = 1.0  # the routers' learning rate, as a multiple of lr (Poly trains its routing faster)
    conflict: tuple[int, float] | None = None  # train on toy_tasks.conflict_tasks(K, κ), not the suite
    tasks: tuple[str, ...] | None = None  # only these of the training suite's tasks (a specialist)
    steps: int = 800  # stage 2
    base_steps: int = 1500  # stage 1
    batch_size: int = 64  # the global batch
    lr: float = 2e-3  # stage 2's peak learning rate
    seed: int = 0  # stage 1's init and data, stage 2's adapter init and data
    quick: bool = False  # the smoke-test model
    # Where and how to run, not what: not part of the recipe a checkpoint records.
    device: str = "cpu"
    compile: bool = False  # torch.compile the training step's model
    data_workers: int | None = None  # processes drawing batches ahead of the step; None: data_workers()
    eval_size: int = 100  # examples per task and template split
    resume: bool = False  # continue from this run's last checkpoint
    out: str = "runs"
    checkpoints: str = "checkpoints"

    @property
    def alpha(self) -> float:
        """The α that adapt() passes to mixlora, always explicitly: scaling · r."""
        return self.scaling * self.rank


DEFAULT_LR = Config.lr


def quick(config: Config) -> Config:
    """The smoke-test run: the tiny model, a few steps, small batches and evaluation sets."""
    return replace(config, quick=True, steps=12, base_steps=12, batch_size=16, eval_size=8)


def parse_args(argv: list[str] | None = None) -> list[Config]:
    """The command line, as one Config per --methods entry (they differ only in the method)."""
    p = cli.parser(__doc__)
    p.add_argument("--methods", default="lora,mixlora", help="comma-separated: lora, mixlora")
    p.add_argument("--rank", type=cli.at_least(1), default=Config.rank, help="r, for LoRA and MixLoRA alike")
    p.add_argument("--factors", type=cli.at_least(1), default=Config.factors, help="E, MixLoRA's factors per pool (>= r)")
    p.add_argument("--no-cfs", action="store_true", help="MixLoRA with IFS only (λ = 0, no W^CFS)")
    p.add_argument("--frozen-routers", action="store_true", help="routers stay at their random init")
    p.add_argument("--scores", default=Config.scores, choices=["softmax", "sigmoid"],
                   help="MixLoRA's router scores: softmax over E (the paper) or one sigmoid per factor")
    p.add_argument("--train-projector", action="store_true", help="also train the projector (LLaVA's recipe)")
    p.add_argument("--tasks", default=None, help="comma-separated: train on these tasks only (a per-task specialist)")
    p.add_argument("--steps", type=cli.at_least(1), default=Config.steps, help="stage-2 steps")
    p.add_argument("--base-steps", type=cli.at_least(1), default=Config.base_steps, help="stage-1 steps")
    p.add_argument("--batch-size", type=cli.at_least(1), default=Config.batch_size)
    p.add_argument("--lr", type=cli.above(0.0), default=Config.lr, help="stage-2 peak learning rate")
    # α <= 0 is refused: α = 0 turns the adapters off, and α < 0 flips ΔW's sign for no reason.
    p.add_argument("--alpha", type=cli.above(0.0), default=None,
                   help="the adapters' α > 0, scale α/r (default 2r for both methods; the released MixLoRA uses 2E)")
    p.add_argument("--seed", type=cli.at_least(0), default=Config.seed)
    p.add_argument("--device", type=cli.device, default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--eval-size", type=cli.at_least(1), default=Config.eval_size, help="examples per task and template split")
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps: a smoke run")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training (evaluation stays eager)")
    p.add_argument("--data-workers", type=cli.at_least(0), default=None,
                   help="processes that draw batches ahead of the step (default: the cores training leaves spare; 0: inline)")
    p.add_argument("--resume", action="store_true", help="continue from this run's last checkpoint")
    p.add_argument("--out", default=Config.out, help="where the table and the JSON go")
    p.add_argument("--checkpoints", default=Config.checkpoints)
    a = p.parse_args(argv)
    methods = a.methods.split(",")
    for method in methods:
        if method not in METHODS:
            p.error(f"argument --methods: unknown method {method!r}; expected one of {', '.join(METHODS)}")
    tasks = tuple(a.tasks.split(",")) if a.tasks else None
    for task in tasks or ():
        if task not in toy_tasks.TASKS:
            p.error(f"argument --tasks: unknown task {task!r}; expected some of {', '.join(toy_tasks.TASKS)}")
    if "mixlora" in methods and a.factors < a.rank:
        p.error(f"argument --factors: expected E >= --rank {a.rank} (each instance picks r of E), got {a.factors}")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if a.batch_size % world:
        p.error(f"argument --batch-size: {a.batch_size} is the global batch; it must divide evenly "
                f"over the {world} processes")
    scaling = Config.scaling if a.alpha is None else a.alpha / a.rank  # --alpha is α; a Config keeps α/r
    config = Config(rank=a.rank, factors=a.factors, conditional=not a.no_cfs, router_grad=not a.frozen_routers,
                    scores=a.scores, scaling=scaling, train_projector=a.train_projector, tasks=tasks, steps=a.steps,
                    base_steps=a.base_steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, device=a.device,
                    compile=a.compile, data_workers=a.data_workers, eval_size=a.eval_size, resume=a.resume,
                    out=a.out, checkpoints=a.checkpoints)
    config = quick(config) if a.quick else config
    return [replace(config, method=method) for method in methods]


def setup_distributed(device: str) -> tuple[int, int, str]:
    """Under torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK): join the process group, one
    GPU per process (NCCL), or CPU processes (gloo). Returns (rank, world size, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def model_config(vocab_size: int, quick: bool) -> TinyMLLMConfig:
    if quick:
        return TinyMLLMConfig(vocab_size, vision_dim=32, vision_layers=1, d_model=32, n_layers=2, n_heads=2)
    return TinyMLLMConfig(vocab_size)


# ---- data ------------------------------------------------------------------------------------

def collate(examples: list[toy_tasks.Example], tok: Tokenizer, device: torch.device,
            with_answer: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) in [0, 1], tokens (N, L) right-padded, prompt lengths (N,)."""
    prompts = [tok.encode(e.prompt) for e in examples]
    texts = [p + tok.encode(e.answer) + [Tokenizer.EOS] if with_answer else p for p, e in zip(prompts, examples)]
    tokens = torch.full((len(texts), max(map(len, texts))), Tokenizer.PAD)
    for row, text in zip(tokens, texts):
        row[:len(text)] = torch.tensor(text)
    images = torch.from_numpy(np.stack([e.image for e in examples])).permute(0, 3, 1, 2).float() / 255
    return images.to(device), tokens.to(device), torch.tensor([len(p) for p in prompts]).to(device)


def training_batch(stage: str, seed: int, batch_size: int, rank: int, world: int, tasks: list[toy_tasks.Task],
                   step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's batch (this process's shard), collated on the CPU."""
    return collate(training_examples(stage, seed, step, batch_size, rank, world, tasks), TOK, torch.device("cpu"))


def evaluation_batch(sets: dict, tok: Tokenizer, batch_size: int, key: tuple[str, str, int]) -> tuple[torch.Tensor, ...]:
    """The chunk of set (task, split) that starts at example i, collated on the CPU, prompts only."""
    task, split, i = key
    return collate(sets[task, split][i:i + batch_size], tok, torch.device("cpu"), with_answer=False)


def data_workers(device: torch.device, world: int = 1) -> int:
    """Processes that draw batches ahead of each of `world` training processes on device: the cores it leaves
    spare, at most 8 (0: draw them inline). A GPU's process keeps one core busy; a CPU's its torch threads,
    whose kernels slow down when another process takes their cores. Drawing 64 examples with pillow takes
    ~35 ms, a GPU's toy step a few."""
    busy = torch.get_num_threads() if device.type == "cpu" else 1
    return min(8, max(0, (os.cpu_count() or 1) // world - busy))


class _Calls(torch.utils.data.Dataset):
    """fn(item) for an item a DataLoader's sampler hands out."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __getitem__(self, item):
        return self.fn(item)


def prefetch(fn: Callable, items: Iterable, workers: int, pin_memory: bool = False) -> Iterator:
    """fn(item) for every item, in order, computed ahead of the loop that reads them by `workers` processes
    (inline where 0). fn must be deterministic in its item, so that the results are those of the loop
    calling it itself. Its own generator: the loader does not draw from the global torch RNG."""
    return iter(torch.utils.data.DataLoader(
        _Calls(fn), batch_size=None, sampler=list(items), num_workers=workers, pin_memory=pin_memory,
        prefetch_factor=4 if workers else None, generator=torch.Generator()))


def training_examples(stage: str, seed: int, step: int, batch_size: int, rank: int = 0, world: int = 1,
                      tasks: list[toy_tasks.Task] | None = None) -> list[toy_tasks.Example]:
    """Example i of a step's global batch is a function of (stage, seed, step, i): the same data
    for every method, a resumed run sees exactly the batches it would have seen, and each of
    `world` processes draws only its own shard i = rank, rank + world, ... of the same batch.
    Stage 2 draws uniformly from `tasks` (the suite's eight by default)."""
    tasks = tasks or list(toy_tasks.TASKS.values())
    examples = []
    for i in range(rank, batch_size, world):
        rng = random.Random(f"{stage}-{seed}-{step}-{i}")
        examples.append(toy_tasks.sample_caption(rng) if stage == "base" else toy_tasks.sample(rng.choice(tasks), rng))
    return examples


def suite(config: Config) -> dict[str, toy_tasks.Task]:
    """The tasks stage 2 trains and evaluates on: the toy suite, or the conflict knob's K tasks."""
    return toy_tasks.conflict_tasks(*config.conflict) if config.conflict else toy_tasks.TASKS


def training_tasks(config: Config) -> list[toy_tasks.Task]:
    return [suite(config)[name] for name in config.tasks or suite(config)]


def evaluation_sets(size: int) -> dict[tuple[str, str], list[toy_tasks.Example]]:
    """Fixed for every method and seed: (task, "seen" | "heldout") -> examples."""
    sets = {}
    for task in toy_tasks.TASKS.values():
        for split in ("seen", "heldout"):
            rng = random.Random(f"eval-{task.name}-{split}")
            sets[task.name, split] = [toy_tasks.sample(task, rng, heldout=split == "heldout") for _ in range(size)]
    for task in toy_tasks.HELDOUT_TASKS.values():
        rng = random.Random(f"eval-{task.name}")
        sets[task.name, "heldout"] = [toy_tasks.sample(task, rng, heldout=True) for _ in range(size)]
    return sets


def validation_sets(size: int) -> dict[tuple[str, str], list[toy_tasks.Example]]:
    """For choosing hyperparameters, never for reporting: the training distribution (the trained
    tasks, seen templates) on new images whose seeds ("val-...") are disjoint from the evaluation
    sets' ("eval-...") and the training batches' ("instruct-...")."""
    return {(task.name, "validation"): toy_tasks.samples(task, size, f"val-{task.name}")
            for task in toy_tasks.TASKS.values()}


# ---- training ---------------------------------------------------------------------------------

def autocast(device: torch.device, bf16: bool | None = None):
    """bf16 autocast on a GPU (or where bf16=True), plain fp32 on the CPU."""
    bf16 = device.type == "cuda" if bf16 is None else bf16
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to zero."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def trainable_state(model: TinyMLLM, stage: str) -> dict[str, torch.Tensor]:
    if stage == "base":
        return model.state_dict()
    state = adapter_state_dict(model)
    if model.projector.weight.requires_grad:
        state.update({f"projector.{k}": v for k, v in model.projector.state_dict().items()})
    return state


def load_trainable_state(model: TinyMLLM, stage: str, state: dict[str, torch.Tensor]) -> None:
    if stage == "base":
        model.load_state_dict(state)
        return
    projector = {k.removeprefix("projector."): v for k, v in state.items() if k.startswith("projector.")}
    if projector:
        model.projector.load_state_dict(projector)
    load_adapter_state_dict(model, {k: v for k, v in state.items() if not k.startswith("projector.")})


def recipe(config: Config) -> dict:
    """The settings a checkpoint's training depends on: a resume must use the same."""
    return {k: v for k, v in asdict(config).items()
            if k not in ("device", "compile", "data_workers", "eval_size", "resume", "out", "checkpoints")}


def numerics(config: Config) -> str:
    """What changes a run's numbers besides its recipe: the device's kernels, with bf16 autocast on a GPU
    (autocast() below), and torch.compile's fused kernels. "cpu-fp32", "cuda-bf16-compiled", ..."""
    device = torch.device(config.device).type
    return f"{device}-{'bf16' if device == 'cuda' else 'fp32'}" + ("-compiled" if config.compile else "")


def train(model: TinyMLLM, stage: str, config: Config, ckpt: Path, until: int | None = None) -> float:
    """Train model's trainable parameters; checkpoint every ~10% of the steps. Returns seconds.
    Stage "base" trains everything on captions; stage "instruct" the adapters on the config's
    training tasks. `until` stops early, at that step of the schedule (to look at a model part-way)."""
    steps, lr = (config.base_steps, 1e-3) if stage == "base" else (config.steps, config.lr)
    name = "base" if stage == "base" else run_name(config)
    tasks = training_tasks(config)
    device = next(model.parameters()).device
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    # DDP averages gradients over processes; every adapter parameter gets one on every rank
    # (pool rows no instance chose get zeros), so no find_unused_parameters. Buffers (frozen
    # routers) never change, so they need no broadcast.
    ddp = DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    forward = torch.compile(ddp) if config.compile else ddp  # one graph: the MixLoRA layers break none
    params = [p for p in model.parameters() if p.requires_grad]
    routers = {id(p) for n, p in model.named_parameters() if ".router_" in n}  # lr × config.router_lr
    groups = [{"params": params, "scale": 1.0}] if config.router_lr == 1.0 else [
        {"params": [p for p in params if id(p) not in routers], "scale": 1.0},
        {"params": [p for p in params if id(p) in routers], "scale": config.router_lr}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    start = 0
    if config.resume and ckpt.exists():
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)  # RNG states stay on the CPU
        if saved["recipe"] != recipe(config):
            raise SystemExit(f"error: {ckpt} was written with other settings {saved['recipe']}; "
                             f"resume with those, or delete it to start over")
        load_trainable_state(model, stage, saved["trainable"])
        opt.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"]["cpu"])
        if device.type == "cuda" and "cuda" in saved["rng"]:
            torch.cuda.set_rng_state(saved["rng"]["cuda"], device)
        start = saved["step"]
        if rank == 0:
            print(f"[{name}] resumed from {ckpt} at step {start}/{steps}")
            written = saved.get("numerics", "cuda-bf16" if "cuda" in saved["rng"] else "cpu-fp32")
            if written != numerics(config):  # the same weights and optimizer state, other kernels
                print(f"[{name}] note: {ckpt} was written with {written} and resumes with {numerics(config)}: "
                      f"from here its numbers differ from an uninterrupted run on either")
    model.train()
    # Batches drawn ahead of the step by worker processes where the device leaves cores spare: the
    # same batches as drawn inline.
    workers = data_workers(device, world) if config.data_workers is None else config.data_workers
    batches = prefetch(partial(training_batch, stage, config.seed, config.batch_size, rank, world, tasks),
                       range(start, until or steps), workers, pin_memory=device.type == "cuda")
    t0, last_print, tokens_seen, waited = time.time(), 0.0, 0, 0.0
    for step in range(start, until or steps):
        wait = time.time()
        images, tokens, prompt_lens = (t.to(device, non_blocking=True) for t in next(batches))
        waited += time.time() - wait  # the step's time spent waiting for its data
        for group in opt.param_groups:
            group["lr"] = group["scale"] * lr_at(step, steps, lr)
        with autocast(device):
            _, loss = forward(images, tokens, prompt_lens)  # mean over this process's answer tokens
        if world > 1:
            # The loss is a mean over the global batch's answer tokens, as on one process: weight
            # this shard's mean by its share of them (x world, since DDP averages gradients).
            count = answer_mask(tokens, prompt_lens).sum().float()
            totals = torch.stack([count, loss.detach() * count])
            dist.all_reduce(totals)
            loss, global_loss = loss * count * world / totals[0], totals[1] / totals[0]
        else:
            global_loss = loss.detach()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        tokens_seen += world * (tokens.numel() + images.shape[0] * model.config.num_patches)
        done = step + 1
        if rank == 0 and (done % max(1, steps // 10) == 0 or done in (steps, until)):
            rng_state = {"cpu": torch.get_rng_state()}
            if device.type == "cuda":
                rng_state["cuda"] = torch.cuda.get_rng_state(device)
            state = {"trainable": trainable_state(model, stage), "optimizer": opt.state_dict(),
                     "step": done, "rng": rng_state, "recipe": recipe(config), "numerics": numerics(config)}
            save_atomically(lambda f: torch.save(state, f), ckpt)
        now = time.time()
        if rank == 0 and (now - last_print > 3 or done in (steps, until)):
            last_print, rate = now, tokens_seen / (now - t0)
            left = ((until or steps) - done) * (now - t0) / (done - start)
            print(f"[{name}] step {done}/{steps}  loss {global_loss.item():.4f}  {rate:,.0f} tok/s  "
                  f"data wait {waited / (now - t0):.0%}  {int(left) // 60}m{int(left) % 60:02d}s left", flush=True)
    return time.time() - t0


@torch.no_grad()
def evaluate(model: TinyMLLM, tok: Tokenizer, sets: dict, batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Exact-match accuracy (%) of greedy answers: {split: {task: accuracy}}."""
    device = next(model.parameters()).device
    model.eval()
    keys = [(task, split, i) for (task, split), examples in sets.items() for i in range(0, len(examples), batch_size)]
    batches = prefetch(partial(evaluation_batch, sets, tok, batch_size), keys, data_workers(device), device.type == "cuda")
    correct = dict.fromkeys(sets, 0)
    for task, split, i in keys:
        images, prompts, prompt_lens = (t.to(device, non_blocking=True) for t in next(batches))
        with autocast(device):
            answers = model.generate(images, prompts, prompt_lens)
        chunk = sets[task, split][i:i + batch_size]
        correct[task, split] += sum(tok.decode(a.tolist()) == e.answer for a, e in zip(answers, chunk))
    results: dict[str, dict[str, float]] = {}
    for (task, split), examples in sets.items():
        results.setdefault(split, {})[task] = 100.0 * correct[task, split] / len(examples)
    return results


# ---- the runs ----------------------------------------------------------------------------------

def base_model(config: Config, rank: int = 0) -> tuple[TinyMLLM, Path]:
    """Stage 1: the tiny model pretrained on captions; trained once, then read from its cache."""
    model_cfg = model_config(len(TOK), config.quick)
    torch.manual_seed(config.seed)
    model = TinyMLLM(model_cfg).to(config.device)
    tag = (f"base-{'quick' if config.quick else 'full'}-s{config.seed}-steps{config.base_steps}-bs{config.batch_size}"
           f"-{numerics(config)}")  # other kernels, other weights
    path = Path(config.checkpoints) / f"{tag}.pt"
    if path.exists():
        saved = torch.load(path, map_location=config.device, weights_only=True)
        if saved.get("config") != vars(model_cfg):
            raise SystemExit(f"error: {path} was saved with another model config; delete it to retrain")
        model.load_state_dict(saved["model"])
        if rank == 0:
            print(f"[base] loaded {path}")
    else:
        seconds = train(model, "base", config, path.with_suffix(".ckpt"))
        if rank == 0:
            state = {"model": model.state_dict(), "config": vars(model_cfg), "seconds": seconds}
            save_atomically(lambda f: torch.save(state, f), path)
            path.with_suffix(".ckpt").unlink()
            print(f"[base] trained in {seconds:.0f}s, saved {path}")
    return model, path


def run_name(config: Config) -> str:
    """The checkpoint's name: every setting that differs from the defaults, then seed and steps."""
    c = config
    name = f"{c.method}-r{c.rank}" if c.method == "lora" else f"{c.method}-E{c.factors}-r{c.rank}"
    if c.method != "lora":
        name += "-ifs" if not c.conditional else ""
        name += "-frozen" if not c.router_grad else ""
        name += "-sigmoid" if c.scores == "sigmoid" else ""
    name += "-proj" if c.train_projector else ""
    name += "-only-" + "+".join(c.tasks) if c.tasks else ""
    name += "-on-" + "+".join(c.targets) if c.targets != TARGETS else ""
    name += f"-routerlr{c.router_lr:g}" if c.router_lr != 1.0 else ""
    name += f"-lr{c.lr:g}" if c.lr != DEFAULT_LR else ""
    name += f"-alpha{c.alpha:g}" if c.scaling != Config.scaling else ""
    name += f"-K{c.conflict[0]}-conflict{c.conflict[1]:g}" if c.conflict else ""
    return name + f"-s{c.seed}-steps{c.steps}" + ("-quick" if c.quick else "")


def adapt(model: TinyMLLM, config: Config) -> TinyMLLM:
    """Stage 2's model: the frozen base with adapters on every LM linear layer, at α = config.alpha
    (2r for both unless --alpha says otherwise)."""
    torch.manual_seed(config.seed + 1)  # the same adapter init for every run of a seed
    if config.method == "lora":
        add_lora(model, config.targets, config.rank, alpha=config.alpha)
    elif config.method == "mixlora":
        add_mixlora(model, config.targets, config.factors, config.rank, alpha=config.alpha,
                    conditional=config.conditional, router_grad=config.router_grad, scores=config.scores)
    else:
        raise ValueError(f"unknown method {config.method!r}; expected one of {', '.join(METHODS)}")
    mark_only_adapters_trainable(model)
    model.projector.requires_grad_(config.train_projector)
    return model


def label(config: Config) -> str:
    if config.method == "lora":
        return "LoRA"
    return "MixLoRA" + (" (IFS only)" if not config.conditional else "") + (
        " (frozen routers)" if not config.router_grad else "") + (" (sigmoid scores)" if config.scores == "sigmoid" else "")


def markdown_table(rows: list[dict], split: str) -> str:
    tasks = list(toy_tasks.TASKS)
    head = ["Model", "Factors", "Rank", *tasks, "Avg"] + (list(toy_tasks.HELDOUT_TASKS) if split == "heldout" else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        acc = row["accuracy"][split]
        cells = [row["label"], row["factors"], row["rank"], *(f"{acc[t]:.1f}" for t in tasks),
                 f"{np.mean([acc[t] for t in tasks]):.1f}"]
        cells += [f"{acc[t]:.1f}" for t in toy_tasks.HELDOUT_TASKS] if split == "heldout" else []
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    """Returns the report and the rows with their adapters (on rank 0; None on other ranks)."""
    configs = parse_args(argv)
    rank, world, device = setup_distributed(configs[0].device)
    try:
        return run([replace(c, device=device) for c in configs], rank, world)
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(configs: list[Config], rank: int, world: int) -> dict | None:
    """Stage 1 once, then stage 2 for each config (they share everything but the method)."""
    first = configs[0]
    sets = evaluation_sets(first.eval_size)
    base, base_path = base_model(first, rank)
    if rank == 0:
        rows = [{"label": "Base (stage 1)", "factors": "-", "rank": "-", "accuracy": evaluate(base, TOK, sets)}]
    for config in configs:
        name = run_name(config)
        model = adapt(copy.deepcopy(base), config)
        seconds = train(model, "instruct", config, Path(config.checkpoints) / f"{name}.ckpt")
        if rank != 0:
            continue  # rank 0 evaluates; the others wait for it in the next training step
        save_adapters(model, Path(config.checkpoints) / name)  # load_adapters(base, that directory) rebuilds it
        rows.append({"label": label(config), "name": name, "factors": "-" if config.method == "lora" else config.factors,
                     "rank": config.rank, "accuracy": evaluate(model, TOK, sets), "train_seconds": seconds,
                     "adapter_parameters": sum(v.numel() for v in adapter_state_dict(model).values()),
                     "adapters": {k: v.cpu() for k, v in adapter_state_dict(model).items()}})
    if rank != 0:
        return None
    report = {"config": asdict(first) | {"methods": [c.method for c in configs]}, "device": first.device,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "processes": world,
              "base_checkpoint": str(base_path), "rows": [{k: v for k, v in row.items() if k != "adapters"} for row in rows]}
    del report["config"]["method"]
    tables = (f"Held-out instruction templates (unseen phrasings), exact match %:\n\n{markdown_table(rows, 'heldout')}\n\n"
              f"Seen instruction templates, new images, exact match %:\n\n{markdown_table(rows, 'seen')}\n")
    print("\n" + tables)
    out = Path(first.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"toy-s{first.seed}" + ("-quick" if first.quick else "")
    (out / f"{stem}.md").write_text(tables)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    print(f"saved {out / stem}.md and .json")
    return {"report": report, "rows": rows}


if __name__ == "__main__":
    main()
