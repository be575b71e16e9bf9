"""The paper's analyses, measured on the toy suite: task interference, factor-selection maps, ablations.

    python -m experiments.analysis interference   # I_ij and gradient cosines, LoRA and MixLoRA, A and B, every layer
    python -m experiments.analysis selection      # t-SNE maps of MixLoRA's factor selections, kNN task purity
    python -m experiments.analysis sweep          # ablations over 3 seeds: ranks, factors, CFS, routers, specialists
    python -m experiments.analysis tune           # per-method learning rates picked on a validation split, then 3 seeds

Each writes PNGs (drawn with pillow), Markdown and JSON under experiments/results/analysis/. They
reuse train_toy.py's stage-1 base (seed 0) and its training loop (experiments/common.py), so every
number here comes from the same recipe as train_toy.py's table. `--quick` runs each on the
smoke-test model.
"""

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import cli
import toy_tasks
import train_toy
from experiments import common
from experiments.common import FONT, PALETTE, cell
from train_toy import Config

TASKS = list(toy_tasks.TASKS)


def task_batches(size: int, tag: str, heldout: bool = False) -> dict[str, list[toy_tasks.Example]]:
    tasks = {**toy_tasks.TASKS, **toy_tasks.HELDOUT_TASKS} if heldout else toy_tasks.TASKS
    return {name: toy_tasks.samples(task, size, f"{tag}-{name}", heldout) for name, task in tasks.items()}


# ---- 1. task interference ----------------------------------------------------------------------

def interference(loss_fn: Callable[[object], torch.Tensor], grad_data: object, eval_data: object,
                 groups: dict[str, list[torch.nn.Parameter]], lr: float) -> dict[str, np.ndarray]:
    """The task interference score (docs/method.md §7.2), per parameter group:

        I[i, j] = E_{x in task i} [ 1 - L_i(θ - η ∇_θ L_j) / L_i(θ) ]

    > 0: a step on task j lowers task i's loss (helps); < 0: it raises it (hurts). loss_fn(data)
    returns per-example losses (M tasks, n examples); the gradient of task j comes from
    grad_data, the losses it changes are measured on eval_data. θ is one group (e.g. a layer's
    LoRA A matrices); the rest of the model stays put.
    """
    grads = common.task_gradients(loss_fn, grad_data, groups)
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


