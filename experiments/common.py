"""What the experiments share, each job in one place: the caches, the cached stage-2 run and its
accuracy, the oracle, the measures of routing and of gradient conflict, and the pictures' drawing kit.

Every experiment on the tiny model builds its runs from one train_toy.Config with
dataclasses.replace, and starts them from the same stage-1 base (seed 0): the run's own seed sets
the adapter init and the data order, so methods and seeds differ in stage 2 alone.
"""

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from PIL import ImageFont
from torch import Tensor

import toy_tasks
import train_toy
from mixlora import MixLoRALinear, Routing, mark_only_adapters_trainable, replace_linears
from tiny_mllm import TinyMLLM, answer_losses
from train_toy import TOK, Config

Adapt = Callable[[TinyMLLM, Config], TinyMLLM]  # puts a run's adapters into the base (train_toy.adapt)

# Every cached result and checkpoint of the experiments is keyed on this. Bump it with any change to
# the code that moves a trained number (mixlora.py, the training in train_toy.py, tiny_mllm.py,
# toy_tasks.py, the routers of the experiments), so that no result of older code is read back.
# 1: up to 9012a79~1. 2: routing reads x and the a-pool detached (9012a79), which moved MixLoRA's numbers.
METHOD_VERSION = 2


# ---- caches -------------------------------------------------------------------------------------

