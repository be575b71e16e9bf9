"""The paper's analyses, measured on the toy suite: task interference, factor-selection maps, ablations.

    python analysis.py interference   # I_ij and gradient cosines, LoRA and MixLoRA, A and B, every layer
    python analysis.py selection      # t-SNE maps of MixLoRA's factor selections, kNN task purity
    python analysis.py sweep          # ablations over 3 seeds: ranks, factors, CFS, routers, specialists
    python analysis.py tune           # per-method learning rates picked on a validation split, then 3 seeds

Each writes PNGs (drawn with pillow), Markdown and JSON under runs/analysis/. They reuse
train_toy.py's cached stage-1 base and its training loop, so every number here comes from the
same recipe as the README's main table. `--quick` runs each on the smoke-test model.
"""

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import cli
import mechanism
import toy_tasks
import train_toy
from mixlora import MixLoRALinear
from tiny_mllm import TinyMLLM, Tokenizer, answer_losses

TASKS = list(toy_tasks.TASKS)
TOK = Tokenizer(toy_tasks.vocabulary())


def toy_args(flags: list[str], common: argparse.Namespace) -> argparse.Namespace:
    """train_toy.py's settings for one run, with this script's --quick/--device/--checkpoints
    (and, for the sweep, --steps/--eval-size)."""
    flags = ["--device", common.device, "--checkpoints", common.checkpoints] + common.toy_flags + flags
    return train_toy.parse_args(flags + (["--quick"] if common.quick else []))


def trained(flags: list[str], common: argparse.Namespace, seed: int = 0,
            until: int | None = None) -> tuple[TinyMLLM, argparse.Namespace]:
    """Stage 2 on the shared stage-1 base (seed 0); `seed` sets the adapter init and data order.
    Checkpoints go to checkpoints/analysis/ (not train_toy.py's: its seed s uses base s); a
    finished run is read back instead of retrained, a killed one resumed."""
    args = toy_args(flags + ["--seed", "0"], common)
    base, _ = train_toy.base_model(args, TOK, rank=0)
    args.seed = seed
    method = args.methods[0]
    model = train_toy.adapt(base, args, method)
    name = train_toy.run_name(args, method) + (f"-until{until}" if until else "")
    train_or_load(model, name, args, Path(args.checkpoints) / "analysis" / f"{name}.ckpt", args.steps, until)
    return model.eval(), args


def train_or_load(model: TinyMLLM, name: str, args: argparse.Namespace, ckpt: Path, steps: int,
                  until: int | None = None, tasks: list[toy_tasks.Task] | None = None) -> None:
    """Stage 2 of model (train_toy.train) into ckpt: read back if it finished with this recipe,
    resumed if it was killed, trained from the start otherwise."""
    saved = torch.load(ckpt, weights_only=False) if ckpt.exists() else None
    same = saved is not None and saved["recipe"] == train_toy.recipe(args)
    if same and saved["step"] == (until or steps):
        train_toy.load_trainable_state(model, "instruct", saved["trainable"])
    else:
        args.resume = same  # continue a killed sweep where it stopped
        train_toy.train(model, "instruct", name, args, TOK, steps, args.lr, ckpt, until=until, tasks=tasks)


def task_batches(size: int, tag: str, heldout: bool = False) -> dict[str, list[toy_tasks.Example]]:
    tasks = {**toy_tasks.TASKS, **toy_tasks.HELDOUT_TASKS} if heldout else toy_tasks.TASKS
    return {name: [toy_tasks.sample(task, random.Random(f"{tag}-{name}-{i}"), heldout=heldout) for i in range(size)]
            for name, task in tasks.items()}


# ---- 1. task interference ----------------------------------------------------------------------