def run_interference(config: Config, lr: float, out: Path) -> dict:
    """I (the one-step score, step size lr) and the gradient cosine for LoRA r=4 and MixLoRA E=16
    r=4, at 1/4 of their (same) training schedule: {"I" | "cosine": {method: {group: (M, M)}}}."""
    size = 16 if config.quick else 64
    grad_data, eval_data = task_batches(size, "grad"), task_batches(size, "eval")
    results: dict[str, dict] = {"I": {}, "cosine": {}}
    for label, method in [("LoRA r=4", "lora"), ("MixLoRA E=16 r=4", "mixlora")]:
        model = common.trained(replace(config, method=method), until=max(1, config.steps // 4))
        loss_fn = lambda d: common.example_losses(model, d)
        scores = interference(loss_fn, grad_data, eval_data, common.adapter_groups(model), lr)
        cosines = common.gradient_cosines(loss_fn, grad_data, eval_data, common.adapter_groups(model))
        results["I"][label] = {k: v.tolist() for k, v in scores.items()}
        results["cosine"][label] = {k: v.tolist() for k, v in cosines.items()}
        heatmaps(scores, f"{label}: interference I[i, j] of task j (column) on task i (row), x100",
                 out / f"interference-{method}.png")
        heatmaps(cosines, f"{label}: gradient cosine of task i (row) and task j (column); diagonal: two batches of one task",
                 out / f"gradient-cosine-{method}.png", scale=1, digits=2)
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

def jaccard_distances(hot: np.ndarray) -> np.ndarray:
    """(n, k) multi-hot -> (n, n) Jaccard distance 1 - |a ∩ b| / |a ∪ b|."""
    return 1 - common.jaccard(torch.from_numpy(hot).double()).numpy()


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


def run_selection(config: Config, out: Path) -> dict:
    """Selections of MixLoRA E=16 r=4 trained with train_toy.py's default recipe, on new images:
    seen tasks with seen and with held-out templates, and the held-out task."""
    config = replace(config, method="mixlora")
    model = common.trained(config)
    n = 8 if config.quick else 60
    groups = [(name, "seen", batch) for name, batch in task_batches(n, "map").items()]
    groups += [(name, "held-out template" if name in toy_tasks.TASKS else "held-out task", batch)
               for name, batch in task_batches(n // 2, "map-heldout", heldout=True).items()]
    examples = [e for *_, batch in groups for e in batch]
    labels = np.array([name for name, _, batch in groups for _ in batch])
    kinds = np.array([kind for _, kind, batch in groups for _ in batch])
    blocks = sorted({0, len(model.layers) // 2, len(model.layers) - 1})
    chosen = common.selections(model, examples, blocks)

    # Baselines: the same instances through untrained MixLoRA (random routers at init, on the
    # same base), and input-independent random routing (each instance draws random factors).
    at_init = common.selections(common.untrained(config).eval(), examples, blocks)
    rng = np.random.default_rng(0)
    E, r = config.factors, config.rank
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
                       f"(random {purity['random routing']:.2f})", tsne(D, perplexity=10 if config.quick else 30)))
    scatter(panels, labels, kinds, out / "factor-selection-map.png")
    return report


# ---- 3. ablations ------------------------------------------------------------------------------

SWEEP = [(f"LoRA r={r}", dict(method="lora", rank=r)) for r in (2, 4, 8, 16)]
SWEEP += [(f"MixLoRA E={E} r={r}", dict(method="mixlora", factors=E, rank=r)) for E in (16, 32) for r in (2, 4, 8)]
SWEEP += [("MixLoRA E=16 r=4, IFS only", dict(method="mixlora", conditional=False)),
          ("MixLoRA E=16 r=4, frozen routers", dict(method="mixlora", router_grad=False)),
          ("MixLoRA E=16 r=4, sigmoid scores", dict(method="mixlora", scores="sigmoid"))]


def accuracy(config: Config, out: Path, split: str = "eval", only: str | None = None) -> dict[str, dict[str, float]]:
    """Exact-match accuracy of one run ({split: {task: %}}) on the evaluation sets (split "eval";
    `only` keeps one task's) or on the validation split ("val"), with router collapse for MixLoRA."""
    if split == "val":
        sets = train_toy.validation_sets(config.eval_size)
    else:
        sets = {key: v for key, v in train_toy.evaluation_sets(config.eval_size).items() if only in (None, key[0])}
    collapse = [e for batch in task_batches(32, "collapse").values() for e in batch] if config.method == "mixlora" else None
    return common.accuracy(config, sets, f"{split}{config.eval_size}", out, collapse_on=collapse)


def run_sweep(config: Config, seeds: list[int], out: Path) -> dict:
    """Every SWEEP row and a per-task LoRA r=4 specialist (trained on its task alone for 1/8 of
    the steps: the same examples of its task as the mixture gives), for each seed."""
    results: dict[str, dict[str, list[dict]]] = {}
    jobs = [(label, replace(config, **changes), None) for label, changes in SWEEP]
    jobs += [("LoRA specialist r=4", replace(config, method="lora", tasks=(t,), steps=max(1, config.steps // len(TASKS))), t)
             for t in TASKS]
    for seed in seeds:
        for label, job, only in jobs:
            results.setdefault(label, {}).setdefault(str(seed), []).append(
                accuracy(replace(job, seed=seed), out, only=only))
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
TUNED = [("LoRA r=4", dict(method="lora")),
         ("MixLoRA E=16 r=4", dict(method="mixlora")),
         ("MixLoRA E=16 r=4, α=2E", dict(method="mixlora", scaling=8.0)),  # α = 2E = 32 at r = 4: the released scale
         ("MixLoRA E=16 r=4, sigmoid scores", dict(method="mixlora", scores="sigmoid"))]


def pick_lr(validation: dict[float, float]) -> float:
    """The learning rate with the best validation accuracy; a tie goes to the smaller rate. It is
    given the validation scores and nothing else, so the evaluation sets cannot steer it."""
    return max(sorted(validation), key=lambda lr: validation[lr])  # max keeps the first of equals


def run_tune(config: Config, seeds: list[int], tune_seeds: list[int], out: Path) -> dict:
    """Each TUNED row at every LEARNING_RATES on the tuning seeds, scored by the mean over tasks
    of the validation split (also averaged over those seeds); pick_lr chooses. Then the picked
    rate and train_toy.py's rate on the evaluation sets, for every seed: the tuned rows first,
    so that an interrupted run has the comparison that matters."""
    validation: dict[str, dict[float, float]] = {}
    picked: dict[str, float] = {}
    for label, changes in TUNED:
        validation[label] = {lr: float(np.mean([common.mean_accuracy(accuracy(
            replace(config, **changes, lr=lr, seed=seed), out, "val"), "validation") for seed in tune_seeds]))
                             for lr in LEARNING_RATES}
        picked[label] = pick_lr(validation[label])
    rows = [(label, changes, picked[label]) for label, changes in TUNED]
    rows += [(label, changes, train_toy.DEFAULT_LR) for label, changes in TUNED if picked[label] != train_toy.DEFAULT_LR]
    table = {}
    for label, changes, lr in rows:
        name = f"{label}, lr {lr:g}" + (" (tuned)" if lr == picked[label] else "")
        table[name] = [accuracy(replace(config, **changes, lr=lr, seed=seed), out) for seed in seeds]
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

def heatmaps(scores: dict[str, np.ndarray], title: str, path: Path, px: int = 38, scale: float = 100,
             digits: int = 1) -> None:
    """One panel per group (columns: layers, rows: A then B); red positive, blue negative, one
    colour scale for the whole figure, the score x scale written in each cell (px pixels wide)."""
    names = list(scores)
    layers = sorted({n.rsplit(" ", 1)[0] for n in names}, key=lambda s: int(s.split()[1]))
    M, label_w = len(TASKS), 72
    panel = label_w + M * px + 16
    img = Image.new("RGB", (panel * len(layers), 44 + 2 * (label_w + M * px + 24)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((6, 6), title, fill="black", font=FONT)
    vmax = max(np.abs(s).max() for s in scores.values()) or 1.0
    for c, layer in enumerate(layers):
        for r, part in enumerate("AB"):
            s = scores[f"{layer} {part}"]
            x0, y0 = c * panel + label_w, 44 + r * (label_w + M * px + 24) + label_w
            draw.text((x0, y0 - label_w - 16), f"{layer}, LoRA {part}", fill="black", font=FONT)
            for i in range(M):
                draw.text((x0 - label_w + 2, y0 + i * px + px // 3), TASKS[i], fill="black", font=FONT)
                name = Image.new("RGB", (label_w - 8, 14), "white")
                ImageDraw.Draw(name).text((0, 0), TASKS[i], fill="black", font=FONT)
                img.paste(name.rotate(90, expand=True), (x0 + i * px + px // 3, y0 - label_w + 6))
                for j in range(M):
                    colour, ink = common.heat(s[i, j], vmax)
                    box = (x0 + j * px, y0 + i * px, x0 + (j + 1) * px - 1, y0 + (i + 1) * px - 1)
                    draw.rectangle(box, fill=colour)
                    draw.text((box[0] + 3, box[1] + px // 3), f"{scale * s[i, j]:.{digits}f}",
                              fill=ink, font=FONT)
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
    p.add_argument("--out", default=None, help="default: experiments/results/analysis (runs/analysis-quick with --quick)")
    p.add_argument("--checkpoints", default="checkpoints")
    p.add_argument("--steps", type=cli.at_least(1), help="sweep, tune: stage-2 steps (default: train_toy.py's)")
    p.add_argument("--eval-size", type=cli.at_least(1), help="sweep, tune: examples per task and split (default: train_toy.py's)")
    args = p.parse_args(argv)
    out = Path(args.out or ("runs/analysis-quick" if args.quick else "experiments/results/analysis"))
    config = common.config(args.quick, args.device, args.checkpoints,
                           **{k: v for k, v in [("steps", args.steps), ("eval_size", args.eval_size)] if v is not None})
    out.mkdir(parents=True, exist_ok=True)
    if args.command == "interference":
        results = run_interference(config, args.interference_lr, out)
        text = (f"Interference I (x100, η = {args.interference_lr}):\n\n" + conflict_summary(results["I"], 100)
                + "\n\nGradient cosine:\n\n" + conflict_summary(results["cosine"], 1))
    elif args.command == "selection":
        results = run_selection(config, out)
        text = "kNN task purity (k = 10), seen tasks:\n\n" + "\n".join(
            f"- {layer}: " + ", ".join(f"{k} {v:.3f}" for k, v in purity.items())
            for layer, purity in results["purity"].items())
        text += "\n\nThe held-out task's 10 nearest seen-task selections, by task:\n\n" + "\n".join(
            f"- {layer}: {shares}" for layer, shares in results["heldout_task_neighbours"].items())
    elif args.command == "sweep":
        results = run_sweep(config, args.seeds, out)
        text = sweep_tables(results)
    else:
        results = {**run_tune(config, args.seeds, args.tune_seeds, out), "tune_seeds": args.tune_seeds, "seeds": args.seeds}
        text = tune_tables(results)
    stem = args.command + ("-quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(text + "\n")
    print(text)
    return results


if __name__ == "__main__":
    main()
