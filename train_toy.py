"""Train the tiny vision-language model on the toy suite: LoRA vs MixLoRA, end to end.

Stage 1, as LLaVA's feature alignment: pretrain the whole tiny model on captions (cached
under checkpoints/, so later runs reuse it). Stage 2, instruction tuning: freeze the base,
add LoRA or MixLoRA at the same rank to every linear layer of the LM, train only the
adapters on the multi-task mixture, with the same steps, data order, lr schedule and seed
for every method. Then evaluate exact-match accuracy per task by greedy generation, on seen
and on held-out instruction templates, print a table like the paper's Table 1, and save it
with the raw numbers under runs/.

    python train_toy.py                                  # base + LoRA r=4 + MixLoRA E=16 r=4
    python train_toy.py --methods mixlora --factors 32 --rank 8 --no-cfs
    python train_toy.py --methods mixlora --scores sigmoid   # per-factor sigmoid router scores
    python train_toy.py --quick                          # a smoke run of a few seconds
    torchrun --nproc_per_node=4 train_toy.py             # the same run on 4 GPUs (or CPU processes)

Under torchrun every process trains a DistributedDataParallel copy on its own shard of each
global batch (--batch-size is the global batch, as on one process); rank 0 logs, evaluates
and writes the checkpoints, which every process reads (so --checkpoints must be a shared
directory for multi-node runs and --resume).
"""

import argparse
import copy
import json
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import cli
import toy_tasks
from mixlora import (add_lora, add_mixlora, adapter_state_dict, load_adapter_state_dict,
                     mark_only_adapters_trainable)
