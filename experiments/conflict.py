"""Where the paper's claim holds: the toy VLM with its task conflict turned up.

    python -m experiments.conflict                 # K = 4 and 6, κ = 0, 0.5, 1, seeds 0-2 -> experiments/results/conflict/
    python -m experiments.conflict --num-tasks 4   # one K (two such processes share the CPU's cores; the
                                                   # runs are cached, a last plain call gathers them)
    python -m experiments.conflict --quick         # the same pipeline on the smoke-test model (CI)

mechanism.py shows, on one layer with a known answer, that MixLoRA beats LoRA only where tasks
conflict (the same inputs need different updates) and the task is readable from x̄. The toy
suite sits at low conflict. Here the same tiny model and stage-1 base are trained, in stage 2,
on toy_tasks.conflict_tasks(K, κ): K tasks that ask the colour of a shape, each behind its own
instruction word, answering through mappings that disagree on a fraction κ of the images.

For each K, κ and seed: LoRA r=4 and r=16, MixLoRA E=16 r=4 (softmax scores, the paper; and
sigmoid scores), MixLoRA with oracle routing (task k gets its own r factors in every layer: the
ceiling for routing, as in mechanism.py), and per-task LoRA r=4 specialists (each on its task
alone, for steps/K steps: the examples of its task the mixture gives). Exact match of the greedy
answer on new images, seen and held-out phrasings. The conflict is measured, not assumed: the
cosine between the tasks' gradients on LoRA r=4's adapters (common.gradient_cosines), at the
start and at 1/4 of the schedule. Whether trained routing tells the tasks apart, as the oracle
does, is measured too (routing_separation). Next to the toy's gaps, mechanism.py's prediction
for the same K, with a task x̄ shows clearly (s = 2) and faintly (s = 0.5).
"""

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import cli
import toy_tasks
import train_toy
from experiments import common, mechanism
from experiments.common import cell
from tiny_mllm import TinyMLLM
from train_toy import Config

KS = (4, 6)
CONFLICTS = (0.0, 0.5, 1.0)
METHODS = {  # label: how the run differs from the experiment's Config (the oracle: common.add_oracle)
    "LoRA r=4": dict(method="lora", rank=4),
    "LoRA r=16": dict(method="lora", rank=16),
    "MixLoRA E=16 r=4": dict(method="mixlora"),
    "MixLoRA E=16 r=4, sigmoid scores": dict(method="mixlora", scores="sigmoid"),
    "MixLoRA oracle routing": dict(method="oracle"),
    "LoRA specialists r=4": dict(method="lora", rank=4),
}
ROUTED = ["MixLoRA E=16 r=4", "MixLoRA E=16 r=4, sigmoid scores", "MixLoRA oracle routing"]


# ---- one run -------------------------------------------------------------------------------------

def run(label: str, config: Config) -> tuple[Config, common.Adapt]:
    """The Config and the adapters of one method (config names K, κ and the seed)."""
    return replace(config, **METHODS[label]), common.add_oracle if label == "MixLoRA oracle routing" else train_toy.adapt


def trained(label: str, config: Config, until: int | None = None) -> TinyMLLM:
    return common.trained(*run(label, config), until=until)


