"""Routers that find the task: learning curves on the conflict knob, what trained routers read, and
ways of training them, each measured against oracle routing, whose answer is known.

    python -m experiments.routers                                # every cell, method and seed -> experiments/results/routers/
    python -m experiments.routers --cells K6 --methods "LoRA r=4,oracle" --seeds 0   # a part; runs are cached
    python -m experiments.routers --cached                       # gather the cached runs: table, JSON, figure
    python -m experiments.routers --quick                        # the same pipeline on the smoke-test model (CI)

conflict.py found trained routing blind to the task (within-task Jaccard = between-task Jaccard)
while oracle routing learns every conflict cell, and its 300-step table measures when learning
happens rather than what can be learnt. Here every run trains one schedule of --steps steps and is
evaluated along it, every steps/--points steps: the checkpoint of each point resumes bit-identically
(tests/test_routers.py checks it), so a curve is that of one uninterrupted run. At every point:
exact match on the seen phrasings, and for every routed run, per block:

- probe: can a linear classifier read the task from x̄, what the block's routers read? A
  multinomial logistic regression, fitted on half of the diagnostic prompts, scored on the other;
- separation: the mean Jaccard similarity of two instances' selections within a task minus between
  tasks (the oracle: 1 − 0; blind routing: 0);
- stability: the share of instances whose selection changed since the previous point;
- collapse: common.router_collapse (top-1 share of the chosen p^A, effective chosen factors, usage).

Once per conflict cell, `signal` measures what the routers could read at step 0: how much of x̄'s
variance the task explains and how much the phrasing does, and whether k-means finds the task in
x̄, in the weights' gradients, or in the image → answer update each instruction asks for.

The routers (METHODS): the paper's (softmax scores), ours (sigmoid scores), frozen random routers
(what the released code trains), task-ID routing (Poly's learnt table per task, which needs the
label), the oracle, and remedies from four families, each a few lines below: counterfactual credit
for the factors not chosen, exploration by Gumbel top-r, data-dependent starts (k-means of x̄, as
MoCLE clusters instructions; k-means of the image → answer update, `update_kmeans`), what the
routers read (instruction-only x̄; the instruction's words, the same x̄ in every layer), and Poly's
two-speed learning rate.
"""

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

import cli
import toy_tasks
import train_toy
from experiments import common
from experiments.common import cell
from mixlora import (SCORES, MixLoRALinear, Routing, fit_routers, fitted, k_means, mark_only_adapters_trainable,
                     drop_words, known_words, replace_linears, straight_through, update_targets)
from tiny_mllm import TinyMLLM, answer_mask
from train_toy import Config

CELLS = {  # the conflict knob at full conflict (adapters on every LM linear, or the down_proj's only), and none
    "K6": dict(conflict=(6, 1.0)),
    "K4": dict(conflict=(4, 1.0)),
    "K6 down_proj": dict(conflict=(6, 1.0), targets=("down_proj",)),
    "K6 down_proj 4x steps": dict(conflict=(6, 1.0), targets=("down_proj",), steps=2400),  # does capacity bind?
    "K6 κ=0": dict(conflict=(6, 0.0)),  # no conflict: what a router costs where there is nothing to route
    "toy suite": dict(conflict=None, steps=800),  # train_toy.py's eight tasks and schedule: what a router costs there
}


# ---- routers: the remedies, each a few lines on top of MixLoRALinear -----------------------------

class _Credit(torch.autograd.Function):
    """Identity on the chosen factors F (N, r, d). In backward it also gives the scores p (N, E) of
    the factors *not* chosen a gradient: the first-order change of the loss had factor e been added
    in its best slot, min_j ⟨∂L/∂F_j, pool_e⟩ — what the straight-through gate gives a chosen factor
    (∂L/∂w_j = ⟨∂L/∂F_j, F_j⟩), so chosen and unchosen factors are credited in the same units."""

    @staticmethod
    def forward(ctx, F: Tensor, p: Tensor, index: Tensor, pool: Tensor) -> Tensor:
        ctx.save_for_backward(index, pool)
        ctx.p_dtype = p.dtype
        return F.view_as(F)

    @staticmethod
    def backward(ctx, grad: Tensor):
        index, pool = ctx.saved_tensors
        credit = (grad @ pool.T.to(grad.dtype)).min(1).values  # (N, r, E) -> (N, E): the best slot
        return grad, credit.to(ctx.p_dtype).scatter(1, index, 0.0), None, None  # the chosen have their gates


class CounterfactualCredit(MixLoRALinear):
    """Straight-through gates credit only the chosen factors, so a router learns only how much each
    chosen factor helped; this also credits every other factor with its first-order effect."""

    def factors(self, routing: Routing) -> tuple[Tensor, Tensor]:
        A, B = super().factors(routing)
        if self.training and self.router_grad:
            A = _Credit.apply(A, routing.p_a, routing.index_a, self.lora_A)
            B = _Credit.apply(B, routing.p_b, routing.index_b, self.lora_B.T)
        return A, B


class GumbelTopR(MixLoRALinear):
    """Exploration: in training, S = top-r(log p + τ g) with g ~ Gumbel(0, 1), τ falling linearly
    from 1 to 0 over the first `explore` training steps (a buffer, so a resumed run goes on where it
    was); the gates and evaluation are MixLoRA's."""

    def __init__(self, *args, explore: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.explore = explore
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))
        self.tau = 0.0

    def route(self, x: Tensor, mask: Tensor | None = None) -> Routing:
        self.tau = max(0.0, 1.0 - int(self.trained_steps) / self.explore) if self.training else 0.0
        self.trained_steps += int(self.training)
        return super().route(x, mask)

    def top_r(self, p: Tensor) -> Tensor:
        if self.tau > 0:
            gumbel = -torch.log(-torch.log(torch.rand_like(p).clamp(1e-20, 1.0)))
            p = p.clamp_min(1e-30).log() + self.tau * gumbel
        return super().top_r(p)


class CreditGumbel(CounterfactualCredit, GumbelTopR):
    """Both: Gumbel's exploration picks the factors, and every factor is credited."""