def interference(loss_fn: Callable[[object], torch.Tensor], grad_data: object, eval_data: object,
                 groups: dict[str, list[torch.nn.Parameter]], lr: float) -> dict[str, np.ndarray]:
    """The task interference score (METHOD.md), per parameter group:

        I[i, j] = E_{x in task i} [ 1 - L_i(θ - η ∇_θ L_j) / L_i(θ) ]

    > 0: a step on task j lowers task i's loss (helps); < 0: it raises it (hurts). loss_fn(data)
    returns per-example losses (M tasks, n examples); the gradient of task j comes from
    grad_data, the losses it changes are measured on eval_data. θ is one group (e.g. a layer's
    LoRA A matrices); the rest of the model stays put.
    """
    grads = task_gradients(loss_fn, grad_data, groups)
    scores = {}
    with torch.no_grad():
        before = loss_fn(eval_data)  # (M, n)
        for name, group in groups.items():
            theta = [p.detach().clone() for p in group]
            score = np.zeros((len(grads), len(grads)))
            for j, grad in enumerate(grads):
                for p in group:
                    p.sub_(lr * grad[p])
                score[:, j] = (1 - loss_fn(eval_data) / before).mean(1).double().numpy()
                for p, t in zip(group, theta):
                    p.copy_(t)
            scores[name] = score
    return scores


def task_gradients(loss_fn: Callable[[object], torch.Tensor], data: object,
                   groups: dict[str, list[torch.nn.Parameter]]) -> list[dict[torch.nn.Parameter, torch.Tensor]]:
    """∇_θ L_j for every task j (the mean of its per-example losses on data), for every parameter of the groups."""
    params = [p for group in groups.values() for p in group]
    losses = loss_fn(data).mean(1)  # (M,)
    return [dict(zip(params, torch.autograd.grad(loss, params, retain_graph=True))) for loss in losses]


def gradient_cosines(loss_fn: Callable[[object], torch.Tensor], data: object, other_data: object,
                     groups: dict[str, list[torch.nn.Parameter]]) -> dict[str, np.ndarray]:
    """Gradient conflict without a step size (PCGrad's measure), per parameter group:

        C[i, j] = cos(∇_θ L_i, ∇_θ L_j) over the group's flattened parameters, in [-1, 1]

    < 0: the tasks pull θ apart. Task i's gradient comes from data and task j's from other_data,
    symmetrised: off the diagonal this is the plain cosine (the tasks' examples differ anyway),
    and the diagonal, instead of a trivial 1, is the agreement of two independent batches of
    one task: the ceiling that gradient noise leaves for the off-diagonal entries.
    """
    first, second = task_gradients(loss_fn, data, groups), task_gradients(loss_fn, other_data, groups)

    def unit(grads: list[dict], group: list[torch.nn.Parameter]) -> torch.Tensor:  # (M, |θ|)
        flat = torch.stack([torch.cat([g[p].flatten() for p in group]) for g in grads]).double()
        return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)

    cosines = {}
    for name, group in groups.items():
        c = unit(first, group) @ unit(second, group).T
        cosines[name] = ((c + c.T) / 2).numpy()
    return cosines


def example_losses(model: TinyMLLM, batches: dict[str, list[toy_tasks.Example]]) -> torch.Tensor:
    """Per-example answer loss, (M tasks, n): one forward over every task's examples (each
    instance's loss depends on that instance alone, padding and all)."""
    examples = [e for batch in batches.values() for e in batch]
    images, tokens, prompt_lens = train_toy.collate(examples, TOK, next(model.parameters()).device)
    logits, _ = model(images, tokens, prompt_lens)
    ce, is_answer = answer_losses(logits, tokens, prompt_lens)  # (N, L - 1) each
    return ((ce * is_answer).sum(1) / is_answer.sum(1)).view(len(batches), -1).cpu()


def adapter_groups(model: TinyMLLM) -> dict[str, list[torch.nn.Parameter]]:
    """{"layer 0 A": [lora_A of every adapted linear of block 0], "layer 0 B": [...], ...}"""
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for ell, block in enumerate(model.layers):
        adapters = [m for m in block.modules() if hasattr(m, "lora_A")]
        groups[f"layer {ell} A"] = [m.lora_A for m in adapters]
        groups[f"layer {ell} B"] = [m.lora_B for m in adapters]
    return groups