def specialists(config: Config) -> list[Config]:
    """One LoRA r=4 per task, on its task alone for steps/K steps: the examples of its task the mixture gives."""
    suite = train_toy.suite(config)
    return [replace(config, method="lora", rank=4, tasks=(name,), steps=max(1, config.steps // len(suite)))
            for name in suite]


def accuracy(label: str, config: Config, out: Path) -> dict:
    """{split: {task: exact match %}} (and, for the trained routers, router_collapse per block)."""
    tasks = list(train_toy.suite(config).values())
    collapse = [e for t in tasks for e in common.conflict_sets([t], 32)[t.name, "seen"]] if label in ROUTED[:2] else None
    if label == "LoRA specialists r=4":  # each task's accuracy is its own specialist's
        result: dict = {}
        for run_config, task in zip(specialists(config), tasks):
            for split, scores in common.accuracy(run_config, common.conflict_sets([task], config.eval_size),
                                                 "conflict", out).items():
                result.setdefault(split, {}).update(scores)
        return result
    run_config, adapt = run(label, config)
    return common.accuracy(run_config, common.conflict_sets(tasks, config.eval_size), "conflict", out, adapt, collapse)


def gradient_conflict(model: TinyMLLM, tasks: list[toy_tasks.Task], quick: bool, parts: str = "AB") -> dict[str, float]:
    """How much the tasks' gradients disagree on LoRA's adapters: the mean off-diagonal cosine over
    the blocks' A and/or B matrices (common.gradient_cosines; the most negative block's too), and
    the diagonal, where two batches of one task agree: the ceiling that gradient noise leaves."""
    size = 16 if quick else 64
    batches = [{t.name: toy_tasks.samples(t, size, f"{tag}-conflict-{t.name}") for t in tasks} for tag in ("grad", "eval")]
    groups = {name: group for name, group in common.adapter_groups(model).items() if name[-1] in parts}
    cosines = common.gradient_cosines(lambda d: common.example_losses(model, d), *batches, groups)
    off = [c[~np.eye(len(c), dtype=bool)].mean() for c in cosines.values()]
    return {"off_diagonal": float(np.mean(off)), "off_diagonal_min": float(np.min(off)),
            "diagonal": float(np.mean([np.diag(c).mean() for c in cosines.values()]))}


def routing_separation(model: TinyMLLM, tasks: list[toy_tasks.Task]) -> dict[str, float | list[float]]:
    """Do the routers tell the tasks apart? The mean Jaccard similarity of two instances' selections
    (S^A and S^B of every MixLoRA linear of a block, common.selections) within a task and between
    tasks, averaged over the blocks: 1 and 0 for the oracle; equal when routing is blind to the task.

    And could they? "signal": per block, how far apart the tasks' x̄ are (x̄: the prompt-masked
    mean of the input of the block's first adapted linear, what its router reads): the distance of
    two tasks' centroids in units of the within-task spread along the line through them (d'),
    averaged over the pairs of tasks. In mechanism.py, d' = s·√(2T): 8 at s = 2, 2 at s = 0.5.
    """
    per_task = 32
    examples = [e for t in tasks for e in common.conflict_sets([t], per_task)[t.name, "seen"]]
    labels = np.repeat(np.arange(len(tasks)), per_task)
    same, other = labels[:, None] == labels[None, :], ~np.eye(len(labels), dtype=bool)
    seen, hots = common.routing_view(model, examples)
    sims = [common.jaccard(torch.from_numpy(hot).double()).numpy() for hot in hots.values()]
    return {"within": float(np.mean([s[same & other].mean() for s in sims])),
            "between": float(np.mean([s[~same].mean() for s in sims])),
            "signal": [d_prime(seen[b], labels) for b in range(len(model.layers))]}


def d_prime(x: np.ndarray, labels: np.ndarray) -> float:
    """(n, d) points in groups: the distance between two groups' centroids in units of the points'
    spread around them along the line through the centroids, averaged over the pairs of groups."""
    groups = np.unique(labels)
    centroids = {k: x[labels == k].mean(0) for k in groups}
    pairs = []
    for i, j in [(i, j) for i in groups for j in groups if i < j]:
        gap = np.linalg.norm(centroids[i] - centroids[j])
        line = (centroids[i] - centroids[j]) / gap
        spread = np.concatenate([(x[labels == k] - centroids[k]) @ line for k in (i, j)]).std()
        pairs.append(gap / spread)
    return float(np.mean(pairs))


SIGNALS = (2.0, 0.5)  # mechanism.py's s for the prediction: a task x̄ shows clearly (d' = 8), and faintly (d' = 2)


def prediction(num_tasks: int, conflict: float, seeds: list[int], quick: bool) -> dict[str, dict[str, list[float]]]:
    """mechanism.py at the same K and κ, at each of SIGNALS: the unexplained fraction of LoRA r=q,
    MixLoRA (softmax and sigmoid scores) and oracle routing, {"s=2": {method: [per seed]}, ...}."""
    predicted = {}
    for s in SIGNALS:
        cfg = mechanism.Config(num_tasks=num_tasks, conflict=conflict, signal=s)
        cfg = replace(cfg, steps=40, log_every=40, eval_instances=128) if quick else replace(cfg, log_every=cfg.steps)
        predicted[f"s={s:g}"] = {m: [mechanism.run(m, cfg, seed)["error"] for seed in seeds]
                                 for m in ["LoRA r=q", "MixLoRA", "MixLoRA sigmoid scores", "oracle routing"]}
    return predicted


# ---- the report ----------------------------------------------------------------------------------

def seen(run: dict) -> float:
    return common.mean_accuracy(run, "seen")


def heldout(run: dict) -> float:
    return common.mean_accuracy(run, "heldout")


def tables(results: dict) -> str:
    lines = ["Exact match % on new images (mean ± sample std over the seeds), seen and held-out phrasings:", "",
             "| K | κ | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for key, point in results["runs"].items():
        K, kappa = key.split(",")
        lines.append(f"| {K} | {kappa} | " + " | ".join(f"{cell([seen(r) for r in point[m]])} / {cell([heldout(r) for r in point[m]])}"
                                                   for m in METHODS) + " |")
    lines += ["", "Gap to LoRA r=4 on the seen phrasings, points (positive: better than LoRA r=4); in how many seeds better:", "",
              "| K | κ | " + " | ".join(m for m in METHODS if m != "LoRA r=4") + " |", "|---|---|" + "---|" * (len(METHODS) - 1)]
    for key, point in results["runs"].items():
        K, kappa = key.split(",")
        base = [seen(r) for r in point["LoRA r=4"]]
        gaps = {m: [seen(r) - b for r, b in zip(point[m], base)] for m in METHODS if m != "LoRA r=4"}
        lines.append(f"| {K} | {kappa} | " + " | ".join(f"{np.mean(g):+.1f} ({sum(x > 0 for x in g)}/{len(g)})"
                                                   for g in gaps.values()) + " |")
    lines += ["", "Gradient conflict between the tasks, on LoRA r=4's adapters (seed 0): the cosine of two tasks' "
              "gradients, mean over the off-diagonal pairs and the blocks (in brackets: the most negative block), "
              "and the diagonal (two batches of one task: the noise ceiling); at the start (the B matrices: A's "
              "gradient is zero while B = 0) and at 1/4 of the schedule (A and B):", "",
              "| K | κ | start: off-diagonal | start: diagonal | 1/4: off-diagonal | 1/4: diagonal |", "|---|---|---|---|---|---|"]
    for key, g in results["cosine"].items():
        s, q = g["start"], g["quarter"]
        lines.append(f"| {key.replace(',', ' | ')} | {s['off_diagonal']:.3f} ({s['off_diagonal_min']:.3f}) | {s['diagonal']:.3f} "
                     f"| {q['off_diagonal']:.3f} ({q['off_diagonal_min']:.3f}) | {q['diagonal']:.3f} |")
    separated = list(next(iter(results["separation"].values())))
    lines += ["", "Do the routers tell the tasks apart? Mean Jaccard similarity of two instances' selections within a "
              "task / between tasks, over every block (mean over seeds; the oracle: 1 / 0):", "",
              "| K | κ | " + " | ".join(separated) + " |", "|---|---|" + "---|" * len(separated)]
    for key, point in results["separation"].items():
        lines.append(f"| {key.replace(',', ' | ')} | " + " | ".join(
            f"{np.mean([r['within'] for r in runs]):.2f} / {np.mean([r['between'] for r in runs]):.2f}"
            for runs in point.values()) + " |")
    lines += ["", "Could they? The task signal in x̄, per block: d', the distance between two tasks' mean x̄ in units "
              "of their spread along that line (mean over task pairs and seeds; mechanism.py's d' = s·√(2T) is 8 "
              "at s = 2, 2 at s = 0.5):", "", "| K | κ | " + " | ".join(separated) + " |", "|---|---|" + "---|" * len(separated)]
    for key, point in results["separation"].items():
        lines.append(f"| {key.replace(',', ' | ')} | " + " | ".join(
            " · ".join(f"{v:.1f}" for v in np.mean([r["signal"] for r in runs], axis=0)) for runs in point.values()) + " |")
    methods = list(next(iter(next(iter(results["prediction"].values())).values())))
    lines += ["", "mechanism.py at the same K and κ, at s = 2 and s = 0.5: unexplained fraction, mean ± std over "
              "the seeds:", "", "| K | κ | s | " + " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    for key, by_signal in results["prediction"].items():
        for s, p in by_signal.items():
            lines.append(f"| {key.replace(',', ' | ')} | {s[2:]} | " + " | ".join(cell(v, 3) for v in p.values()) + " |")
    lines += ["", "Router collapse of the trained MixLoRA rows, mean over blocks and seeds: top-1 share of the chosen "
              "p^A / effective chosen factors (of r):", "", "| K | κ | " + " | ".join(ROUTED[:2]) + " |", "|---|---|---|---|"]
    for key, point in results["runs"].items():
        cells = []
        for m in ROUTED[:2]:
            blocks = [b for r in point[m] for b in r["routing"].values()]
            cells.append(f"{np.mean([b['top1_share'] for b in blocks]):.2f} / {np.mean([b['effective_chosen'] for b in blocks]):.2f}")
        lines.append(f"| {key.replace(',', ' | ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


COLOURS = {"LoRA r=16": (0, 0, 0), "MixLoRA E=16 r=4": common.PALETTE[0], "MixLoRA E=16 r=4, sigmoid scores": common.PALETTE[1],
           "MixLoRA oracle routing": common.PALETTE[2], "LoRA specialists r=4": common.PALETTE[4]}


def figure(results: dict, path: Path) -> None:
    """Per K, two panels: the toy's seen-phrasing gap to LoRA r=4 over κ (mean, and a bar from the
    worst to the best seed), and mechanism.py's predicted gap (LoRA r=q's unexplained fraction
    minus the method's, ×100: the points of the update it explains that LoRA does not), at s = 2
    (thick lines) and s = 0.5 (thin)."""
    Ks = sorted({int(k.split(",")[0]) for k in results["runs"]})
    kappas = sorted({float(k.split(",")[1]) for k in results["runs"]})
    pw, ph, m = 360, 260, 60
    img = Image.new("RGB", (2 * pw + 40, len(Ks) * (ph + 50) + 30 + 18 * len(COLOURS)), "white")
    draw = ImageDraw.Draw(img)
    font = common.FONT
    for row, K in enumerate(Ks):
        panels = [(f"toy VLM, K = {K}: accuracy − LoRA r=4 (points)", "toy"),
                  (f"mechanism.py, K = {K}: explained − LoRA r=q (×100)", "mechanism")]
        for col, (title, kind) in enumerate(panels):
            curves = {}  # (method, line width): gaps per κ, per seed
            for method in COLOURS:
                if kind == "toy":
                    curves[method, 2] = [[seen(r) - seen(b) for r, b in zip(results["runs"][f"{K},{c:g}"][method],
                                                                           results["runs"][f"{K},{c:g}"]["LoRA r=4"])]
                                         for c in kappas]
                    continue
                name = {"MixLoRA E=16 r=4": "MixLoRA", "MixLoRA E=16 r=4, sigmoid scores": "MixLoRA sigmoid scores",
                        "MixLoRA oracle routing": "oracle routing"}.get(method)
                for s, width in zip(SIGNALS, (2, 1)):
                    if name is not None:
                        p = [results["prediction"][f"{K},{c:g}"][f"s={s:g}"] for c in kappas]
                        curves[method, width] = [[100 * (a - b) for a, b in zip(q["LoRA r=q"], q[name])] for q in p]
            lo = min(0.0, *(min(g) for gaps in curves.values() for g in gaps)) - 2
            hi = max(0.0, *(max(g) for gaps in curves.values() for g in gaps)) + 2
            x0, y0 = col * (pw + 20) + m, row * (ph + 50) + 30
            x1, y1 = x0 + pw - m - 10, y0 + ph - 40

            def to_y(v: float) -> float:
                return y1 - (v - lo) / (hi - lo) * (y1 - y0)

            draw.text((x0 - m + 10, y0 - 22), title, fill="black", font=font)
            draw.rectangle((x0, y0, x1, y1), outline="black")
            draw.line((x0, to_y(0), x1, to_y(0)), fill=(160, 160, 160))
            for v in (lo + 2, 0.0, hi - 2):
                draw.text((x0 - 50, to_y(v) - 7), f"{v:+.0f}", fill="black", font=font)
            for i, c in enumerate(kappas):
                draw.text((x0 + i / (len(kappas) - 1) * (x1 - x0) - 8, y1 + 4), f"κ={c:g}", fill="black", font=font)
            for j, ((method, width), gaps) in enumerate(curves.items()):
                xs = [x0 + i / (len(kappas) - 1) * (x1 - x0) + 3 * (j % 5 - 2) for i in range(len(kappas))]
                draw.line([(x, to_y(np.mean(g))) for x, g in zip(xs, gaps)], fill=COLOURS[method], width=width)
                for x, g in zip(xs, gaps):
                    draw.line((x, to_y(min(g)), x, to_y(max(g))), fill=COLOURS[method], width=1)
                    dot = (x - 3, to_y(np.mean(g)) - 3, x + 3, to_y(np.mean(g)) + 3)
                    draw.ellipse(dot, fill=COLOURS[method] if width == 2 else "white", outline=COLOURS[method])
    for j, (method, colour) in enumerate(COLOURS.items()):
        y = len(Ks) * (ph + 50) + 10 + 18 * j
        draw.line((20, y + 7, 44, y + 7), fill=colour, width=3)
        draw.text((50, y), method + (" (toy only)" if method in ("LoRA r=16", "LoRA specialists r=4") else ""),
                  fill="black", font=font)
    draw.text((pw - 20, len(Ks) * (ph + 50) + 10), "mechanism.py: thick s = 2 (d' = 8),", fill="black", font=font)
    draw.text((pw - 20, len(Ks) * (ph + 50) + 28), "thin s = 0.5 (d' = 2)", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--num-tasks", type=cli.integers(2, len(toy_tasks.CONFLICT_WORDS)), default=None,
                   help="comma-separated K, each in 2 ... 6 (default: 4,6; 2 with --quick)")
    p.add_argument("--seeds", type=cli.integers(0), default="0,1,2", help="comma-separated stage-2 seeds")
    p.add_argument("--steps", type=cli.at_least(1), default=300, help="stage-2 steps")
    p.add_argument("--threads", type=cli.at_least(1), default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", type=cli.device, default="auto")
    p.add_argument("--quick", action="store_true", help="the smoke-test model, K = 2, κ = 0 and 1 (CI)")
    p.add_argument("--out", default=None, help="default: experiments/results/conflict (runs/conflict-quick with --quick)")
    p.add_argument("--checkpoints", default="checkpoints")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    Ks = args.num_tasks or ([2] if args.quick else list(KS))
    seeds = args.seeds
    kappas = (0.0, 1.0) if args.quick else CONFLICTS
    out = Path(args.out or ("runs/conflict-quick" if args.quick else "experiments/results/conflict"))
    base = common.config(args.quick, args.device, args.checkpoints, steps=args.steps)
    start = time.time()
    results: dict = {"K": Ks, "conflicts": list(kappas), "seeds": seeds, "steps": args.steps,
                     "runs": {}, "cosine": {}, "separation": {}, "prediction": {}}
    for K in Ks:
        for kappa in kappas:
            key = f"{K},{kappa:g}"
            config = replace(base, conflict=(K, kappa))
            tasks = list(train_toy.suite(config).values())
            # At the start only B has a gradient (A's is zero while B = 0); at 1/4 of the schedule, both.
            lora = replace(config, **METHODS["LoRA r=4"])
            quarter = common.trained(lora, until=max(1, lora.steps // 4))
            results["cosine"][key] = {"start": gradient_conflict(common.untrained(lora).eval(), tasks, args.quick, "B"),
                                      "quarter": gradient_conflict(quarter, tasks, args.quick)}
            results["runs"][key] = {label: [accuracy(label, replace(config, seed=seed), out) for seed in seeds]
                                    for label in METHODS}
            results["separation"][key] = {label: [routing_separation(trained(label, replace(config, seed=seed)), tasks)
                                                  for seed in seeds] for label in ROUTED}
            results["separation"][key]["untrained routers"] = [
                routing_separation(common.untrained(replace(config, seed=seed, method="mixlora")).eval(), tasks)
                for seed in seeds]
            results["prediction"][key] = prediction(K, kappa, seeds, args.quick)
    results["wall_s"] = time.time() - start
    results["torch"], results["threads"] = torch.__version__, torch.get_num_threads()
    common.write_results(out, results, tables(results))
    figure(results, out / "gap.png")
    return results


if __name__ == "__main__":
    main()