def digest(**key) -> str:
    """16 hex digits of the SHA-256 of key (JSON) and METHOD_VERSION: the name of what it was computed from."""
    text = json.dumps(key | {"method_version": METHOD_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_file(out: str | Path, name: str, config: Config, **more) -> Path:
    """Where a result of config is cached: <out>/cache/<name>-<digest>.json, keyed on the full config
    (less where files go and whether a run resumes, which change no number), METHOD_VERSION and `more`
    (whatever else the result depends on). Other settings or older code: another file, computed anew."""
    settings = {k: v for k, v in asdict(config).items() if k not in ("resume", "out", "checkpoints")}
    return Path(out) / "cache" / f"{name}-{digest(config=settings, **more)}.json"


# ---- runs ---------------------------------------------------------------------------------------

def config(quick: bool, device: str, checkpoints: str, **changes) -> Config:
    """The experiments' base Config: train_toy.py's defaults with changes; --quick overrides the
    sizes (steps, batch, evaluation sets) as it does in train_toy.py."""
    base = replace(Config(device=device, checkpoints=checkpoints), **changes)
    return train_toy.quick(base) if quick else base


def untrained(config: Config, adapt: Adapt = train_toy.adapt) -> TinyMLLM:
    """A run's adapters as they start, on the shared stage-1 base (seed 0)."""
    base, _ = train_toy.base_model(replace(config, seed=0))
    return adapt(base, config)


def trained(config: Config, adapt: Adapt = train_toy.adapt, until: int | None = None) -> TinyMLLM:
    """Stage 2 of one run on the shared stage-1 base, in eval mode. Its checkpoint lives under
    <checkpoints>/experiments/, named by its recipe and METHOD_VERSION: read back if it finished,
    resumed if it was killed, trained from the start otherwise. `until` stops at that step."""
    model = untrained(config, adapt)
    name = train_toy.run_name(config) + (f"-until{until}" if until else "")
    ckpt = Path(config.checkpoints) / "experiments" / f"{name}-{digest(recipe=train_toy.recipe(config))}.ckpt"
    saved = torch.load(ckpt, weights_only=True) if ckpt.exists() else None
    if saved is not None and saved["step"] == (until or config.steps):
        train_toy.load_trainable_state(model, "instruct", saved["trainable"])
    else:
        train_toy.train(model, "instruct", replace(config, resume=True), ckpt, until=until)  # from step 0 if none
    return model.eval()


def accuracy(config: Config, sets: dict, key: str, out: str | Path, adapt: Adapt = train_toy.adapt,
             collapse_on: list[toy_tasks.Example] | None = None) -> dict:
    """{split: {task: exact match %}} of one run on sets, named by key (and, given collapse_on,
    router_collapse on those prompts), trained if need be, cached (cache_file) on the config and key."""
    cache = cache_file(out, f"{train_toy.run_name(config)}-{key}", config, sets=key, collapse=collapse_on is not None)
    if cache.exists():
        return json.loads(cache.read_text())
    model = trained(config, adapt)
    result = train_toy.evaluate(model, TOK, sets)
    if collapse_on is not None:
        result["routing"] = router_collapse(model, collapse_on)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


def mean_accuracy(run: dict, split: str) -> float:
    """The mean over tasks of one run's accuracy on a split."""
    return float(np.mean(list(run[split].values())))


# ---- the oracle: routing that is the answer -----------------------------------------------------

class OracleRouting(MixLoRALinear):
    """MixLoRA whose route() gives task k the fixed factors k·r ... k·r + r - 1, for A and for B.

    The ceiling for routing: the repo's forward, pools and scale, with the right answer as the
    routing. Set .task (N,) before each forward.
    """

    def __init__(self, base: nn.Linear, num_tasks: int, rank: int, alpha: float):
        super().__init__(base, num_tasks * rank, rank, alpha, conditional=False, router_grad=False)
        self.task: Tensor | None = None

    def route(self, x: Tensor, mask: Tensor | None = None) -> Routing:
        index = self.task[:, None] * self.rank + torch.arange(self.rank, device=self.task.device)  # (N, r)
        ones = torch.ones(index.shape, dtype=x.dtype, device=x.device)
        return Routing(index, index, ones, ones)


def add_oracle(model: TinyMLLM, config: Config) -> TinyMLLM:
    """An Adapt for the conflict tasks: every target linear becomes an OracleRouting layer of E = K·r
    factors, told its instances' task by read_task."""
    tasks = list(train_toy.suite(config).values())
    torch.manual_seed(config.seed + 1)
    replace_linears(model, config.targets, lambda base: OracleRouting(base, len(tasks), config.rank, config.alpha))
    read_task(model, tasks, [m for m in model.modules() if isinstance(m, OracleRouting)])
    return mark_only_adapters_trainable(model)


def read_task(model: TinyMLLM, tasks: list[toy_tasks.Task], layers: list[nn.Module]) -> None:
    """Set layer.task (N,) of every layer from the instruction word among the prompt's tokens: where
    a router could read it. A hook on the embedding sees every whole text, in training and in the
    prefill; decode steps hold the prefill's routing."""
    words = torch.tensor([TOK.stoi[task.name] for task in tasks])

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        tokens = inputs[0]
        if tokens.dim() == 2:  # (N, L): a whole text; a decode step embeds (N,) tokens
            task = (tokens[:, :, None] == words.to(tokens.device)).any(1).float().argmax(-1)  # (N,)
            for layer in layers:
                layer.task = task

    model.embed.register_forward_hook(hook)


# ---- routing: which factors, and how peaked ------------------------------------------------------

def jaccard(hot: Tensor) -> Tensor:
    """(n, k) multi-hot selections -> (n, n) Jaccard similarity |a ∩ b| / |a ∪ b|, in hot's dtype."""
    both = hot @ hot.T
    either = hot.sum(1)[:, None] + hot.sum(1)[None, :] - both
    return both / either.clamp_min(1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """x̄ as a router reads it outside the layer: the mean of x (N, T, d) over mask (N, T) -> (N, d)."""
    m = mask.to(x.dtype)
    return (m[..., None] * x).sum(1) / m.sum(1, keepdim=True).clamp_min(1)


def routing_view(model: TinyMLLM, examples: list[toy_tasks.Example]) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """What each block's routers read and chose: x̄ (the prompt-masked mean of the input of the
    block's first MixLoRA linear), {block: (n, d_in)}, and the selections, {block: (n, 12·E) bool}."""
    firsts = [next(m for m in block.modules() if isinstance(m, MixLoRALinear)) for block in model.layers]
    seen: dict[int, list[np.ndarray]] = {b: [] for b in range(len(firsts))}

    def keep_x_bar(block: int):
        def hook(layer: MixLoRALinear, inputs: tuple, output: Tensor) -> None:
            seen[block].append(masked_mean(inputs[0], layer.mask).cpu().numpy())  # (N, d_in): on the prompt
        return hook

    hooks = [layer.register_forward_hook(keep_x_bar(b)) for b, layer in enumerate(firsts)]
    hots = selections(model, examples, list(range(len(model.layers))))  # forwards of ≤ 256 examples
    for h in hooks:
        h.remove()
    return {b: np.concatenate(x) for b, x in seen.items()}, hots


def conflict_sets(tasks: list[toy_tasks.Task], size: int) -> dict[tuple[str, str], list[toy_tasks.Example]]:
    """The conflict knob's evaluation sets: new images, seen and held-out phrasings; the images depend
    on the task's word and the split only, so every κ, K and method is scored on the same images."""
    return {(task.name, split): toy_tasks.samples(task, size, f"eval-conflict-{task.name}-{split}", split == "heldout")
            for task in tasks for split in ("seen", "heldout")}


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


def top1_share(p: Tensor, index: Tensor) -> float:
    """Of the chosen factors' scores p (N, E) at index (N, r), the share of the largest: 1/r when
    the chosen factors share the score (and its gradient) evenly, → 1 when one takes it all."""
    chosen = p.gather(1, index)  # (N, r)
    return float((chosen.max(1).values / chosen.sum(1)).mean())


def effective_chosen(p: Tensor, index: Tensor) -> float:
    """The effective number of chosen factors, exp(entropy) of the chosen scores renormalised,
    the perplexity MoE papers use for router collapse: r when they share evenly, 1 when one has all."""
    chosen = p.gather(1, index)
    share = chosen / chosen.sum(1, keepdim=True)  # (N, r)
    return float(torch.exp(-(share * share.clamp_min(1e-30).log()).sum(1)).mean())


def usage_perplexity(index: Tensor, num_factors: int) -> float:
    """How evenly the factors are used across instances: exp(entropy) of the factors' share of all
    selections, E when every factor is chosen equally often, r when the same r always are. The
    load-balancing losses and biases of MoE (Switch, DeepSeek-V3) act on this."""
    load = torch.bincount(index.flatten(), minlength=num_factors).double() / index.numel()
    return float(torch.exp(-(load * load.clamp_min(1e-30).log()).sum()))


@torch.no_grad()
def router_collapse(model: TinyMLLM, examples: list[toy_tasks.Example]) -> dict[str, dict[str, float]]:
    """Does the router saturate? Per block, the mean over its MixLoRA linears of the three measures
    above on the prompts of `examples`: top-1 share of the chosen p^A (1/r ... 1), effective chosen
    factors (r ... 1) and factor usage perplexity (E: every factor as often, r: always the same)."""
    model.eval()
    model(*train_toy.collate(examples, TOK, next(model.parameters()).device, with_answer=False))
    report = {}
    for ell, block in enumerate(model.layers):
        layers = [m for m in block.modules() if isinstance(m, MixLoRALinear)]
        routings = [(m.last_routing, m.num_factors) for m in layers]
        report[f"layer {ell}"] = {
            "top1_share": float(np.mean([top1_share(r.p_a, r.index_a) for r, _ in routings])),
            "effective_chosen": float(np.mean([effective_chosen(r.p_a, r.index_a) for r, _ in routings])),
            "usage": float(np.mean([usage_perplexity(r.index_a, E) for r, E in routings]))}
    return report


# ---- gradients per task --------------------------------------------------------------------------

def example_losses(model: TinyMLLM, batches: dict[str, list[toy_tasks.Example]]) -> Tensor:
    """Per-example answer loss, (M tasks, n): one forward over every task's examples (each
    instance's loss depends on that instance alone, padding and all)."""
    examples = [e for batch in batches.values() for e in batch]
    images, tokens, prompt_lens = train_toy.collate(examples, TOK, next(model.parameters()).device)
    logits, _ = model(images, tokens, prompt_lens)
    ce, is_answer = answer_losses(logits, tokens, prompt_lens)  # (N, L - 1) each
    return ((ce * is_answer).sum(1) / is_answer.sum(1)).view(len(batches), -1).cpu()


def adapter_groups(model: TinyMLLM) -> dict[str, list[nn.Parameter]]:
    """{"layer 0 A": [lora_A of every adapted linear of block 0], "layer 0 B": [...], ...}"""
    groups: dict[str, list[nn.Parameter]] = {}
    for ell, block in enumerate(model.layers):
        adapters = [m for m in block.modules() if hasattr(m, "lora_A")]
        groups[f"layer {ell} A"] = [m.lora_A for m in adapters]
        groups[f"layer {ell} B"] = [m.lora_B for m in adapters]
    return groups


def task_gradients(loss_fn: Callable[[object], Tensor], data: object,
                   groups: dict[str, list[nn.Parameter]]) -> list[dict[nn.Parameter, Tensor]]:
    """∇_θ L_j for every task j (the mean of its per-example losses on data), for every parameter of the groups."""
    params = [p for group in groups.values() for p in group]
    losses = loss_fn(data).mean(1)  # (M,)
    return [dict(zip(params, torch.autograd.grad(loss, params, retain_graph=True))) for loss in losses]


def gradient_cosines(loss_fn: Callable[[object], Tensor], data: object, other_data: object,
                     groups: dict[str, list[nn.Parameter]]) -> dict[str, np.ndarray]:
    """Gradient conflict without a step size (PCGrad's measure), per parameter group:

        C[i, j] = cos(∇_θ L_i, ∇_θ L_j) over the group's flattened parameters, in [-1, 1]

    < 0: the tasks pull θ apart. Task i's gradient comes from data and task j's from other_data,
    symmetrised: off the diagonal this is the plain cosine (the tasks' examples differ anyway),
    and the diagonal, instead of a trivial 1, is the agreement of two independent batches of
    one task: the ceiling that gradient noise leaves for the off-diagonal entries.
    """
    first, second = task_gradients(loss_fn, data, groups), task_gradients(loss_fn, other_data, groups)

    def unit(grads: list[dict], group: list[nn.Parameter]) -> Tensor:  # (M, |θ|)
        flat = torch.stack([torch.cat([g[p].flatten() for p in group]) for g in grads]).double()
        return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)

    cosines = {}
    for name, group in groups.items():
        c = unit(first, group) @ unit(second, group).T
        cosines[name] = ((c + c.T) / 2).numpy()
    return cosines


# ---- tables and pictures -------------------------------------------------------------------------

def write_results(out: Path, results: dict, text: str) -> None:
    """An experiment's outputs beside its page: results.json (every number) and table.md (what it prints)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(text + "\n")
    print(text)


def cell(values: list[float], digits: int = 1) -> str:
    """mean ± sample std over seeds (or the one value)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


try:  # DejaVu has the Greek and the minus sign; pillow's default font does not
    FONT = ImageFont.truetype("DejaVuSans.ttf", 13)
except OSError:
    FONT = ImageFont.load_default(size=13)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (23, 190, 207), (188, 189, 34)]  # matplotlib's tab10


def heat(value: float, vmax: float) -> tuple[tuple[int, int, int], str]:
    """A heatmap cell's fill, red for positive and blue for negative, faded by |value| / vmax,
    and the colour its text stays legible in."""
    t = min(1.0, abs(value) / vmax)
    fade = int(255 * (1 - t))
    return ((255, fade, fade) if value > 0 else (fade, fade, 255)), ("white" if t > 0.6 else "black")