from tiny_mllm import TinyMLLM, TinyMLLMConfig, Tokenizer, answer_mask

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]  # every LM linear
METHODS = ("lora", "mixlora")
DEFAULT_LR = 2e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser(__doc__)
    p.add_argument("--methods", default="lora,mixlora", help="comma-separated: lora, mixlora")
    p.add_argument("--rank", type=cli.at_least(1), default=4, help="r, for LoRA and MixLoRA alike")
    p.add_argument("--factors", type=cli.at_least(1), default=16, help="E, MixLoRA's factors per pool (>= r)")
    p.add_argument("--no-cfs", action="store_true", help="MixLoRA with IFS only (λ = 0, no W^CFS)")
    p.add_argument("--frozen-routers", action="store_true", help="routers stay at their random init")
    p.add_argument("--scores", default="softmax", choices=["softmax", "sigmoid"],
                   help="MixLoRA's router scores: softmax over E (the paper) or one sigmoid per factor")
    p.add_argument("--train-projector", action="store_true", help="also train the projector (LLaVA's recipe)")
    p.add_argument("--tasks", default=None, help="comma-separated: train on these tasks only (a per-task specialist)")
    p.add_argument("--steps", type=cli.at_least(1), default=800, help="stage-2 steps")
    p.add_argument("--base-steps", type=cli.at_least(1), default=1500, help="stage-1 steps")
    p.add_argument("--batch-size", type=cli.at_least(1), default=64)
    p.add_argument("--lr", type=cli.above(0.0), default=DEFAULT_LR, help="stage-2 peak learning rate")
    # α <= 0 is refused: α = 0 turns the adapters off, and α < 0 flips ΔW's sign for no reason.
    p.add_argument("--alpha", type=cli.above(0.0), default=None,
                   help="the adapters' α > 0, scale α/r (default 2r for both methods; the released MixLoRA uses 2E)")
    p.add_argument("--seed", type=cli.at_least(0), default=0)
    p.add_argument("--device", type=cli.device, default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--eval-size", type=cli.at_least(1), default=100, help="examples per task and template split")
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps: a smoke run")
    p.add_argument("--resume", action="store_true", help="continue from this run's last checkpoint")
    p.add_argument("--out", default="runs", help="where the table and the JSON go")
    p.add_argument("--checkpoints", default="checkpoints")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.base_steps, args.batch_size, args.eval_size = 12, 12, 16, 8
    args.methods = args.methods.split(",")
    args.alpha = 2.0 * args.rank if args.alpha is None else args.alpha
    args.tasks = args.tasks.split(",") if args.tasks else list(toy_tasks.TASKS)
    for task in args.tasks:
        if task not in toy_tasks.TASKS:
            p.error(f"argument --tasks: unknown task {task!r}; expected some of {', '.join(toy_tasks.TASKS)}")
    for method in args.methods:
        if method not in METHODS:
            p.error(f"argument --methods: unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if "mixlora" in args.methods and args.factors < args.rank:
        p.error(f"argument --factors: expected E >= --rank {args.rank} (each instance picks r of E), got {args.factors}")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        p.error(f"argument --batch-size: {args.batch_size} is the global batch; it must divide evenly "
                f"over the {world} processes")
    return args


def setup_distributed(args: argparse.Namespace) -> tuple[int, int]:
    """Under torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK): join the process group, one
    GPU per process (NCCL), or CPU processes (gloo). Returns (rank, world size)."""
    if "RANK" not in os.environ:
        return 0, 1
    if args.device.startswith("cuda"):
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


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
    return {(task.name, "validation"): [toy_tasks.sample(task, random.Random(f"val-{task.name}-{i}")) for i in range(size)]
            for task in toy_tasks.TASKS.values()}


# ---- training ---------------------------------------------------------------------------------

def autocast(device: torch.device):
    """bf16 autocast on a GPU, plain fp32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to zero."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def save_atomically(obj: dict, path: Path) -> None:
    """Write to a temporary file, flush it to disk, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def recipe(args: argparse.Namespace) -> dict:
    """The settings a checkpoint's training depends on: a resume must use the same."""
    return {k: v for k, v in vars(args).items() if k not in ("methods", "device", "eval_size", "resume", "out", "checkpoints")}


def train(model: TinyMLLM, stage: str, name: str, args: argparse.Namespace, tok: Tokenizer,
          steps: int, lr: float, ckpt: Path, until: int | None = None,
          tasks: list[toy_tasks.Task] | None = None) -> float:
    """Train model's trainable parameters; checkpoint every ~10% of the steps. Returns seconds.
    `until` stops early, at that step of the `steps`-long schedule (to look at a model part-way).
    Stage 2 trains on `tasks`, by default the suite's tasks that --tasks names."""
    tasks = tasks or [toy_tasks.TASKS[t] for t in args.tasks]
    device = next(model.parameters()).device
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    # DDP averages gradients over processes; every adapter parameter gets one on every rank
    # (pool rows no instance chose get zeros), so no find_unused_parameters. Buffers (frozen
    # routers) never change, so they need no broadcast.
    ddp = DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start = 0
    if args.resume and ckpt.exists():
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        if saved["recipe"] != recipe(args):
            raise SystemExit(f"error: {ckpt} was written with other settings {saved['recipe']}; "
                             f"resume with those, or delete it to start over")
        load_trainable_state(model, stage, saved["trainable"])
        opt.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"]["cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(saved["rng"]["cuda"], device)
        start = saved["step"]
        if rank == 0:
            print(f"[{name}] resumed from {ckpt} at step {start}/{steps}")
    model.train()
    t0, last_print, tokens_seen = time.time(), 0.0, 0
    for step in range(start, until or steps):
        examples = training_examples(stage, args.seed, step, args.batch_size, rank, world, tasks)
        images, tokens, prompt_lens = collate(examples, tok, device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        with autocast(device):
            _, loss = ddp(images, tokens, prompt_lens)  # mean over this process's answer tokens
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
            save_atomically({"trainable": trainable_state(model, stage), "optimizer": opt.state_dict(),
                             "step": done, "rng": rng_state, "recipe": recipe(args)}, ckpt)
        now = time.time()
        if rank == 0 and (now - last_print > 3 or done in (steps, until)):
            last_print, rate = now, tokens_seen / (now - t0)
            left = ((until or steps) - done) * (now - t0) / (done - start)
            print(f"[{name}] step {done}/{steps}  loss {global_loss.item():.4f}  {rate:,.0f} tok/s  "
                  f"{int(left) // 60}m{int(left) % 60:02d}s left", flush=True)
    return time.time() - t0


@torch.no_grad()
def evaluate(model: TinyMLLM, tok: Tokenizer, sets: dict, batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Exact-match accuracy (%) of greedy answers: {split: {task: accuracy}}."""
    device = next(model.parameters()).device
    model.eval()
    results: dict[str, dict[str, float]] = {}
    for (task, split), examples in sets.items():
        correct = 0
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            images, prompts, prompt_lens = collate(chunk, tok, device, with_answer=False)
            with autocast(device):
                answers = model.generate(images, prompts, prompt_lens)
            correct += sum(tok.decode(a.tolist()) == e.answer for a, e in zip(answers, chunk))
        results.setdefault(split, {})[task] = 100.0 * correct / len(examples)
    return results


# ---- the runs ----------------------------------------------------------------------------------

def base_model(args: argparse.Namespace, tok: Tokenizer, rank: int) -> tuple[TinyMLLM, Path]:
    """Stage 1: the tiny model pretrained on captions; trained once, then read from its cache."""
    config = model_config(len(tok), args.quick)
    torch.manual_seed(args.seed)
    model = TinyMLLM(config).to(args.device)
    tag = f"base-{'quick' if args.quick else 'full'}-s{args.seed}-steps{args.base_steps}-bs{args.batch_size}"
    path = Path(args.checkpoints) / f"{tag}.pt"
    if path.exists():
        saved = torch.load(path, map_location=args.device, weights_only=False)
        if saved.get("config") != vars(config):
            raise SystemExit(f"error: {path} was saved with another model config; delete it to retrain")
        model.load_state_dict(saved["model"])
        if rank == 0:
            print(f"[base] loaded {path}")
    else:
        seconds = train(model, "base", "base", args, tok, args.base_steps, 1e-3, path.with_suffix(".ckpt"))
        if rank == 0:
            save_atomically({"model": model.state_dict(), "config": vars(config), "seconds": seconds}, path)
            path.with_suffix(".ckpt").unlink()
            print(f"[base] trained in {seconds:.0f}s, saved {path}")
    return model, path


def run_name(args: argparse.Namespace, method: str) -> str:
    name = f"{method}-r{args.rank}" if method == "lora" else f"{method}-E{args.factors}-r{args.rank}"
    if method == "mixlora":
        name += "-ifs" if args.no_cfs else ""
        name += "-frozen" if args.frozen_routers else ""
        name += "-sigmoid" if args.scores == "sigmoid" else ""
    name += "-proj" if args.train_projector else ""
    name += "-only-" + "+".join(args.tasks) if args.tasks != list(toy_tasks.TASKS) else ""
    name += f"-lr{args.lr:g}" if args.lr != DEFAULT_LR else ""
    name += f"-alpha{args.alpha:g}" if args.alpha != 2 * args.rank else ""
    return name + f"-s{args.seed}-steps{args.steps}" + ("-quick" if args.quick else "")


def adapt(model: TinyMLLM, args: argparse.Namespace, method: str) -> TinyMLLM:
    """Stage 2's model: the frozen base with adapters on every LM linear layer (α = 2r for both
    unless --alpha says otherwise)."""
    torch.manual_seed(args.seed + 1)  # the same adapter init for every run of a seed
    if method == "lora":
        add_lora(model, TARGETS, args.rank, alpha=args.alpha)
    else:
        add_mixlora(model, TARGETS, args.factors, args.rank, alpha=args.alpha,
                    conditional=not args.no_cfs, router_grad=not args.frozen_routers, scores=args.scores)
    mark_only_adapters_trainable(model)
    model.projector.requires_grad_(args.train_projector)
    return model


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
    args = parse_args(argv)
    rank, world = setup_distributed(args)
    try:
        return run(args, rank, world)
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(args: argparse.Namespace, rank: int, world: int) -> dict | None:
    tok = Tokenizer(toy_tasks.vocabulary())
    sets = evaluation_sets(args.eval_size)
    base, base_path = base_model(args, tok, rank)
    if rank == 0:
        rows = [{"label": "Base (stage 1)", "factors": "-", "rank": "-", "accuracy": evaluate(base, tok, sets)}]
    for method in args.methods:
        name = run_name(args, method)
        model = adapt(copy.deepcopy(base), args, method)
        seconds = train(model, "instruct", name, args, tok, args.steps, args.lr, Path(args.checkpoints) / f"{name}.ckpt")
        if rank != 0:
            continue  # rank 0 evaluates; the others wait for it in the next training step
        label = "LoRA" if method == "lora" else "MixLoRA" + (" (IFS only)" if args.no_cfs else "") + (
            " (frozen routers)" if args.frozen_routers else "") + (" (sigmoid scores)" if args.scores == "sigmoid" else "")
        rows.append({"label": label, "name": name, "factors": "-" if method == "lora" else args.factors,
                     "rank": args.rank, "accuracy": evaluate(model, tok, sets), "train_seconds": seconds,
                     "adapter_parameters": sum(v.numel() for v in adapter_state_dict(model).values()),
                     "adapters": {k: v.cpu() for k, v in adapter_state_dict(model).items()}})
    if rank != 0:
        return None
    report = {"args": vars(args), "device": str(args.device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "processes": world, "base_checkpoint": str(base_path),
              "rows": [{k: v for k, v in row.items() if k != "adapters"} for row in rows]}
    tables = (f"Held-out instruction templates (unseen phrasings), exact match %:\n\n{markdown_table(rows, 'heldout')}\n\n"
              f"Seen instruction templates, new images, exact match %:\n\n{markdown_table(rows, 'seen')}\n")
    print("\n" + tables)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"toy-s{args.seed}" + ("-quick" if args.quick else "")
    (out / f"{stem}.md").write_text(tables)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    print(f"saved {out / stem}.md and .json")
    return {"report": report, "rows": rows}


if __name__ == "__main__":
    main()