class InstructionOnly(MixLoRALinear):
    """x̄ over the instruction's positions only: the prompt mask without the image tokens."""

    image_tokens = 0  # set from the model: its number of image patches

    def route(self, x: Tensor, mask: Tensor | None = None) -> Routing:
        if mask is not None:
            mask = mask.clone()
            mask[:, :self.image_tokens] = False
        return super().route(x, mask)


def top_r_routing(layer: MixLoRALinear, p_a: Tensor, p_b: Tensor) -> Routing:
    """S^A = top-r(p^A) and S^B = top-r(p^B) (N, r), with MixLoRA's straight-through gates."""
    index_a, index_b = layer.top_r(p_a), layer.top_r(p_b)
    return Routing(index_a, index_b, straight_through(p_a, index_a), straight_through(p_b, index_b), p_a, p_b)


class InstructionWords(MixLoRALinear):
    """Routers that read the instruction's words: x̄ = the mean embedding of the instruction's
    tokens, the same x̄ in every layer, where a deeper layer's instruction x̄ is mostly the image
    (`signal`). R^A and R^B are (E, d_model), p^A = score(R^A x̄), p^B = score(R^B x̄):
    IFS only, since CFS reads the layer's own pool. `embedded` (N, L, d_model), the text's
    embeddings, is set by a hook on the embedding (`instruction_words`)."""

    def __init__(self, base: nn.Linear, num_factors: int, rank: int, d_words: int, **kwargs):
        super().__init__(base, num_factors, rank, **kwargs)
        if self.conditional:
            raise ValueError("InstructionWords routes by IFS only: pass conditional=False")
        for name in ("router_A", "router_B"):  # as MixLoRALinear's init, with d_words inputs
            w = ((torch.rand(num_factors, d_words) * 2 - 1) / d_words ** 0.5).to(self.lora_A)
            delattr(self, name)
            if self.router_grad:
                self.register_parameter(name, nn.Parameter(w))
            else:
                self.register_buffer(name, w)
        self.embedded: Tensor | None = None
        self.tokens: Tensor | None = None  # (N, L): the text's token ids
        self.known: Tensor | None = None  # (vocab,) bool: the words a start fitted on (None: every word counts)

    def x_bar(self, x: Tensor, mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """The mean embedding over the instruction, not of x: the prompt mask's text part (N, L) ->
        (N, d_model); with `known`, over the words the routers were fitted on only (mixlora.known_words)."""
        mask = mask[:, -self.embedded.shape[1]:]
        if self.known is not None:
            mask = known_words(mask, self.tokens, self.known)
        return common.masked_mean(self.embedded, mask).to(dtype)

    def route(self, x: Tensor, mask: Tensor | None = None) -> Routing:
        x_bar, score = self.x_bar(x, mask), SCORES[self.scores]  # (N, d_model), float32
        p_a, p_b = score(x_bar @ self.router_A.float().T), score(x_bar @ self.router_B.float().T)  # (N, E) each
        if not self.router_grad:
            p_a, p_b = p_a.detach(), p_b.detach()
        return top_r_routing(self, p_a, p_b)


class UniversalWords(InstructionWords):
    """A safety net for instructions that match no cluster, as MoCLE's universal expert: the first
    `universal` factors of each pool are chosen for every instance, and the routers pick the other
    r − universal from the rest (their logits +inf: a sigmoid score of 1, first in top-r)."""

    def __init__(self, *args, universal: int, **kwargs):
        super().__init__(*args, **kwargs)
        if self.scores != "sigmoid":
            raise ValueError("UniversalWords puts its universal factors first with logits of +inf: scores must be "
                             "'sigmoid' (a softmax over them would be NaN)")
        self.universal = universal

    def route(self, x: Tensor, mask: Tensor | None = None) -> Routing:
        x_bar, score = self.x_bar(x, mask), SCORES[self.scores]  # (N, d_model), float32
        always = torch.zeros(self.num_factors, device=x_bar.device)
        always[:self.universal] = float("inf")
        p_a, p_b = (score(x_bar @ R.float().T + always) for R in (self.router_A, self.router_B))  # (N, E) each
        if not self.router_grad:
            p_a, p_b = p_a.detach(), p_b.detach()
        return top_r_routing(self, p_a, p_b)


class ArrowRouting(MixLoRALinear):
    """Post-hoc routing from the trained factors themselves, as Arrow (Ostapenko et al., 2024): each
    factor's ΔW_e = b_e ⊗ a_e, less the mean adapter as GenKnowSub subtracts it, has a top right
    singular vector v_e; an instance takes the r factors of largest |x̄ · v_e| (Arrow scores tokens;
    MixLoRA routes instances, so x̄ is the layer's masked mean, as its routers read). Same pools."""

    def __init__(self, trained: MixLoRALinear):
        super().__init__(trained.base, trained.num_factors, trained.rank, alpha=trained.alpha,
                         conditional=False, router_grad=False)
        self.lora_A, self.lora_B = trained.lora_A, trained.lora_B
        with torch.no_grad():
            delta = torch.einsum("oe,ei->eoi", self.lora_B.double(), self.lora_A.double())  # (E, d_out, d_in)
            delta = delta - delta.mean(0)  # GenKnowSub: what the factors share is general, not routing evidence
            self.register_buffer("prototypes", torch.linalg.svd(delta).Vh[:, 0].float())  # (E, d_in)

    def route(self, x: Tensor, mask: Tensor | None = None) -> Routing:
        x = x.detach().float()
        x_bar = x.mean(1) if mask is None else common.masked_mean(x, mask)  # (N, d_in)
        p = (x_bar @ self.prototypes.T).abs()  # (N, E): the sign of a singular vector is arbitrary
        index = self.top_r(p)
        ones = torch.ones(index.shape, device=x.device)
        return Routing(index, index, ones, ones)  # factor e's a and b together, as they trained


def arrow(model: TinyMLLM) -> TinyMLLM:
    """The trained model with every MixLoRA layer routed post hoc by ArrowRouting (evaluation only)."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, MixLoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, ArrowRouting(layer))
    return model.eval()


class TaskTable(MixLoRALinear):
    """Task-ID routing, as Poly (Ponti et al., 2022) routes: a learnt table of logits per task and
    pool, read by the task label (set .task), relaxed in training by Poly's Gumbel-sigmoid (logistic
    noise on the logits), and here top-r with straight-through gates. It needs the label."""

    def __init__(self, base: nn.Linear, num_factors: int, rank: int, num_tasks: int, **kwargs):
        super().__init__(base, num_factors, rank, conditional=False, **kwargs)
        self.router_table = nn.Parameter(torch.empty(2, num_tasks, num_factors).uniform_(-1e-3, 1e-3))
        self.task: Tensor | None = None

    def route(self, x: Tensor, mask: Tensor | None = None) -> Routing:
        z = self.router_table[:, self.task]  # (2, N, E): the a- and b-pool's logits
        if self.training:
            u = torch.rand_like(z).clamp(1e-6, 1 - 1e-6)
            z = z + torch.log(u) - torch.log1p(-u)  # logistic noise: Gumbel-sigmoid
        p_a, p_b = torch.sigmoid(z)
        return top_r_routing(self, p_a, p_b)


# ---- building a run ----------------------------------------------------------------------------

def variant(layer: type[MixLoRALinear], **extra) -> common.Adapt:
    """An Adapt that puts `layer` (a MixLoRALinear) on the config's targets, as train_toy.adapt does."""
    def adapt(model: TinyMLLM, config: Config) -> TinyMLLM:
        torch.manual_seed(config.seed + 1)  # the same pools and routers at init as MixLoRA's of the seed
        replace_linears(model, config.targets, lambda base: layer(
            base, config.factors, config.rank, alpha=config.alpha, conditional=config.conditional,
            router_grad=config.router_grad, scores=config.scores, **extra))
        return mark_only_adapters_trainable(model)
    return adapt