def run_interference(common: argparse.Namespace) -> dict:
    """I (the one-step score) and the gradient cosine for LoRA r=4 and MixLoRA E=16 r=4, at 1/4
    of their (same) training schedule: {"I" | "cosine": {method: {group: (M, M)}}}."""
    size = 16 if common.quick else 64
    grad_data, eval_data = task_batches(size, "grad"), task_batches(size, "eval")
    results: dict[str, dict] = {"I": {}, "cosine": {}}
    for label, flags in [("LoRA r=4", ["--methods", "lora"]), ("MixLoRA E=16 r=4", ["--methods", "mixlora"])]:
        args = toy_args(flags, common)
        model, _ = trained(flags, common, until=max(1, args.steps // 4))
        loss_fn = lambda d: example_losses(model, d)
        scores = interference(loss_fn, grad_data, eval_data, adapter_groups(model), common.interference_lr)
        cosines = gradient_cosines(loss_fn, grad_data, eval_data, adapter_groups(model))
        results["I"][label] = {k: v.tolist() for k, v in scores.items()}
        results["cosine"][label] = {k: v.tolist() for k, v in cosines.items()}
        heatmaps(scores, f"{label}: interference I[i, j] of task j (column) on task i (row), x100",
                 Path(common.out) / f"interference-{flags[1]}.png")
        heatmaps(cosines, f"{label}: gradient cosine of task i (row) and task j (column); diagonal: two batches of one task",
                 Path(common.out) / f"gradient-cosine-{flags[1]}.png", scale=1, digits=2)
    return results


def conflict_summary(results: dict, scale: float) -> str:
    """Per layer: how many off-diagonal entries are negative, their mean, the most negative, the
    mean off-diagonal and the mean diagonal entry (I: a task's step on itself; cosine: two
    batches of one task), all times `scale`."""
    lines = ["| Method | Layer | Params | Negative entries | Mean of negatives | Minimum off-diagonal | Mean off-diagonal | Mean diagonal |",
             "|---|---|---|---|---|---|---|---|"]
    for label, scores in results.items():
        for name, score in scores.items():
            layer, part = name.removeprefix("layer ").split()
            s = scale * np.array(score)
            off = s[~np.eye(len(s), dtype=bool)]
            neg = off[off < 0]
            lines.append(f"| {label} | {layer} | {part} | {len(neg)}/{len(off)} | {neg.mean() if len(neg) else 0:.2f} | "
                         f"{off.min():.2f} | {off.mean():.2f} | {np.diag(s).mean():.2f} |")
    return "\n".join(lines)


# ---- 2. factor-selection maps --------------------------------------------------------------------

def selections(model: TinyMLLM, examples: list[toy_tasks.Example], blocks: list[int]) -> dict[int, np.ndarray]:
    """Each instance's selection at a block: the multi-hot (E,) of S^A and of S^B of each of the
    block's adapted linears, concatenated: {block: (n, 12·E) bool}. Routed on the prompt only."""
    device = next(model.parameters()).device
    chosen: dict[int, list[np.ndarray]] = {b: [] for b in blocks}
    with torch.no_grad():
        for i in range(0, len(examples), 256):
            model(*train_toy.collate(examples[i:i + 256], TOK, device, with_answer=False))
            for b in blocks:
                hots = []
                for m in model.layers[b].modules():
                    if isinstance(m, MixLoRALinear):
                        for index in (m.last_routing.index_a, m.last_routing.index_b):
                            hots.append(torch.zeros(len(index), m.num_factors, dtype=torch.bool,
                                                    device=index.device).scatter_(1, index, True))
                chosen[b].append(torch.cat(hots, 1).cpu().numpy())
    return {b: np.concatenate(chosen[b]) for b in blocks}


def jaccard_distances(hot: np.ndarray) -> np.ndarray:
    """(n, k) multi-hot -> (n, n) Jaccard distance 1 - |a ∩ b| / |a ∪ b|."""
    h = hot.astype(np.float64)
    both = h @ h.T
    either = h.sum(1)[:, None] + h.sum(1)[None, :] - both
    return 1 - both / np.maximum(either, 1)


def nearest(distances: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """(n, m) distances -> (n, k) indices of the k nearest columns. Equal distances (common
    between multi-hot sets) are ordered at random, so ties cannot favour any label."""
    tiebreak = np.random.default_rng(seed).random(distances.shape)
    return np.lexsort((tiebreak, distances), axis=1)[:, :k]


def knn_purity(distances: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """The mean fraction of each point's k nearest neighbours (not itself) with its own label."""
    neighbours = nearest(distances + np.diag(np.full(len(distances), np.inf)), k)  # (n, k)
    return float((labels[neighbours] == labels[:, None]).mean())


def tsne(distances: np.ndarray, perplexity: float = 30.0, iters: int = 1000, seed: int = 0) -> np.ndarray:
    """Exact t-SNE (van der Maaten & Hinton, 2008) of a precomputed (n, n) distance matrix -> (n, 2).

    p_{j|i} ∝ exp(-β_i d_ij), β_i set by bisection so that each row has the given perplexity
    (distances used as given, not squared, as scikit-learn does for non-Euclidean metrics);
    P = (p_{j|i} + p_{i|j}) / 2n; q_ij ∝ (1 + |y_i - y_j|²)^-1; gradient descent on KL(P || Q)
    with early exaggeration, momentum and per-coordinate gains.
    """
    n = len(distances)
    P = np.zeros((n, n))
    for i in range(n):
        d = np.delete(distances[i], i)
        lo, hi, beta = 0.0, np.inf, 1.0
        for _ in range(64):
            p = np.exp(-(d - d.min()) * beta)
            p /= p.sum()
            entropy = -np.sum(p * np.log(np.maximum(p, 1e-12)))
            if abs(entropy - np.log(perplexity)) < 1e-5:
                break
            if entropy > np.log(perplexity):
                lo, beta = beta, beta * 2 if hi == np.inf else (beta + hi) / 2
            else:
                hi, beta = beta, (beta + lo) / 2
        P[i, np.arange(n) != i] = p
    P = np.maximum((P + P.T) / (2 * n), 1e-12)
    y = np.random.default_rng(seed).normal(0, 1e-4, (n, 2))
    velocity, gains, lr = np.zeros_like(y), np.ones_like(y), max(n / 48, 50)
    for it in range(iters):
        exaggeration, momentum = (12.0, 0.5) if it < 250 else (1.0, 0.8)
        diff = y[:, None] - y[None, :]  # (n, n, 2)
        w = 1 / (1 + (diff ** 2).sum(-1))
        np.fill_diagonal(w, 0)
        Q = np.maximum(w / w.sum(), 1e-12)
        grad = 4 * (((exaggeration * P - Q) * w)[:, :, None] * diff).sum(1)  # (n, 2)
        gains = np.where(np.sign(grad) != np.sign(velocity), gains + 0.2, gains * 0.8).clip(0.01)
        velocity = momentum * velocity - lr * gains * grad
        y = y + velocity
    return y - y.mean(0)


def run_selection(common: argparse.Namespace) -> dict:
    """Selections of MixLoRA E=16 r=4 trained with train_toy.py's default recipe, on new images:
    seen tasks with seen and with held-out templates, and the held-out task."""
    model, args = trained(["--methods", "mixlora"], common)
    n = 8 if common.quick else 60
    groups = [(name, "seen", batch) for name, batch in task_batches(n, "map").items()]
    groups += [(name, "held-out template" if name in toy_tasks.TASKS else "held-out task", batch)
               for name, batch in task_batches(n // 2, "map-heldout", heldout=True).items()]
    examples = [e for *_, batch in groups for e in batch]
    labels = np.array([name for name, _, batch in groups for _ in batch])
    kinds = np.array([kind for _, kind, batch in groups for _ in batch])
    blocks = sorted({0, len(model.layers) // 2, len(model.layers) - 1})
    chosen = selections(model, examples, blocks)

    # Baselines: the same instances through untrained MixLoRA (random routers at init, on the
    # same base), and input-independent random routing (each instance draws random factors).
    untrained = train_toy.adapt(train_toy.base_model(toy_args(["--seed", "0"], common), TOK, rank=0)[0], args, "mixlora")
    at_init = selections(untrained.eval(), examples, blocks)
    rng = np.random.default_rng(0)
    E, r = args.factors, args.rank
    seen = kinds == "seen"
    report = {"blocks": blocks, "k": 10, "purity": {}, "heldout_task_neighbours": {}}
    panels = []
    for b in blocks:
        random_hot = np.zeros_like(chosen[b])
        for col in range(0, chosen[b].shape[1], E):
            for row in random_hot:
                row[col + rng.choice(E, r, replace=False)] = True
        purity = {name: knn_purity(jaccard_distances(hot[seen]), labels[seen]) for name, hot in
                  [("trained routers", chosen[b]), ("untrained routers (init)", at_init[b]), ("random routing", random_hot)]}
        report["purity"][f"layer {b}"] = purity
        # Which seen tasks' instances does the held-out task's routing sit among?
        D = jaccard_distances(chosen[b])
        held = np.flatnonzero(kinds == "held-out task")
        near = np.flatnonzero(seen)[nearest(D[np.ix_(held, np.flatnonzero(seen))], 10)]
        names, counts = np.unique(labels[near], return_counts=True)
        report["heldout_task_neighbours"][f"layer {b}"] = {str(k): round(float(v) / near.size, 3) for k, v in
                                                         sorted(zip(names, counts), key=lambda x: -x[1])}
        panels.append((f"layer {b}: kNN task purity {purity['trained routers']:.2f} "
                       f"(random {purity['random routing']:.2f})", tsne(D, perplexity=10 if common.quick else 30)))
    scatter(panels, labels, kinds, Path(common.out) / "factor-selection-map.png")
    return report


# ---- 3. ablations ------------------------------------------------------------------------------

SWEEP = [(f"LoRA r={r}", ["--methods", "lora", "--rank", str(r)]) for r in (2, 4, 8, 16)]
SWEEP += [(f"MixLoRA E={E} r={r}", ["--methods", "mixlora", "--factors", str(E), "--rank", str(r)])
          for E in (16, 32) for r in (2, 4, 8)]
SWEEP += [("MixLoRA E=16 r=4, IFS only", ["--methods", "mixlora", "--no-cfs"]),
          ("MixLoRA E=16 r=4, frozen routers", ["--methods", "mixlora", "--frozen-routers"]),
          ("MixLoRA E=16 r=4, sigmoid scores", ["--methods", "mixlora", "--scores", "sigmoid"])]


def accuracy(flags: list[str], common: argparse.Namespace, seed: int, split: str = "eval",
             only: str | None = None) -> dict[str, dict[str, float]]:
    """Exact-match accuracy of one run ({split: {task: %}}) on the evaluation sets (split "eval";
    `only` keeps one task's) or on the validation split ("val"), trained if need be and cached
    as JSON under runs/analysis/sweep/ by run name."""
    args = toy_args(flags + ["--seed", str(seed)], common)
    cache = Path(common.out) / "sweep" / f"{train_toy.run_name(args, args.methods[0])}-{split}{args.eval_size}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    model, args = trained(flags, common, seed)
    if split == "val":
        sets = train_toy.validation_sets(args.eval_size)
    else:
        sets = {key: v for key, v in train_toy.evaluation_sets(args.eval_size).items() if only in (None, key[0])}
    result = train_toy.evaluate(model, TOK, sets)
    if args.methods[0] == "mixlora":
        result["routing"] = router_collapse(model, [e for batch in task_batches(32, "collapse").values() for e in batch])
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


@torch.no_grad()
def router_collapse(model: TinyMLLM, examples: list[toy_tasks.Example]) -> dict[str, dict[str, float]]:
    """Does the router saturate? Per block, the mean over its MixLoRA linears of mechanism.py's
    measures on the prompts of `examples`: the top-1 share of the chosen p^A (1/r: the chosen
    factors share the score evenly, 1: one takes it all), the effective number of chosen factors
    (r ... 1), and the factor usage perplexity (E: every factor as often, r: always the same)."""
    model.eval()
    model(*train_toy.collate(examples, TOK, next(model.parameters()).device, with_answer=False))
    report = {}
    for ell, block in enumerate(model.layers):
        layers = [m for m in block.modules() if isinstance(m, MixLoRALinear)]
        routings = [(m.last_routing, m.num_factors) for m in layers]
        report[f"layer {ell}"] = {
            "top1_share": float(np.mean([mechanism.top1_share(r.p_a, r.index_a) for r, _ in routings])),
            "effective_chosen": float(np.mean([mechanism.effective_chosen(r.p_a, r.index_a) for r, _ in routings])),
            "usage": float(np.mean([mechanism.usage_perplexity(r.index_a, E) for r, E in routings]))}
    return report


def run_sweep(common: argparse.Namespace) -> dict:
    """Every SWEEP row and a per-task LoRA r=4 specialist (trained on its task alone for 1/8 of
    the steps: the same examples of its task as the mixture gives), for each seed."""
    results: dict[str, dict[str, list[dict]]] = {}
    steps = toy_args([], common).steps
    jobs = [(label, flags, None) for label, flags in SWEEP]
    jobs += [("LoRA specialist r=4", ["--methods", "lora", "--tasks", t, "--steps", str(max(1, steps // len(TASKS)))], t)
             for t in TASKS]
    for seed in common.seeds:
        for label, flags, only in jobs:
            results.setdefault(label, {}).setdefault(str(seed), []).append(accuracy(flags, common, seed, only=only))
    # A specialist row's accuracy on each task is that task's own specialist's.
    return {label: [merge(runs) for runs in by_seed.values()] for label, by_seed in results.items()}


def merge(runs: list[dict]) -> dict:
    merged: dict[str, dict[str, float]] = {}
    for accuracy in runs:
        for split, tasks in accuracy.items():
            merged.setdefault(split, {}).update(tasks)
    return merged


# ---- 4. per-method learning rates ---------------------------------------------------------------

LEARNING_RATES = (5e-4, 1e-3, 2e-3, 4e-3, 8e-3)
TUNED = [("LoRA r=4", ["--methods", "lora"]),
         ("MixLoRA E=16 r=4", ["--methods", "mixlora"]),
         ("MixLoRA E=16 r=4, α=2E", ["--methods", "mixlora", "--alpha", "32"]),  # the released scale
         ("MixLoRA E=16 r=4, sigmoid scores", ["--methods", "mixlora", "--scores", "sigmoid"])]


def pick_lr(validation: dict[float, float]) -> float:
    """The learning rate with the best validation accuracy; a tie goes to the smaller rate. It is
    given the validation scores and nothing else, so the evaluation sets cannot steer it."""
    return max(sorted(validation), key=lambda lr: validation[lr])  # max keeps the first of equals


def run_tune(common: argparse.Namespace) -> dict:
    """Each TUNED row at every LEARNING_RATES on the tuning seeds, scored by the mean over tasks
    of the validation split (also averaged over those seeds); pick_lr chooses. Then the picked
    rate and train_toy.py's rate on the evaluation sets, for every seed: the tuned rows first,
    so that an interrupted run has the comparison that matters."""
    validation: dict[str, dict[float, float]] = {}
    picked: dict[str, float] = {}
    for label, flags in TUNED:
        validation[label] = {lr: float(np.mean([np.mean(list(accuracy(flags + ["--lr", f"{lr:g}"], common, seed, "val")
                                                             ["validation"].values())) for seed in common.tune_seeds]))
                             for lr in LEARNING_RATES}
        picked[label] = pick_lr(validation[label])
    rows = [(label, flags, picked[label]) for label, flags in TUNED]
    rows += [(label, flags, train_toy.DEFAULT_LR) for label, flags in TUNED if picked[label] != train_toy.DEFAULT_LR]
    table = {}
    for label, flags, lr in rows:
        name = f"{label}, lr {lr:g}" + (" (tuned)" if lr == picked[label] else "")
        table[name] = [accuracy(flags + ["--lr", f"{lr:g}"], common, seed) for seed in common.seeds]
    return {"validation": validation, "picked": picked, "table": table}


def tune_tables(results: dict) -> str:
    lines = ["Validation split (mean over the 8 tasks, seen templates, new images; seeds "
             f"{', '.join(map(str, results['tune_seeds']))}), by peak learning rate:", "",
             "| Model | " + " | ".join(f"{lr:g}" for lr in LEARNING_RATES) + " | picked |", "|---" * (len(LEARNING_RATES) + 2) + "|"]
    for label, scores in results["validation"].items():
        lines.append(f"| {label} | " + " | ".join(f"{scores[lr]:.1f}" for lr in LEARNING_RATES) + f" | {results['picked'][label]:g} |")
    return "\n".join(lines + ["", "Evaluation sets:", "", sweep_tables(results["table"])])


def sweep_tables(table: dict) -> str:
    """Averages per row (mean ± sample std over seeds), then every task of the seen templates."""
    def cell(values: list[float]) -> str:
        return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}" if len(values) > 1 else f"{values[0]:.1f}"

    lines = ["| Model | Seeds | Seen avg | Held-out templates avg | Held-out task (digit_colour) |", "|---|---|---|---|---|"]
    for label, runs in table.items():
        seen = [np.mean([r["seen"][t] for t in TASKS]) for r in runs]
        held = [np.mean([r["heldout"][t] for t in TASKS]) for r in runs]
        task = [r["heldout"].get("digit_colour") for r in runs]
        lines.append(f"| {label} | {len(runs)} | {cell(seen)} | {cell(held)} | "
                     f"{cell(task) if None not in task else '-'} |")
    note = " (the specialist row is the paper's Table 2)" if any("specialist" in label for label in table) else ""
    lines += ["", f"Seen templates, per task{note}:", "",
              "| Model | " + " | ".join(TASKS) + " | Avg |", "|---" * (len(TASKS) + 2) + "|"]
    for label, runs in table.items():
        per_task = [cell([r["seen"][t] for r in runs]) for t in TASKS]
        avg = cell([np.mean([r["seen"][t] for t in TASKS]) for r in runs])
        lines.append(f"| {label} | " + " | ".join(per_task) + f" | {avg} |")
    return "\n".join(lines) + collapse_table(table)


def collapse_table(table: dict) -> str:
    """router_collapse of every MixLoRA row, per block, mean over the seeds."""
    rows = {label: runs for label, runs in table.items() if "routing" in runs[0]}
    if not rows:
        return ""
    blocks = list(next(iter(rows.values()))[0]["routing"])
    lines = ["", "", "Router collapse per block, on 32 prompts per task (mean over seeds): top-1 share of the chosen "
             "p^A (1/r = even, 1 = one factor takes all) / effective chosen factors (r ... 1) / factor usage "
             "perplexity (of E):", "",
             "| Model | " + " | ".join(blocks) + " |", "|---" * (len(blocks) + 1) + "|"]
    for label, runs in rows.items():
        cells = [" / ".join(f"{np.mean([r['routing'][b][k] for r in runs]):.{d}f}"
                            for k, d in [("top1_share", 2), ("effective_chosen", 2), ("usage", 1)]) for b in blocks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- pictures ----------------------------------------------------------------------------------

FONT = ImageFont.load_default(size=12)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (23, 190, 207), (188, 189, 34)]


def heatmaps(scores: dict[str, np.ndarray], title: str, path: Path, cell: int = 38, scale: float = 100,
             digits: int = 1) -> None:
    """One panel per group (columns: layers, rows: A then B); red positive, blue negative, one
    colour scale for the whole figure, the score x scale written in each cell."""
    names = list(scores)
    layers = sorted({n.rsplit(" ", 1)[0] for n in names}, key=lambda s: int(s.split()[1]))
    M, label_w = len(TASKS), 72
    panel = label_w + M * cell + 16
    img = Image.new("RGB", (panel * len(layers), 44 + 2 * (label_w + M * cell + 24)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((6, 6), title, fill="black", font=FONT)
    vmax = max(np.abs(s).max() for s in scores.values()) or 1.0
    for c, layer in enumerate(layers):
        for r, part in enumerate("AB"):
            s = scores[f"{layer} {part}"]
            x0, y0 = c * panel + label_w, 44 + r * (label_w + M * cell + 24) + label_w
            draw.text((x0, y0 - label_w - 16), f"{layer}, LoRA {part}", fill="black", font=FONT)
            for i in range(M):
                draw.text((x0 - label_w + 2, y0 + i * cell + cell // 3), TASKS[i], fill="black", font=FONT)
                name = Image.new("RGB", (label_w - 8, 14), "white")
                ImageDraw.Draw(name).text((0, 0), TASKS[i], fill="black", font=FONT)
                img.paste(name.rotate(90, expand=True), (x0 + i * cell + cell // 3, y0 - label_w + 6))
                for j in range(M):
                    t = min(1.0, abs(s[i, j]) / vmax)
                    fade = int(255 * (1 - t))
                    colour = (255, fade, fade) if s[i, j] > 0 else (fade, fade, 255)
                    box = (x0 + j * cell, y0 + i * cell, x0 + (j + 1) * cell - 1, y0 + (i + 1) * cell - 1)
                    draw.rectangle(box, fill=colour)
                    draw.text((box[0] + 3, box[1] + cell // 3), f"{scale * s[i, j]:.{digits}f}",
                              fill="white" if t > 0.6 else "black", font=FONT)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def scatter(panels: list[tuple[str, np.ndarray]], labels: np.ndarray, kinds: np.ndarray, path: Path,
            size: int = 360) -> None:
    """One 2-D map per layer, coloured by task: dots = seen templates, rings = held-out
    templates, crosses = the held-out task."""
    names = list(dict.fromkeys(labels))
    img = Image.new("RGB", (size * len(panels), size + 60), "white")
    draw = ImageDraw.Draw(img)
    for p, (title, y) in enumerate(panels):
        draw.text((p * size + 6, 4), title, fill="black", font=FONT)
        lo, hi = y.min(0), y.max(0)
        xy = (y - lo) / np.maximum(hi - lo, 1e-9) * (size - 40) + [p * size + 20, 24]
        for (px, py), label, kind in zip(xy, labels, kinds):
            colour = PALETTE[names.index(label) % len(PALETTE)]
            if kind == "seen":
                draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
            elif kind == "held-out template":
                draw.ellipse((px - 3, py - 3, px + 3, py + 3), outline=colour)
            else:
                draw.line((px - 3, py - 3, px + 3, py + 3), fill=colour, width=2)
                draw.line((px - 3, py + 3, px + 3, py - 3), fill=colour, width=2)
    for k, name in enumerate(names):
        x, y = 10 + (k % 5) * 150, size + 10 + (k // 5) * 22
        draw.rectangle((x, y + 2, x + 10, y + 12), fill=PALETTE[k % len(PALETTE)])
        draw.text((x + 14, y), name, fill="black", font=FONT)
    draw.text((size * len(panels) - 330, size + 40), "dot: seen template  ring: held-out template  x: held-out task",
              fill="black", font=FONT)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# ---- command line ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("command", choices=["interference", "selection", "sweep", "tune"])
    p.add_argument("--seeds", type=cli.integers(0), default="0,1,2", help="sweep, tune: comma-separated stage-2 seeds to report")
    p.add_argument("--tune-seeds", type=cli.integers(0), default="0", help="tune: the seeds whose validation scores pick the lr")
    p.add_argument("--interference-lr", type=cli.above(0.0), default=0.01, help="η of the one SGD step in I")
    p.add_argument("--device", type=cli.device, default="auto")
    p.add_argument("--quick", action="store_true", help="the smoke-test model and a few steps")
    p.add_argument("--out", default="runs/analysis")
    p.add_argument("--checkpoints", default="checkpoints")
    p.add_argument("--steps", type=cli.at_least(1), help="sweep, tune: stage-2 steps (default: train_toy.py's)")
    p.add_argument("--eval-size", type=cli.at_least(1), help="sweep, tune: examples per task and split (default: train_toy.py's)")
    common = p.parse_args(argv)
    common.toy_flags = [f for flag, value in [("--steps", common.steps), ("--eval-size", common.eval_size)]
                        if value is not None for f in (flag, str(value))]
    out = Path(common.out)
    out.mkdir(parents=True, exist_ok=True)
    if common.command == "interference":
        results = run_interference(common)
        text = (f"Interference I (x100, η = {common.interference_lr}):\n\n" + conflict_summary(results["I"], 100)
                + "\n\nGradient cosine:\n\n" + conflict_summary(results["cosine"], 1))
    elif common.command == "selection":
        results = run_selection(common)
        text = "kNN task purity (k = 10), seen tasks:\n\n" + "\n".join(
            f"- {layer}: " + ", ".join(f"{k} {v:.3f}" for k, v in purity.items())
            for layer, purity in results["purity"].items())
        text += "\n\nThe held-out task's 10 nearest seen-task selections, by task:\n\n" + "\n".join(
            f"- {layer}: {shares}" for layer, shares in results["heldout_task_neighbours"].items())
    elif common.command == "sweep":
        results = run_sweep(common)
        text = sweep_tables(results)
    else:
        results = {**run_tune(common), "tune_seeds": common.tune_seeds, "seeds": common.seeds}
        text = tune_tables(results)
    stem = common.command + ("-quick" if common.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(text + "\n")
    print(text)
    return results


if __name__ == "__main__":
    main()