def task_table(model: TinyMLLM, config: Config) -> TinyMLLM:
    tasks = list(train_toy.suite(config).values())
    torch.manual_seed(config.seed + 1)
    replace_linears(model, config.targets, lambda base: TaskTable(
        base, config.factors, config.rank, len(tasks), alpha=config.alpha))
    common.read_task(model, tasks, [m for m in model.modules() if isinstance(m, TaskTable)])
    return mark_only_adapters_trainable(model)


def instruction_only(model: TinyMLLM, config: Config) -> TinyMLLM:
    InstructionOnly.image_tokens = model.config.num_patches
    return variant(InstructionOnly)(model, config)


def instruction_words(model: TinyMLLM, config: Config, layer: type[InstructionWords] = InstructionWords,
                      **extra) -> TinyMLLM:
    model = variant(layer, d_words=model.config.d_model, **extra)(model, config)
    layers = [m for m in model.modules() if isinstance(m, InstructionWords)]

    def keep(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if inputs[0].dim() == 2:  # (N, L): a whole text; a decode step embeds (N,) tokens and reuses the routing
            for layer in layers:
                layer.embedded, layer.tokens = output, inputs[0]

    model.embed.register_forward_hook(keep)
    return model


def universal_words(model: TinyMLLM, config: Config) -> TinyMLLM:
    """Words routers with half of every instance's r factors universal (UniversalWords)."""
    return instruction_words(model, config, UniversalWords, universal=config.rank // 2)


def gumbel(model: TinyMLLM, config: Config) -> TinyMLLM:
    """Gumbel top-r, exploring over the first half of the schedule."""
    return variant(GumbelTopR, explore=max(1, config.steps // 2))(model, config)


def credit_gumbel(model: TinyMLLM, config: Config) -> TinyMLLM:
    return variant(CreditGumbel, explore=max(1, config.steps // 2))(model, config)


def kmeans(adapt: common.Adapt, prompts: int = 512, iters: int = 25) -> common.Adapt:
    """A data-dependent start: R^A and R^B of every layer point at the E k-means centroids of the
    x̄ that the layer's router reads on `prompts` training prompts (made orthogonal to their mean,
    which a bias-free router cannot subtract), scaled to logits of standard deviation 2."""
    def start(model: TinyMLLM, config: Config) -> TinyMLLM:
        model = adapt(model, config)
        layers = [m for m in model.modules() if isinstance(m, MixLoRALinear)]
        seen = {layer: XBarRecorder(layer) for layer in layers}
        examples = train_toy.training_examples("kmeans", config.seed, 0, prompts, tasks=train_toy.training_tasks(config))
        device = next(model.parameters()).device
        with torch.no_grad():
            model.eval()(*train_toy.collate(examples, train_toy.TOK, device, with_answer=False))
            model.train()
            gen = torch.Generator().manual_seed(config.seed)
            for layer, record in seen.items():
                record.handle.remove()
                x = record.x_bar.double().cpu()  # (n, d_in)
                mean = x.mean(0)
                centroids = k_means(x, layer.num_factors, iters, gen) - mean  # (E, d_in)
                centroids -= centroids @ mean[:, None] * mean / mean.dot(mean)  # ⟂ the mean
                directions = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-12)
                scale = 2.0 / (x @ directions.T).std().clamp_min(1e-12)
                for router in (layer.router_A, layer.router_B):
                    router.copy_((scale * directions).to(router))
        return model
    return start


def update_kmeans(adapt: common.Adapt, prompts: int = 512, iters: int = 25, words: bool = False,
                  known: bool = False, word_dropout: float = 0.0, copies: int = 16) -> common.Adapt:
    """A start from what each instruction asks of the model, not from what it looks like: k-means
    (k = E) of the image → answer update each instruction asks for (`answer_update_gram`), one
    clustering for every layer, so that factor e is cluster e's in every layer, as the oracle's
    factors are task k's. Each layer's R^A = R^B is then the ridge regression from the x̄ its router
    reads to minus the squared distance of the instance to each centroid, so that an instance's
    top-r are its r nearest clusters; scaled to logits of standard deviation 2. The fit of the
    update is on the instruction's x̄ at the first adapted layer, or with words=True on the mean
    embedding of the instruction's tokens, whatever layers are adapted. For routers that read the
    words: known=True has them read only the words of the fit's prompts (InstructionWords.known);
    word_dropout fits R on `copies` copies of each prompt with each word dropped with that
    probability, so that no single word of a phrasing decides the clusters; UniversalWords layers
    keep their first `universal` factors for everyone and cluster the rest (k = E − universal)."""
    def start(model: TinyMLLM, config: Config) -> TinyMLLM:
        model = adapt(model, config)
        layers = [m for m in model.modules() if isinstance(m, MixLoRALinear)]
        seen = {layer: XBarRecorder(layer) for layer in layers}
        instruction = None if words else XBarRecorder(layers[0], image_tokens=model.config.num_patches)
        examples = train_toy.training_examples("kmeans", config.seed, 0, prompts, tasks=train_toy.training_tasks(config))
        images, tokens, prompt_lens = train_toy.collate(examples, train_toy.TOK, next(model.parameters()).device)
        gram = answer_update_gram(model.eval(), images, tokens, prompt_lens)
        model.train()
        for record in [*seen.values(), *([instruction] if instruction else [])]:
            record.handle.remove()
        in_prompt = torch.arange(tokens.shape[1], device=tokens.device) < prompt_lens[:, None]  # (n, L)
        with torch.no_grad():
            said = common.masked_mean(model.embed(tokens), in_prompt).double().cpu()  # (n, d_model): the words
        universal = getattr(layers[0], "universal", 0)
        target = update_targets(said if words else instruction.x_bar.double().cpu(), gram,
                                layers[0].num_factors - universal, iters, torch.Generator().manual_seed(config.seed))
        target = nn.functional.pad(target, (universal, 0))  # (n, E): the universal factors' logits are +inf anyway
        dropped = None
        if word_dropout:
            keep = drop_words(in_prompt, copies, word_dropout, torch.Generator().manual_seed(config.seed))  # (copies, n, L)
            with torch.no_grad():
                embedded = model.embed(tokens)
                dropped = torch.stack([common.masked_mean(embedded, k) for k in keep]).double().cpu()  # (copies, n, d_model)
        with torch.no_grad():
            for layer, record in seen.items():
                if isinstance(layer, InstructionWords):
                    R = fit_routers(said, target, dropped)  # (E, d_model)
                    if known:
                        layer.known = torch.zeros(len(train_toy.TOK), dtype=torch.bool, device=tokens.device)
                        layer.known[tokens[in_prompt]] = True
                else:
                    R = fit_routers(record.x_bar.double().cpu(), target)  # (E, d_in)
                for router in (layer.router_A, layer.router_B):
                    router.copy_(R.to(router))
        return model
    return start


def answer_update_gram(model: TinyMLLM, images: Tensor, tokens: Tensor, prompt_lens: Tensor) -> Tensor:
    """<U_i, U_j> (n, n) of what each instance asks of the model: U_i = Σ_t (p_t − e_{y_t}) ⊗ (v − v̄)
    over its answer tokens, the gradient of its loss with respect to a linear map from its mean
    image token v to the logits. That is how the instance asks the model to change the way it
    answers its image; `fitted` on the instruction's x̄ it varies with the instruction only."""
    with torch.no_grad():
        logits, _ = model(images, tokens, prompt_lens)  # (n, L, vocab)
        v = model.encode_images(images).mean(1).double().cpu()  # (n, d)
    p = logits[:, :-1].double().softmax(-1)
    g = ((p - nn.functional.one_hot(tokens[:, 1:], p.shape[-1])) * answer_mask(tokens, prompt_lens)[..., None]).sum(1)
    v = v - v.mean(0)
    return (g @ g.T).cpu() * (v @ v.T)  # <g_i ⊗ v_i, g_j ⊗ v_j> = <g_i, g_j> <v_i, v_j>


class XBarRecorder:
    """Keeps the x̄ a MixLoRA layer's router reads on its next forward (its masked mean), or with
    image_tokens = P the x̄ over the instruction's positions only."""

    def __init__(self, layer: MixLoRALinear, image_tokens: int = 0):
        self.x_bar: Tensor | None = None
        self.image_tokens = layer.image_tokens if isinstance(layer, InstructionOnly) else image_tokens
        self.handle = layer.register_forward_pre_hook(self.keep)

    def keep(self, layer: MixLoRALinear, inputs: tuple) -> None:
        mask = layer.mask.clone()
        mask[:, :self.image_tokens] = False
        self.x_bar = common.masked_mean(inputs[0], mask)


# label: (how the run differs from the cell's Config, its Adapt)
METHODS: dict[str, tuple[dict, common.Adapt]] = {
    "LoRA r=4": (dict(method="lora", rank=4), train_toy.adapt),
    "LoRA r=16": (dict(method="lora", rank=16), train_toy.adapt),
    "MixLoRA softmax (the paper)": (dict(method="mixlora"), train_toy.adapt),
    "MixLoRA sigmoid": (dict(method="mixlora", scores="sigmoid"), train_toy.adapt),
    "frozen routers (released code)": (dict(method="mixlora", router_grad=False), train_toy.adapt),
    "task table (Poly; needs the label)": (dict(method="tasktable"), task_table),
    "oracle": (dict(method="oracle"), common.add_oracle),
    "counterfactual credit": (dict(method="credit", scores="sigmoid"), variant(CounterfactualCredit)),
    "Gumbel top-r": (dict(method="gumbel", scores="sigmoid"), gumbel),
    "k-means start": (dict(method="mixlora-kmeans", scores="sigmoid"), kmeans(variant(MixLoRALinear))),
    "instruction-only x̄": (dict(method="instruction", scores="sigmoid"), instruction_only),
    "routers 100x lr (Poly)": (dict(method="mixlora", scores="sigmoid", router_lr=100.0), train_toy.adapt),
    "instruction-only + k-means": (dict(method="instruction-kmeans", scores="sigmoid"), kmeans(instruction_only)),
    "instruction-only + k-means; frozen (as MoCLE)": (dict(method="instruction-kmeans", scores="sigmoid", router_grad=False),
                                                      kmeans(instruction_only)),
    "credit + Gumbel + 100x lr": (dict(method="credit-gumbel", scores="sigmoid", router_lr=100.0), credit_gumbel),
    "update k-means; frozen": (dict(method="mixlora-update", scores="sigmoid", router_grad=False),
                               update_kmeans(variant(MixLoRALinear))),
    "instruction-only + update k-means (words); frozen": (
        dict(method="instruction-update-words", scores="sigmoid", router_grad=False), update_kmeans(instruction_only, words=True)),
    "instruction words": (dict(method="words", scores="sigmoid", conditional=False), instruction_words),
    "instruction words + update k-means": (dict(method="words-update", scores="sigmoid", conditional=False),
                                           update_kmeans(instruction_words, words=True)),
    "instruction words + update k-means; frozen": (
        dict(method="words-update", scores="sigmoid", conditional=False, router_grad=False),
        update_kmeans(instruction_words, words=True)),
    "words + update k-means + known words; frozen": (
        dict(method="words-update-known", scores="sigmoid", conditional=False, router_grad=False),
        update_kmeans(instruction_words, words=True, known=True)),
    "words + update k-means + word dropout; frozen": (
        dict(method="words-update-drop", scores="sigmoid", conditional=False, router_grad=False),
        update_kmeans(instruction_words, words=True, word_dropout=0.5)),
    "words + update k-means + known words + word dropout; frozen": (
        dict(method="words-update-known-drop", scores="sigmoid", conditional=False, router_grad=False),
        update_kmeans(instruction_words, words=True, known=True, word_dropout=0.5)),
    "words + update k-means + known words + word dropout + universal; frozen": (
        dict(method="words-update-universal", scores="sigmoid", conditional=False, router_grad=False),
        update_kmeans(universal_words, words=True, known=True, word_dropout=0.5)),
    "instruction-only + update k-means": (dict(method="instruction-update", scores="sigmoid"), update_kmeans(instruction_only)),
    "instruction-only + update k-means; frozen": (dict(method="instruction-update", scores="sigmoid", router_grad=False),
                                                  update_kmeans(instruction_only)),
}
ROUTED = [m for m in METHODS if not m.startswith("LoRA")]
# Post-hoc routing of a run's final model: {label: {name: the model routed anew}}, evaluated at the end.
POSTHOC = {"words + update k-means + known words + word dropout; frozen": {"Arrow (GenKnowSub)": arrow}}
FIGURE = ["LoRA r=4", "LoRA r=16", "MixLoRA softmax (the paper)", "MixLoRA sigmoid", "frozen routers (released code)",
          "task table (Poly; needs the label)", "oracle", "counterfactual credit", "Gumbel top-r",
          "instruction-only + k-means; frozen (as MoCLE)", "instruction-only + update k-means; frozen",
          "instruction words", "instruction words + update k-means; frozen",
          "words + update k-means + known words + word dropout; frozen"]  # the figure's lines: one or two per family


# ---- measuring along one schedule ----------------------------------------------------------------

def probe(x: np.ndarray, labels: np.ndarray) -> float:
    """Can a linear map read the task from x (n, d)? The test accuracy of a multinomial logistic
    regression (L-BFGS, a little L2) fitted on every other instance of each task, scored on the rest."""
    X, y = torch.from_numpy(x).double(), torch.from_numpy(labels)
    fit = torch.arange(len(y)) % 2 == 0
    mean, std = X[fit].mean(0), X[fit].std(0).clamp_min(1e-8)
    X = (X - mean) / std  # standardised on the fitted half
    W = torch.zeros(X.shape[1], int(y.max()) + 1, dtype=torch.double, requires_grad=True)
    b = torch.zeros(W.shape[1], dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(X[fit] @ W + b, y[fit]) + 1e-3 * (W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float(((X[~fit] @ W + b).argmax(1) == y[~fit]).double().mean())


def diagnose(model: TinyMLLM, tasks: list[toy_tasks.Task], per_task: int, before: dict | None) -> dict:
    """The routing of one model, per block: probe, within and between Jaccard, the share of
    instances whose selection changed since `before` (the previous point's), and router collapse."""
    examples = [e for t in tasks for e in toy_tasks.samples(t, per_task, f"routers-{t.name}")]
    heldout = [e for t in tasks for e in toy_tasks.samples(t, per_task, f"routers-{t.name}", heldout=True)]
    labels = np.repeat(np.arange(len(tasks)), per_task)
    x_bars, hots = common.routing_view(model, examples + heldout)
    hots, heldout_hots = {b: h[:len(examples)] for b, h in hots.items()}, {b: h[len(examples):] for b, h in hots.items()}
    x_bars = {b: x[:len(examples)] for b, x in x_bars.items()}
    same, other = labels[:, None] == labels[None, :], ~np.eye(len(labels), dtype=bool)
    sims = [common.jaccard(torch.from_numpy(hot).double()).numpy() for hot in hots.values()]
    # A held-out phrasing's selection against the seen phrasings' of its own task and of the others:
    # does a new phrasing get its task's factors? (n_heldout, n_seen) Jaccard per block.
    cross = [common.jaccard(torch.from_numpy(np.concatenate([h, hots[b]])).double()).numpy()[:len(h), len(h):]
             for b, h in heldout_hots.items()]
    report = {"probe": [probe(x, labels) for x in x_bars.values()],
              "within": [float(s[same & other].mean()) for s in sims],
              "between": [float(s[~same].mean()) for s in sims],
              "heldout_within": [float(c[same].mean()) for c in cross],
              "heldout_between": [float(c[~same].mean()) for c in cross],
              "hots": {b: hot.tolist() for b, hot in hots.items()}}
    if before is not None:
        report["changed"] = [float((np.array(before["hots"][b]) != hot).any(1).mean()) for b, hot in hots.items()]
    layers = [m for m in model.modules() if isinstance(m, MixLoRALinear)]
    if all(m.last_routing.p_a is not None for m in layers):  # the oracle has no scores
        report["collapse"] = common.router_collapse(model, examples)
    return report


def along(config: Config, adapt: common.Adapt, steps: list[int]):
    """Yield (step, model in eval mode) at each of `steps` along one schedule of config.steps: the
    run trains on from the last point, resumed from its checkpoint, so every model is the one an
    uninterrupted run has at that step (tests/test_routers.py checks it)."""
    model = common.untrained(config, adapt)
    ckpt = Path(config.checkpoints) / "experiments" / f"{train_toy.run_name(config)}-curve.ckpt"
    ckpt.unlink(missing_ok=True)  # a curve starts at step 0 (a killed one starts over)
    for step in steps:
        if step:
            train_toy.train(model, "instruct", replace(config, resume=True), ckpt, until=step)
        yield step, model.eval()
    ckpt.unlink(missing_ok=True)


def curve(label: str, config: Config, out: Path, points: int, train: bool = True) -> dict | None:
    """One run of `label` on one cell and seed, evaluated at `points` + 1 steps along its schedule:
    {"steps", "seen" and "heldout" (exact match % on the seen and the held-out phrasings), and for
    routed runs "routing" per point (diagnose)}. Cached (common.cache_file) on the config, the label and
    the points; train=False returns None for a run not in the cache."""
    changes, adapt = METHODS[label]
    config = replace(config, **changes)
    cache = common.cache_file(out, f"{train_toy.run_name(config)}-curve{points}", config, label=label, points=points)
    if cache.exists():
        return json.loads(cache.read_text())
    if not train:
        return None
    tasks = list(train_toy.suite(config).values())
    sets = common.conflict_sets(tasks, config.eval_size)
    result: dict = {"steps": [round(config.steps * i / points) for i in range(points + 1)], "seen": [], "heldout": [],
                    "routing": []}
    start = time.time()
    for step, model in along(config, adapt, result["steps"]):
        scores = train_toy.evaluate(model, train_toy.TOK, sets)
        result["seen"].append(common.mean_accuracy(scores, "seen"))
        result["heldout"].append(common.mean_accuracy(scores, "heldout"))
        if label in ROUTED:
            before = result["routing"][-1] if result["routing"] else None
            result["routing"].append(diagnose(model, tasks, 64 if not config.quick else 8, before))
    for name, route_anew in POSTHOC.get(label, {}).items():  # the final model, its factors routed otherwise
        model = route_anew(model)
        scores = train_toy.evaluate(model, train_toy.TOK, sets)
        result.setdefault("posthoc", {})[name] = {
            "seen": common.mean_accuracy(scores, "seen"), "heldout": common.mean_accuracy(scores, "heldout"),
            "routing": {k: v for k, v in diagnose(model, tasks, 64 if not config.quick else 8, None).items() if k != "hots"}}
    for point in result["routing"]:
        del point["hots"]  # what each point compared with its predecessor
    result["seconds"] = time.time() - start
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


def steps_to(result: dict, threshold: float = 90.0) -> int | None:
    """The first evaluated step at which the seen accuracy reaches the threshold (None: never)."""
    return next((s for s, a in zip(result["steps"], result["seen"]) if a >= threshold), None)


def separation(point: dict) -> float:
    """The largest within − between Jaccard over the blocks."""
    return max(w - b for w, b in zip(point["within"], point["between"]))


# ---- what the routers could read: the task, or the phrasing? ----------------------------------------

def explained(x: Tensor, groups: np.ndarray) -> float:
    """The share of the variance of x (n, d) that the group means explain: between-group over total
    sum of squares (η²)."""
    x = x - x.mean(0)
    means = {g: x[torch.from_numpy(groups == g)].mean(0) for g in np.unique(groups)}
    between = sum(float((groups == g).sum()) * float(m.pow(2).sum()) for g, m in means.items())
    return between / float(x.pow(2).sum().clamp_min(1e-30))


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information of two labellings: 1 when one determines the other, 0 when
    independent (the geometric mean of the two entropies normalises)."""
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0 / len(a))
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = (joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum()
    h = lambda q: -(q[q > 0] * np.log(q[q > 0])).sum()
    return float(mi / np.sqrt(h(pa) * h(pb))) if h(pa) * h(pb) > 0 else 0.0


def signal(config: Config, prompts: int = 512) -> dict:
    """What the routers could read at step 0 (the frozen base; the untrained adapters add nothing):
    per block, the share of x̄'s variance that the task explains and the share the phrasing (the
    instruction template) explains, for x̄ over the prompt and over the instruction only; and
    whether clustering finds the task: the NMI with the task and with the phrasing of k-means
    clusters (k = E, as the k-means start uses, and k = K) of block 0's instruction x̄, and of the
    update each instruction asks for, least-squares `fitted` on block 0's instruction x̄ (so what it
    varies with is the instruction, not the image): of every adapted weight, G_i = Σ_t ∂L/∂y_t ⊗ x_t,
    and of the map from image to answer, U_i (`answer_update_gram`)."""
    model = common.untrained(replace(config, method="mixlora"))
    layers = [m for m in model.modules() if isinstance(m, MixLoRALinear)]
    tasks = train_toy.training_tasks(config)
    examples = train_toy.training_examples("signal", config.seed, 0, prompts, tasks=tasks)
    task = np.unique([e.task for e in examples], return_inverse=True)[1]
    phrasing = np.unique([e.prompt.split(" , ", 1)[1] for e in examples], return_inverse=True)[1]
    seen: dict[MixLoRALinear, dict[str, Tensor]] = {}

    def keep(layer: MixLoRALinear, inputs: tuple, output: Tensor) -> None:
        seen[layer] = {"x": inputs[0].detach(), "mask": layer.mask.clone()}
        output.register_hook(lambda g: seen[layer].__setitem__("g", g.detach()))

    hooks = [layer.register_forward_hook(keep) for layer in layers]
    device = next(model.parameters()).device
    _, loss = model.train()(*train_toy.collate(examples, train_toy.TOK, device))
    loss.backward()
    for h in hooks:
        h.remove()

    def x_bar(layer: MixLoRALinear, instruction: bool) -> Tensor:
        mask = seen[layer]["mask"].clone()
        if instruction:
            mask[:, :model.config.num_patches] = False
        return common.masked_mean(seen[layer]["x"], mask).double().cpu()  # (n, d_in)

    firsts = [next(m for m in block.modules() if isinstance(m, MixLoRALinear)) for block in model.layers]
    blocks = [{where: {"task": explained(x_bar(layer, where == "instruction"), task),
                       "phrasing": explained(x_bar(layer, where == "instruction"), phrasing)}
               for where in ("prompt", "instruction")} for layer in firsts]

    def gram(layer: MixLoRALinear) -> Tensor:  # (n, n): <G_i, G_j> for one adapted weight
        G = torch.einsum("nto,nti->noi", seen[layer]["g"], seen[layer]["x"]).flatten(1).double().cpu()  # (n, d_out·d_in)
        return G @ G.T

    X = x_bar(firsts[0], True)
    weights = fitted(X, sum(gram(layer) for layer in layers))
    answers = fitted(X, answer_update_gram(model.eval(), *train_toy.collate(examples, train_toy.TOK, device)))
    gen = torch.Generator().manual_seed(config.seed)
    clusters = {}
    for name, features in [("block 0's instruction x̄", X), ("the weights' update G each instruction asks for", weights),
                           ("the image → answer update U each instruction asks for", answers)]:
        for k in (layers[0].num_factors, len(tasks)):
            nearest = torch.cdist(features, k_means(features, k, 25, gen)).argmin(1).numpy()
            clusters[f"{name}, k = {k}"] = {"task": nmi(nearest, task), "phrasing": nmi(nearest, phrasing)}
    return {"blocks": blocks, "clusters": clusters, "prompts": prompts}


# ---- the report ----------------------------------------------------------------------------------

def signal_table(signal: dict) -> list[str]:
    lines = ["What the routers could read at step 0 (`signal`, seed 0): the share of x̄'s variance that the task "
             "explains, and the share the phrasing explains, per block", "",
             "| block | prompt x̄: task | prompt x̄: phrasing | instruction x̄: task | instruction x̄: phrasing |",
             "|---|---|---|---|---|"]
    lines += [f"| {b} | {v['prompt']['task']:.3f} | {v['prompt']['phrasing']:.3f} | {v['instruction']['task']:.3f} | "
              f"{v['instruction']['phrasing']:.3f} |" for b, v in enumerate(signal["blocks"])]
    lines += ["", f"and what k-means finds in it ({signal['prompts']} training prompts): the NMI of its clusters "
                  "with the task and with the phrasing", "", "| clustered | task | phrasing |", "|---|---|---|"]
    lines += [f"| {name} | {v['task']:.2f} | {v['phrasing']:.2f} |" for name, v in signal["clusters"].items()]
    return lines + [""]


def tables(results: dict) -> str:
    lines = []
    for key, by_method in results["curves"].items():
        oracle = [steps_to(r) for r in by_method.get("oracle", [])]
        steps = next(iter(by_method.values()))[0]["steps"]
        lines += [f"### {key}: {steps[-1]} steps, evaluated every {steps[1]}", "",
                  "Steps to 90 % on the seen phrasings per seed (-: never), the final accuracy on the seen and "
                  "the held-out phrasings (mean ± std over seeds), "
                  "and, at the end, per block: the probe's accuracy and within − between Jaccard "
                  "(mean over seeds), the same for a held-out phrasing's selection against the seen phrasings' "
                  "(its task's − the other tasks'), and the largest share of selections that changed over the last interval:", "",
                  "| method | seeds | steps to 90 % | final seen % | final held-out % | probe per block | within − between per block "
                  "| held-out: within − between per block | changed |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for label, runs in by_method.items():
            seeds = ", ".join(str(r["seed"]) for r in runs)
            reach = " / ".join("-" if s is None else str(s) for s in map(steps_to, runs))
            final = cell([r["seen"][-1] for r in runs])
            heldout = cell([r["heldout"][-1] for r in runs])
            if runs[0]["routing"]:
                ends = [r["routing"][-1] for r in runs]
                probe_cells = " · ".join(f"{v:.2f}" for v in np.mean([e["probe"] for e in ends], axis=0))
                gap = " · ".join(f"{v:+.2f}" for v in np.mean([np.subtract(e["within"], e["between"]) for e in ends], axis=0))
                changed = f"{max(max(e.get('changed', [0.0])) for e in ends):.2f}"
                moved = " · ".join(f"{v:+.2f}" for v in np.mean(
                    [np.subtract(e["heldout_within"], e["heldout_between"]) for e in ends], axis=0)) \
                    if all("heldout_within" in e for e in ends) else "-"  # ("-": cached before it was measured)
            else:
                probe_cells = gap = changed = moved = "-"
            lines.append(f"| {label} | {seeds} | {reach} | {final} | {heldout} | {probe_cells} | {gap} | {moved} | {changed} |")
            for name in runs[0].get("posthoc", {}):  # the final models, routed anew (POSTHOC)
                post = [r["posthoc"][name] for r in runs]
                lines.append(f"| {label}, then {name} | {seeds} | - | {cell([p['seen'] for p in post])} | "
                             f"{cell([p['heldout'] for p in post])} | - | " + " · ".join(f"{v:+.2f}" for v in np.mean(
                                 [np.subtract(p["routing"]["within"], p["routing"]["between"]) for p in post], axis=0))
                             + " | " + " · ".join(f"{v:+.2f}" for v in np.mean([np.subtract(
                                 p["routing"]["heldout_within"], p["routing"]["heldout_between"]) for p in post], axis=0)) + " | - |")
        if key in results.get("signal", {}):
            lines += [""] + signal_table(results["signal"][key])
        if oracle and None not in oracle:
            lines += ["", f"The oracle's steps to 90 %: {' / '.join(map(str, oracle))}; the goal, within 1.5× of it in "
                          "every seed, is met by: " + (", ".join(
                              label for label, runs in by_method.items() if label != "oracle" and len(runs) == len(oracle)
                              and all(s is not None and s <= 1.5 * o for s, o in zip(map(steps_to, runs), oracle))) or "none")]
        lines.append("")
    return "\n".join(lines)


def figure(results: dict, path: Path) -> None:
    """Per cell: seen accuracy along the schedule, and the best block's within − between Jaccard,
    mean over seeds, one line per method of FIGURE (all of METHODS would be too many to tell apart)."""
    from PIL import Image, ImageDraw
    cells = list(results["curves"])
    methods = [m for m in FIGURE if any(m in by_method for by_method in results["curves"].values())]
    pw, ph, m = 420, 240, 50
    img = Image.new("RGB", (2 * pw + 20, len(cells) * (ph + 40) + 20 + 18 * len(methods)), "white")
    draw = ImageDraw.Draw(img)
    extra = [(0, 128, 128), (128, 0, 0), (0, 0, 0x80)]  # past tab10's ten: FIGURE has thirteen lines besides the oracle's
    others = iter(common.PALETTE + extra)
    colour = {label: (0, 0, 0) if label == "oracle" else next(others) for label in methods}
    for row, key in enumerate(cells):
        steps = next(iter(results["curves"][key].values()))[0]["steps"]  # the cell's schedule
        for col, (title, lo, hi) in enumerate([(f"{key}: seen exact match %", 0.0, 100.0),
                                               (f"{key}: within − between Jaccard (best block)", -0.1, 1.0)]):
            x0, y0 = col * (pw + 10) + m, row * (ph + 40) + 30
            x1, y1 = x0 + pw - m - 10, y0 + ph - 40
            draw.text((x0, y0 - 20), title, fill="black", font=common.FONT)
            draw.rectangle((x0, y0, x1, y1), outline="black")
            for v in (lo, hi):
                draw.text((x0 - 40, y1 - (v - lo) / (hi - lo) * (y1 - y0) - 7), f"{v:g}", fill="black", font=common.FONT)
            for label, runs in results["curves"][key].items():
                if label not in colour or col == 1 and not runs[0]["routing"]:
                    continue
                ys = np.mean([r["seen"] if col == 0 else [separation(p) for p in r["routing"]] for r in runs], axis=0)
                pts = [(x0 + s / steps[-1] * (x1 - x0), y1 - (min(max(y, lo), hi) - lo) / (hi - lo) * (y1 - y0))
                       for s, y in zip(steps, ys)]
                draw.line(pts, fill=colour[label], width=2)
            draw.text((x0, y1 + 4), f"step 0 ... {steps[-1]}", fill="black", font=common.FONT)
    for j, label in enumerate(methods):
        x, y = 20, len(cells) * (ph + 40) + 10 + 18 * j  # one label a row: some are long
        draw.line((x, y + 7, x + 24, y + 7), fill=colour[label], width=3)
        draw.text((x + 30, y), label, fill="black", font=common.FONT)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--cells", default=None, help=f"comma-separated, of: {', '.join(CELLS)} (default: all; K2 with --quick)")
    p.add_argument("--methods", default=None, help="comma-separated labels of METHODS (default: all)")
    p.add_argument("--seeds", type=cli.integers(0), default="0,1,2", help="comma-separated stage-2 seeds")
    p.add_argument("--steps", type=cli.at_least(1), default=600, help="stage-2 steps: the schedule")
    p.add_argument("--points", type=cli.at_least(1), default=12, help="evaluations along the schedule")
    p.add_argument("--threads", type=cli.at_least(1), default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", type=cli.device, default="auto")
    p.add_argument("--quick", action="store_true", help="the smoke-test model, K = 2, a few steps (CI)")
    p.add_argument("--out", default=None, help="default: experiments/results/routers (runs/routers-quick with --quick)")
    p.add_argument("--checkpoints", default="checkpoints")
    p.add_argument("--cached", action="store_true",
                   help="report the runs already in <out>/cache/ (not committed: a fresh clone has none); train none")
    args = p.parse_args(argv)
    cells = {"K2": dict(conflict=(2, 1.0))} if args.quick else CELLS
    chosen = args.cells.split(",") if args.cells else list(cells)
    methods = args.methods.split(",") if args.methods else list(METHODS)
    for name, known, flag in [(c, cells, "--cells") for c in chosen] + [(m, METHODS, "--methods") for m in methods]:
        if name not in known:
            p.error(f"argument {flag}: unknown {name!r}; expected some of {', '.join(known)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    points = min(args.points, 3) if args.quick else args.points
    out = Path(args.out or ("runs/routers-quick" if args.quick else "experiments/results/routers"))
    base = common.config(args.quick, args.device, args.checkpoints, steps=args.steps)
    start = time.time()
    results: dict = {"points": points, "seeds": args.seeds, "curves": {}}  # each run keeps its steps
    for key in chosen:
        config = replace(base, **cells[key])
        curves: dict[str, list[dict]] = {}
        for label in methods:
            for seed in args.seeds:
                run = curve(label, replace(config, seed=seed), out, points, train=not args.cached)
                if run is not None:
                    curves.setdefault(label, []).append(run | {"seed": seed})
        if curves:  # (with --cached, a cell may have none)
            results["curves"][key] = curves
            signal_config, prompts = replace(config, method="mixlora", seed=0), 64 if args.quick else 512
            cache = common.cache_file(out, f"signal-{train_toy.run_name(signal_config)}", signal_config, prompts=prompts)
            if not cache.exists() and not args.cached and config.conflict:  # (the phrasing: the conflict's templates)
                cache.write_text(json.dumps(signal(signal_config, prompts=prompts)))
            if cache.exists():
                results.setdefault("signal", {})[key] = json.loads(cache.read_text())
    if not results["curves"]:  # --cached with an empty cache: keep the committed report
        p.error(f"argument --cached: no cached runs of these cells and methods under {out / 'cache'}")
    results["wall_s"], results["torch"], results["threads"] = time.time() - start, torch.__version__, torch.get_num_threads()
    common.write_results(out, results, tables(results))
    figure(results, out / "curves.png")
    return results


if __name__ == "__main__":
    main()
