"""MixLoRA: Conditional Mixture of LoRA, the whole method in one file.

Shen, Xu, Wang, Cheng, Yin, Huang, "Multimodal Instruction Tuning with Conditional Mixture
of LoRA", ACL 2024, arXiv 2402.15896. (Not the token-routed mixture of LoRA experts of
arXiv 2404.15159, which shares the name.)

LoRA adds to a frozen weight W (d_out x d_in) a product of A (r x d_in) and B (d_out x r),
which is a sum of r rank-1 factors:

    ΔW = B A = Σ_{i=1..r} b_i ⊗ a_i                                               (eq. 1)

MixLoRA keeps a pool of E > r factors {a_e}, {b_e} per adapted layer, and every input
instance n builds its own ΔW_n from r of them:

    x̄_n = mean of x_n over its prompt positions (mask = True)
    IFS:  p^A = softmax(R^A x̄),   S^A = top-r(p^A), sorted ascending
    CFS:  c_e = Σ_j <a_{S^A_j}, W^CFS_{j,:,e}>
          p^B = softmax(R^B x̄) + λ softmax(c),   S^B = top-r(p^B), sorted ascending
    y   = W x + (α/r) Σ_j w_j b_{S^B_j} (a_{S^A_j} · x),   w_j = 1 in value (straight-through)

scores="sigmoid" (this project's option, not the paper's) puts a per-factor σ where the three
softmaxes over E stand: one factor's score no longer rises only by pushing the others down.
add_words (ours too, at the end of the file) routes every layer on the instruction's words instead
of x̄, with routers fitted once from the training answers and frozen (docs/method.md §3.11).

The spec, in full and with numbered sections (§), is docs/method.md. Read top to bottom:
LoRALinear (the baseline), MixLoRALinear (route, forward, delta_weight), then the helpers that put
adapters into a model, route it on a prompt mask and save them.
"""

import json
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn as nn
from torch import Tensor


class _LowRankAdapter(nn.Module):
    """What LoRA and MixLoRA share: a frozen nn.Linear W, factor pools and the scale α/r.

    The pools hold E factors: a_e = lora_A[e] (a row) and b_e = lora_B[:, e] (a column).
    LoRA uses all of them (E = r); MixLoRA picks r per instance. As in LoRA, A starts
    kaiming-uniform and B at zero, so an adapted model starts exactly at its base model.
    The adapter stays a drop-in for the nn.Linear it wraps: .weight, .bias, .in_features
    and .out_features read through to it.

    Dtypes, as PEFT's autocast_adapter_dtype: with upcast=True (the default) pools and routers are
    float32 at least, whatever the base stores (bf16, fp16, int8, 4-bit), since AdamW on bf16 pools
    would lose small updates; upcast=False keeps them in the base's compute dtype, for memory. The
    forward casts x to the adapters' dtype and their output back to the base output's dtype.
    """

    def __init__(self, base: nn.Linear, num_factors: int, rank: int, alpha: float | None, dropout: float,
                 upcast: bool):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"an adapter wraps an nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        if not isinstance(num_factors, int) or num_factors < rank:
            raise ValueError(f"num_factors (E) must be an integer >= rank (r={rank}), since each instance "
                             f"picks r of the E factors; got {num_factors!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base = base
        self.num_factors, self.rank, self.upcast = num_factors, rank, upcast
        self.alpha = rank if alpha is None else alpha
        self.scaling = self.alpha / rank  # α / r
        self.dropout = nn.Dropout(dropout)
        dtype = compute_dtype(base)
        like = dict(device=base.weight.device, dtype=torch.promote_types(dtype, torch.float32) if upcast else dtype)
        self.lora_A = nn.Parameter(torch.empty(num_factors, base.in_features, **like))  # (E, d_in)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, num_factors, **like))  # (d_out, E)

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def extra_repr(self) -> str:
        return f"num_factors={self.num_factors}, rank={self.rank}, scaling={self.scaling:g}"


def compute_dtype(base: nn.Linear) -> torch.dtype:
    """The dtype base computes in: its weight's, or for a quantized store (bitsandbytes' int8 or
    packed 4-bit; torchao's weight tensors report their float dtype) bitsandbytes' compute_dtype
    where it is set, else that of the bias, else float32."""
    if base.weight.dtype.is_floating_point:
        return base.weight.dtype
    bias_dtype = base.bias.dtype if base.bias is not None else None
    return getattr(base, "compute_dtype", None) or bias_dtype or torch.float32


class LoRALinear(_LowRankAdapter):
    """LoRA (Hu et al., 2021), the baseline: y = W x + (α/r) B A dropout(x), ΔW = B A (eq. 1)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 upcast: bool = True):
        super().__init__(base, rank, rank, alpha, dropout, upcast)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected x of shape (..., {self.in_features}), got {tuple(x.shape)}")
        y = self.base(x)
        delta = self.dropout(x.to(self.lora_A.dtype)) @ self.lora_A.T @ self.lora_B.T  # in the adapters' dtype
        return y + (self.scaling * delta).to(y.dtype)

    def arguments(self) -> dict:
        """What built this adapter: add_lora's arguments (save_adapters writes them)."""
        return dict(method="lora", rank=self.rank, alpha=self.alpha, dropout=self.dropout.p, upcast=self.upcast)


class Routing(NamedTuple):
    """One routing decision per instance: S^A, S^B, their straight-through gates, and the scores."""

    index_a: Tensor  # (N, r) int64: S^A, the chosen a-factors, ascending
    index_b: Tensor  # (N, r) int64: S^B, the chosen b-factors, ascending
    gate_a: Tensor  # (N, r): 1.0 in value; its gradient is that of p^A[S^A]
    gate_b: Tensor  # (N, r): 1.0 in value; its gradient is that of p^B[S^B]
    p_a: Tensor | None = None  # (N, E): p^A, which S^A is the top-r of
    p_b: Tensor | None = None  # (N, E): p^B = IFS + λ CFS, which S^B is the top-r of


def straight_through(p: Tensor, index: Tensor) -> Tensor:
    """w = (g - g.detach()) + 1 with g = p[index]: exactly 1 forward, ∂w/∂p = ∂g/∂p backward.

    The bracket is exactly 0, so w is exactly 1; 1 + g - g.detach() would round, and E = r
    would then differ from LoRA in the last bits.
    """
    g = p.gather(-1, index)
    return (g - g.detach()) + 1.0


def _gather(pool: Tensor, index: Tensor) -> Tensor:
    """pool[index]: rows of an (E, d) pool for an (N, r) index -> (N, r, d).

    index_select rather than pool[index]: its backward (index_add_) is ~3x faster on the CPU
    and never syncs with the host on a GPU.
    """
    return pool.index_select(0, index.flatten()).view(*index.shape, pool.shape[1])


# How a router's logits z (N, E) become the scores p that top-r ranks and the gates carry:
# "softmax" over the E factors is the paper's (docs/method.md §3.2); "sigmoid" scores each factor on its
# own, p_e = σ(z_e), so that raising one chosen factor's p does not lower the others' (below).
SCORES = {"softmax": lambda z: torch.softmax(z, dim=-1), "sigmoid": torch.sigmoid}


class MixLoRALinear(_LowRankAdapter):
    """Conditional Mixture of LoRA: each instance n gets ΔW_n = (α/r) Σ_j b_{S^B_j} ⊗ a_{S^A_j}.

    lora_A (E, d_in) and lora_B (d_out, E) are the factor pools; with E = r they have exactly
    LoRALinear's shapes, and the layer is LoRA. Routers: R^A = router_A and R^B = router_B
    (E, d_in), both bias-free, for Independent Factor Selection (IFS); W^CFS = router_cfs for
    Conditional Factor Selection (CFS), weighted by λ = cfs_weight, stored as (d_in, r, E):
    router_cfs[:, j, e] = W^CFS_{j,:,e}, the layout in which scoring is one plain matmul.
    router_grad=False freezes the routers at their random init (stored as buffers, with no
    gradient through the routing): the behaviour of the authors' released code.

    scores="sigmoid" (not the paper; see SCORES) replaces the softmax over E by one sigmoid per
    factor in p^A, p^B and the CFS term. Why: with straight-through gates, a softmax lets one
    chosen factor take the score, and the other r - 1 keep p ≈ 0 and almost no gradient (measured
    in experiments/results/mechanism/). Selection, order, gates and forward are the same.
    """

    def __init__(self, base: nn.Linear, num_factors: int, rank: int, alpha: float | None = None,
                 dropout: float = 0.0, conditional: bool = True, cfs_weight: float = 1.0,
                 router_grad: bool = True, scores: str = "softmax", upcast: bool = True):
        super().__init__(base, num_factors, rank, alpha, dropout, upcast)
        if scores not in SCORES:
            raise ValueError(f"scores must be one of {', '.join(map(repr, SCORES))}, got {scores!r}")
        self.conditional, self.cfs_weight, self.router_grad = conditional, cfs_weight, router_grad
        self.scores = scores
        d_in, E, like = base.in_features, num_factors, self.lora_A
        # Small random init, as nn.Linear's default: uniform in ±1/sqrt(fan_in).
        routers = {"router_A": torch.rand(E, d_in) * 2 - 1, "router_B": torch.rand(E, d_in) * 2 - 1}
        routers = {name: w / math.sqrt(d_in) for name, w in routers.items()}
        if conditional:
            routers["router_cfs"] = (torch.rand(d_in, rank, E) * 2 - 1) / math.sqrt(rank * d_in)
        for name, w in routers.items():
            w = w.to(like)
            if router_grad:
                self.register_parameter(name, nn.Parameter(w))
            else:
                self.register_buffer(name, w)
        # Set by routing_mask(model, mask) for its duration, and restored when it exits:
        self.mask: Tensor | None = None  # the prompt mask
        self.held: Routing | None = None  # the prompt's routing, which new tokens reuse (detached)
        # Kept across contexts, to look at and to catch misuse:
        self.last_routing: Routing | None = None  # what the last routing forward used, detached
        self.routed_on_prompt = False  # whether that routing came from routing_mask's mask

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scores={self.scores}"

    def arguments(self) -> dict:
        """What built this adapter: add_mixlora's arguments (save_adapters writes them)."""
        return dict(method="mixlora", num_factors=self.num_factors, rank=self.rank, alpha=self.alpha,
                    dropout=self.dropout.p, conditional=self.conditional, cfs_weight=self.cfs_weight,
                    router_grad=self.router_grad, scores=self.scores, upcast=self.upcast)

    def route(self, x: Tensor, mask: Tensor | None = None) -> Routing:
        """Choose S^A by IFS and S^B by IFS + CFS for every instance of x ((N, T, d_in) or (N, d_in)).

        Routing runs in float32 at least (float64 stays float64), also under autocast, and sees
        x before dropout. mask (N, T) bool, True at prompt positions, selects what x̄ averages.
        """
        x, mask = _instances(x, mask, self.in_features, checked=mask is self.mask)  # (N, T, d_in), (N, T) or None
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            x_bar = self.x_bar(x, mask, dtype)  # (N, d_in)
            score = SCORES[self.scores]  # softmax over the E factors (the paper), or σ per factor
            # IFS: p^A = softmax(R^A x̄) and p^B's first term softmax(R^B x̄), in one matmul and one score.
            routers = torch.cat([self.router_A, self.router_B]).to(dtype)  # (2E, d_in)
            p_a, p_b = score((x_bar @ routers.T).view(-1, 2, self.num_factors)).unbind(1)  # (N, E) each
            index_a = self.top_r(p_a)  # (N, r): S^A, in canonical (ascending) order
            # IFS + CFS: p^B = softmax(R^B x̄) + λ softmax(c), c_e = Σ_j <a_{S^A_j}, W^CFS_{j,:,e}>.
            if self.conditional:
                p_b = p_b + self.cfs_weight * score(self.cfs_logits(index_a, dtype))
            index_b = self.top_r(p_b)  # (N, r)
        if not self.router_grad:  # frozen routers: hard indices, no gradient through the routing
            p_a, p_b = p_a.detach(), p_b.detach()
        return Routing(index_a, index_b, straight_through(p_a, index_a), straight_through(p_b, index_b), p_a, p_b)

    def x_bar(self, x: Tensor, mask: Tensor | None, dtype: torch.dtype) -> Tensor:
        """x̄ (§3.1): the mean of x (N, T, d_in) over its prompt positions, in dtype -> (N, d_in)."""
        # Routing reads x and the a-pool, and trains the routers only (§3.4): detached, so that
        # no routing gradient reaches the factors or the layers below, and E = r trains as LoRA.
        x = x.detach().to(dtype)  # pooled in float32 too (§3.5)
        if mask is None:
            return x.mean(1)
        # Masked mean as one matmul. clamp: an instance with no prompt position (an error
        # where _instances can check it) routes on x̄ = 0, never on NaN.
        m = mask.to(dtype)
        m = m / m.sum(1, keepdim=True).clamp(min=1)
        return torch.bmm(m[:, None, :], x).squeeze(1)  # (N, 1, T) @ (N, T, d_in) -> (N, d_in)

    def top_r(self, p: Tensor) -> Tensor:
        """S = the r factors of largest score p (N, E), sorted ascending: the canonical order."""
        index = p.topk(self.rank, dim=-1, sorted=False).indices  # (N, r), in no particular order
        return index.topk(self.rank, dim=-1, largest=False).values  # ascending: one op, where sort() is eight

    def cfs_logits(self, index_a: Tensor, dtype: torch.dtype) -> Tensor:
        """CFS: c_e = Σ_j <a_{S^A_j}, W^CFS_{j,:,e}> for every instance's S^A (N, r) -> c (N, E).

        Every factor f is scored in every slot j once, G_fje = <a_f, W^CFS_{j,:,e}> (no per-
        instance gather of A, no copy of W^CFS), then the r entries chosen are added up.
        """
        G = self.lora_A.detach().to(dtype) @ self.router_cfs.to(dtype).flatten(1)  # (E, r·E); trains W^CFS only
        slots = torch.arange(self.rank, device=index_a.device)
        return _gather(G.view(-1, self.num_factors), index_a * self.rank + slots).sum(1)  # (N, r, E) -> (N, E)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """y = W x + (α/r) bmm(bmm(dropout(x), A_nᵀ) · w, B_nᵀ): two gathers and two bmm's.

        x: (N, T, d_in), or (N, d_in) for one position per instance. mask defaults to the one
        set by routing_mask(). No per-instance ΔW, no loop over instances, no host sync.
        """
        routing = self._routing(x, mask)
        x3 = (x if x.dim() == 3 else x[:, None]).to(self.lora_A.dtype)  # (N, T, d_in), in the adapters' dtype
        A, B = self.factors(routing)  # (N, r, d_in), (N, r, d_out)
        h = torch.bmm(self.dropout(x3), A.transpose(1, 2))  # (N, T, r)
        w = routing.gate_a * routing.gate_b  # (N, r), exactly 1 in value
        delta = torch.bmm(h * w[:, None, :].to(h.dtype), B)  # (N, T, d_out)
        y = self.base(x)  # computed last, as it always was: earlier, it moved float32 results in the last bits
        return y + (self.scaling * delta.view(*x.shape[:-1], -1)).to(y.dtype)

    def factors(self, routing: Routing) -> tuple[Tensor, Tensor]:
        """Each instance's chosen factors: rows a_{S^A_j} (N, r, d_in) and columns b_{S^B_j} (N, r, d_out)."""
        return _gather(self.lora_A, routing.index_a), _gather(self.lora_B.T, routing.index_b)

    def _routing(self, x: Tensor, mask: Tensor | None) -> Routing:
        """route(x, mask); inside routing_mask(model, mask), the rule that makes generation route as training:
          x as long as the mask (the prompt, + answer when teacher-forced): route on it, hold the routing;
          x of any other length (new tokens: a decode step, cached or not): reuse the held routing.
        """
        T = x.shape[1] if x.dim() == 3 else 1
        if mask is None and self.mask is not None and T != self.mask.shape[1]:
            held = self.held
            if held is None:
                raise ValueError(f"x has {T} position(s) but the routing mask has {self.mask.shape[1]}: new "
                                 f"tokens after a prompt, which reuse its routing, but no prompt has been "
                                 f"routed inside this routing_mask(...) yet; run the prompt (prefill) first")
            if held.index_a.shape[0] != x.shape[0]:
                raise ValueError(f"x has {x.shape[0]} instance(s) but the prompt was routed with "
                                 f"{held.index_a.shape[0]}; keep the batch of the prompt")
            return held  # its gates are detached, and exactly 1 as every gate is in value
        if mask is None and self.mask is None and self.routed_on_prompt and torch._C._current_graph_task_id() != -1:
            # Inside backward: gradient checkpointing is recomputing a forward that ran inside
            # routing_mask. Without that mask it would route differently, and the gradient be wrong.
            raise ValueError("gradient checkpointing recomputed a MixLoRA layer outside the routing_mask"
                             "(model, mask) that its forward ran in: call loss.backward() inside the "
                             "`with routing_mask(...)` block")
        self.routed_on_prompt = mask is None and self.mask is not None
        routing = self.route(x, self.mask if mask is None else mask)
        self.last_routing = Routing(*(t if t is None else t.detach() for t in routing))
        if self.routed_on_prompt:
            self.held = self.last_routing
        return routing

    def delta_weight(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The explicit ΔW_n = (α/r) Σ_j w_j b_{S^B_j} ⊗ a_{S^A_j} (eq. 1) of every instance: (N, d_out, d_in).

        For teaching and tests: slow on purpose; forward never builds it.
        """
        routing = self.route(x, mask)
        A, B = self.factors(routing)  # (N, r, d_in), (N, r, d_out)
        w = routing.gate_a * routing.gate_b  # (N, r)
        delta = A.new_zeros(A.shape[0], self.out_features, self.in_features)  # (N, d_out, d_in)
        for j in range(self.rank):  # Σ_j over the r slots; ⊗ is the outer product b a^T
            delta = delta + w[:, j, None, None] * (B[:, j, :, None] * A[:, j, None, :])
        return self.scaling * delta


def _instances(x: Tensor, mask: Tensor | None, in_features: int, checked: bool = False) -> tuple[Tensor, Tensor | None]:
    """Check x and mask; return x as (N, T, d_in) and mask as (N, T) bool or None. checked: the mask is
    routing_mask's, which has checked that every instance has a prompt position, once for all layers."""
    if x.dim() not in (2, 3) or x.shape[-1] != in_features:
        raise ValueError(f"expected x of shape (N, T, {in_features}) or (N, {in_features}), "
                         f"got {tuple(x.shape)}")
    x = x if x.dim() == 3 else x[:, None]
    if mask is None:
        return x, None
    N, T = x.shape[:2]
    if mask.dtype != torch.bool or tuple(mask.shape) != (N, T):
        hint = "" if mask.dim() != 2 or mask.shape[0] == N else (
            " (if generate() expanded the batch k-fold for beam search or num_return_sequences, "
            "pass mask.repeat_interleave(k, dim=0))")
        raise ValueError(f"mask must be a bool tensor of shape (N, T) = ({N}, {T}), True at prompt "
                         f"positions; got {mask.dtype} of shape {tuple(mask.shape)}{hint}")
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
    if not checked:
        _check_prompts(mask)
    return x, mask


def _check_prompts(mask: Tensor) -> None:
    """Every instance of mask (N, T) needs a prompt position to route on. Checked where it is free: on
    the CPU, outside torch.compile (on a GPU it would sync)."""
    if mask.device.type == "cpu" and not torch.compiler.is_compiling() and not mask.any(1).all():
        empty = (~mask.any(1)).nonzero().flatten().tolist()
        raise ValueError(f"mask has no True position in instance(s) {empty}: every instance needs "
                         f"at least one prompt position to route on")


# ---------------------------------------------------------------------------------------------
# Putting adapters into a model, routing it on a prompt mask, training and saving them
# ---------------------------------------------------------------------------------------------

def replace_linears(model: nn.Module, targets: Sequence[str] | str,
                    make: Callable[[nn.Linear], _LowRankAdapter]) -> nn.Module:
    """Swap every nn.Linear whose qualified name matches targets for make(linear), in place.

    targets: a list of name suffixes (["q_proj", "v_proj"]), or a regex that must match a whole
    name (as in PEFT). Every target must match something, and only nn.Linear layers.
    """
    def matches(name: str, target: str) -> bool:
        return name == target or name.endswith("." + target)

    names = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):
        chosen = [n for n in names if re.fullmatch(targets, n)]
        unmatched = [] if chosen else [targets]
    else:
        chosen = [n for n in names if any(matches(n, t) for t in targets)]
        unmatched = [t for t in targets if not any(matches(n, t) for n in names)]
    if unmatched:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"target(s) {unmatched} match no module of {type(model).__name__}; "
                         f"its nn.Linear layers are {linears[:12]}{' ...' if len(linears) > 12 else ''}")
    for name in chosen:
        module, parent = model.get_submodule(name), model.get_submodule(name.rpartition(".")[0])
        if isinstance(module, _LowRankAdapter) or isinstance(parent, _LowRankAdapter):
            raise ValueError(f"target {name!r} already has an adapter")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"target {name!r} is a {type(module).__name__}, not an nn.Linear")
        # Parents that read their linears' weights directly, never calling their forward: an
        # adapter there would silently do nothing (MultiheadAttention always; TransformerEncoderLayer
        # in its fused fast path, eval mode under no_grad).
        if isinstance(parent, (nn.MultiheadAttention, nn.TransformerEncoderLayer)):
            raise ValueError(f"target {name!r} belongs to an nn.{type(parent).__name__}, whose forward (for "
                             f"TransformerEncoderLayer: its fused inference fast path) reads the weight "
                             f"directly and bypasses the layer's forward, so an adapter there would do nothing")
    adapters = {name: make(model.get_submodule(name)) for name in chosen}  # all built, then swapped
    for name, adapter in adapters.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, adapter)
    return model


def add_lora(model: nn.Module, targets: Sequence[str] | str, rank: int, alpha: float | None = None,
             dropout: float = 0.0, upcast: bool = True) -> nn.Module:
    """Wrap the target nn.Linear layers of model in LoRALinear, in place; returns model."""
    return replace_linears(model, targets, lambda base: LoRALinear(base, rank, alpha, dropout, upcast))


def add_mixlora(model: nn.Module, targets: Sequence[str] | str, num_factors: int, rank: int,
                alpha: float | None = None, dropout: float = 0.0, conditional: bool = True,
                cfs_weight: float = 1.0, router_grad: bool = True, scores: str = "softmax",
                upcast: bool = True) -> nn.Module:
    """Wrap the target nn.Linear layers of model in MixLoRALinear, in place; returns model.

    upcast=True keeps pools and routers in float32 (at least) on a bf16, fp16 or quantized base;
    False, in the base's compute dtype (_LowRankAdapter)."""
    return replace_linears(model, targets, lambda base: MixLoRALinear(
        base, num_factors, rank, alpha, dropout, conditional, cfs_weight, router_grad, scores, upcast))


@contextmanager
def routing_mask(model: nn.Module, mask: Tensor) -> Iterator[None]:
    """Inside, every MixLoRALinear of model routes on mask (N, T) bool, True = prompt position.

    This is how a model hands its prompt mask to layers whose forward takes only x, so that
    routing never sees the answer: teacher-forced training and generation then route alike.
    A forward as long as the mask routes on it; a shorter or longer one (a decode step, with or
    without a KV cache) reuses that routing (MixLoRALinear._routing). For generation pass the
    prompt's mask (False at padding); where generate() expands the batch k-fold (beam search,
    num_return_sequences), pass mask.repeat_interleave(k, dim=0). Call backward inside too, so
    that gradient checkpointing's recomputation routes as the forward did. Contexts nest: on
    exit, the enclosing context's mask and held routing are back, as if the inner one never ran.
    """
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be a bool tensor of shape (N, T), got {mask.dtype} {tuple(mask.shape)}")
    _check_prompts(mask)  # here, once, rather than in every layer's route()
    layers = [m for m in model.modules() if isinstance(m, MixLoRALinear)]
    outer = [(layer.mask, layer.held) for layer in layers]  # None, None outside every context
    for layer in layers:
        layer.mask, layer.held = mask, None  # nothing held from an earlier prompt
    try:
        yield
    finally:  # contexts nest: give back the enclosing one's mask and held routing, also on error
        for layer, (outer_mask, outer_held) in zip(layers, outer):
            layer.mask, layer.held = outer_mask, outer_held


def _adapters(model: nn.Module) -> Iterator[tuple[str, _LowRankAdapter]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, _LowRankAdapter))


def mark_only_adapters_trainable(model: nn.Module) -> nn.Module:
    """Freeze everything but the adapters' pools and (trainable) routers; returns model."""
    model.requires_grad_(False)
    for _, adapter in _adapters(model):
        for name, p in adapter.named_parameters():
            p.requires_grad_(not name.startswith("base."))
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter tensor (pools, routers, frozen routers too), none of the base model's."""
    return {f"{prefix}.{k}" if prefix else k: v
            for prefix, adapter in _adapters(model)
            for k, v in adapter.state_dict().items() if not k.startswith("base.")}


def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Strict load: the keys and shapes must be exactly those of adapter_state_dict(model)."""
    own = adapter_state_dict(model)
    problems = [f"missing: {k}" for k in sorted(own.keys() - state_dict.keys())]
    problems += [f"unexpected: {k}" for k in sorted(state_dict.keys() - own.keys())]
    problems += [f"shape of {k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}"
                 for k in sorted(own.keys() & state_dict.keys()) if state_dict[k].shape != own[k].shape]
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ValueError("adapter checkpoint does not fit this model (other targets, method, E, r or "
                         f"CFS setting?):\n  {shown}")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(state_dict[k])


def save_atomically(write: Callable[[BinaryIO], object], path: str | Path) -> None:
    """write(f) into a temporary file, flush it to disk, then rename it to path: a crash mid-save
    never leaves half a checkpoint, and never destroys the previous one.

        save_atomically(lambda f: torch.save(adapter_state_dict(model), f), "adapters.pt")
        torch.load("adapters.pt", weights_only=True)  # tensors only: safe for a file from elsewhere
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# Sharing adapters: a directory with PEFT's file names (tools that look for them find them), but a config of its
# own. It must not say peft_type LORA, which PEFT would then load as plain LoRA, without the routing.
ADAPTER_CONFIG, FORMAT_VERSION = "adapter_config.json", 1
WEIGHTS = ("adapter_model.safetensors", "adapter_model.pt")
BUILDERS = {"lora": add_lora, "mixlora": add_mixlora}


def save_adapters(model: nn.Module, directory: str | Path, tensors: dict[str, Tensor] | None = None) -> None:
    """Write model's adapters to directory: adapter_config.json, which says what built them on which modules, and
    their tensors, as adapter_model.safetensors where the safetensors package is installed (loading runs no code),
    else as adapter_model.pt (loaded with weights_only=True). Each file is written atomically, the config last:
    its presence means a complete save. load_adapters(fresh_base, directory) puts them back.

    tensors: what to write, adapter_state_dict(model) by default; the full tensors, with its keys, where the
    model holds only shards of them (FSDP, ZeRO-3: gather them first).
    """
    directory = Path(directory)
    groups: dict[str, dict] = {}  # adapters built by the same arguments: one add_lora / add_mixlora call each
    for name, adapter in _adapters(model):
        arguments = adapter.arguments()
        groups.setdefault(json.dumps(arguments), dict(arguments, modules=[]))["modules"].append(name)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no adapters to save: add_lora or add_mixlora puts them in")
    own = adapter_state_dict(model)
    if tensors is None:
        tensors = own
    elif tensors.keys() != own.keys():
        raise ValueError(f"tensors must have adapter_state_dict(model)'s {len(own)} keys; got {len(tensors)} keys, "
                         f"{len(tensors.keys() ^ own.keys())} of them differing")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    try:
        from safetensors.torch import save as safetensors_bytes
        weights, write = WEIGHTS[0], lambda f: f.write(safetensors_bytes(tensors))
    except ImportError:
        weights, write = WEIGHTS[1], lambda f: torch.save(tensors, f)
    for stale in (ADAPTER_CONFIG, *WEIGHTS):  # an earlier save here: without its config, no one loads half of it
        (directory / stale).unlink(missing_ok=True)
    save_atomically(write, directory / weights)
    config = {"format": "mixlora", "format_version": FORMAT_VERSION, "weights": weights, "adapters": list(groups.values())}
    save_atomically(lambda f: f.write(json.dumps(config, indent=1).encode()), directory / ADAPTER_CONFIG)


def read_adapters(directory: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """The config and the tensors that save_adapters wrote to directory; ValueError where this code cannot read them."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"{path} not found: save_adapters writes it, last, into the directory it saves to")
    config = json.loads(path.read_text())
    if config.get("format") != "mixlora":
        peft = f" (peft_type {config['peft_type']}: a PEFT adapter, which PEFT loads)" if "peft_type" in config else ""
        raise ValueError(f"{path} is not a MixLoRA adapter config{peft}")
    if config["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {config['format_version']}; this mixlora.py reads up to "
                         f"{FORMAT_VERSION}: update mixlora.py")
    weights = Path(directory) / config["weights"]
    if weights.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"{weights} needs the safetensors package: pip install safetensors") from None
        tensors = load_file(weights)
    else:
        tensors = torch.load(weights, map_location="cpu", weights_only=True)
    return config, tensors


def load_adapters(model: nn.Module, directory: str | Path) -> nn.Module:
    """Put the adapters that save_adapters wrote to directory onto model, a base without them (the kind they were
    saved from): the same add_lora / add_mixlora calls on the same modules, then their tensors. Returns model.
    A config this code cannot read, or a base they do not fit, is a ValueError that names the problem.
    """
    config, tensors = read_adapters(directory)
    path = Path(directory) / ADAPTER_CONFIG
    modules = dict(model.named_modules())
    for group in config["adapters"]:  # check every group before changing the model
        if group["method"] not in BUILDERS:
            raise ValueError(f"{path}: unknown method {group['method']!r}; this mixlora.py knows "
                             f"{', '.join(map(repr, BUILDERS))}")
        for name in group["modules"]:
            if name not in modules:
                raise ValueError(f"{path}: the adapters sit on {name!r}, which this {type(model).__name__} does not "
                                 f"have: another base model, or not the model they were saved from?")
            saved = (tensors[f"{name}.lora_A"].shape[1], tensors[f"{name}.lora_B"].shape[0])  # (d_in, d_out)
            here = (getattr(modules[name], "in_features", None), getattr(modules[name], "out_features", None))
            if here != saved:
                raise ValueError(f"{path}: {name} maps {here[0]} -> {here[1]} features in this "
                                 f"{type(model).__name__} but {saved[0]} -> {saved[1]} in the adapters: another base model?")
    for group in config["adapters"]:
        arguments = {k: v for k, v in group.items() if k not in ("method", "modules")}
        BUILDERS[group["method"]](model, "|".join(map(re.escape, group["modules"])), **arguments)
    load_adapter_state_dict(model, tensors)
    return model


# ---- Routing on the instruction's words (ours, not the paper's: docs/method.md §3.11) --------------------
# Every adapted layer routes on the same x̄: the mean input embedding of the instruction's words (the prompt
# without its image placeholder tokens), over the words its start fitted on. R^A = R^B are fitted once, from
# what each training instance asks of the model (update_targets, fit_routers: hf/routing.py's update_kmeans_start
# on a transformers model), and stay frozen. What it buys and costs on the toy, against the paper's routing
# and the oracle: experiments/results/routers/README.md. The default stays the paper's routing.

def instruction_mask(input_ids: Tensor, prompt_mask: Tensor, image_token_id: int) -> Tensor:
    """The instruction's positions (N, L) bool: the prompt mask without the image placeholder tokens."""
    return prompt_mask & (input_ids != image_token_id)


def known_words(words: Tensor, input_ids: Tensor, known: Tensor) -> Tensor:
    """The instruction's words (N, L) bool that are known (vocab,) bool; all of them where none is."""
    fitted_on = words & known[input_ids]
    return torch.where(fitted_on.any(1, keepdim=True), fitted_on, words)


def words_x_bar(embedded: Tensor, mask: Tensor) -> Tensor:
    """x̄ = the mean of the input embeddings (N, L, d_words) over mask (N, L) -> (N, d_words), in float32 at
    least (§3.5), detached: routing trains no layer below it. The one place that says what the router pools."""
    dtype = torch.promote_types(embedded.dtype, torch.float32)
    m = mask.to(dtype)
    m = m / m.sum(1, keepdim=True).clamp(min=1)  # an instance with no instruction token routes on x̄ = 0
    return torch.bmm(m[:, None, :], embedded.detach().to(dtype)).squeeze(1)  # (N, 1, L) @ (N, L, d) -> (N, d)


def drop_words(words: Tensor, copies: int, p: float, gen: torch.Generator | None = None) -> Tensor:
    """`copies` of the words mask (N, L) bool, each word dropped with probability p, and every copy
    keeping at least one word (a copy that lost them all keeps them all): (copies, N, L) bool."""
    kept = (torch.rand(copies, *words.shape, generator=gen) >= p).to(words.device) & words
    return kept | (words & ~kept.any(2, keepdim=True))


class WordsLinear(MixLoRALinear):
    """MixLoRA whose routers read x̄ = words_x_bar of the instruction's input embeddings, not the layer's input.

    IFS only, frozen routers (buffers, router_grad=False). A start sets R^A = R^B (update_targets, then
    fit_routers) and `known`, the words it saw: hf/routing.py's update_kmeans_start on a transformers model.
    `input_ids` and `embedded` (N, L, d_words) are handed over by add_words' hook on the input embedding; the
    prompt mask is routing_mask's, as for every MixLoRA layer, which also makes new tokens reuse its routing.
    """

    def __init__(self, base: nn.Linear, num_factors: int, rank: int, d_words: int, image_token_id: int,
                 vocab_size: int, alpha: float | None = None, dropout: float = 0.0, scores: str = "softmax",
                 upcast: bool = True):
        super().__init__(base, num_factors, rank, alpha, dropout, conditional=False, router_grad=False,
                         scores=scores, upcast=upcast)
        self.d_words, self.image_token_id = d_words, image_token_id
        for name in ("router_A", "router_B"):  # MixLoRALinear's init, with d_words inputs: R^A, R^B (E, d_words)
            self.register_buffer(name, ((torch.rand(num_factors, d_words) * 2 - 1) / d_words ** 0.5).to(self.lora_A))
        # The words the routers were fitted on (the start sets it; until then every word): a word the start
        # never saw is no evidence for any factor, and a new phrasing's new words would only move x̄ off.
        self.register_buffer("known", torch.ones(vocab_size, dtype=torch.bool, device=self.lora_A.device))
        self.input_ids: Tensor | None = None  # (N, L), set by add_words' hook
        self.embedded: Tensor | None = None  # (N, L, d_words)

    def arguments(self) -> dict:
        """What built this layer: add_words' arguments (save_adapters writes them; load_adapters calls add_words)."""
        return dict(method="words", num_factors=self.num_factors, rank=self.rank, alpha=self.alpha,
                    dropout=self.dropout.p, scores=self.scores, upcast=self.upcast, d_words=self.d_words,
                    image_token_id=self.image_token_id, vocab_size=len(self.known))

    def x_bar(self, x: Tensor, mask: Tensor | None, dtype: torch.dtype) -> Tensor:
        """x̄ = the mean input embedding of the instruction's known words (N, d_words), not of x: the routing
        of MixLoRALinear.route is then IFS on it (conditional=False), with frozen routers."""
        if mask is None:
            raise ValueError("a words layer routes on the prompt: call the model inside "
                             "routing_mask(model, prompt_mask)")
        if self.embedded is None or self.embedded.shape[:2] != mask.shape:
            raise ValueError(f"the prompt mask is {tuple(mask.shape)} but the input embedding last seen is "
                             f"{None if self.embedded is None else tuple(self.embedded.shape[:2])}: call the model "
                             f"with input_ids (the words router reads get_input_embeddings()'s output)")
        words = known_words(instruction_mask(self.input_ids, mask, self.image_token_id), self.input_ids, self.known)
        return words_x_bar(self.embedded, words).to(dtype)  # (N, d_words)


def add_words(model: nn.Module, targets: Sequence[str] | str, num_factors: int, rank: int, d_words: int, image_token_id: int,
              vocab_size: int, alpha: float | None = None, dropout: float = 0.0, scores: str = "softmax",
              upcast: bool = True) -> nn.Module:
    """Wrap model's target nn.Linear layers in WordsLinear, in place, and register one forward hook on
    model.get_input_embeddings() that hands its input ids and output to them; returns model.

    A call shorter or longer than the prompt mask in force (a decode step, cached or not) hands nothing over:
    new tokens reuse the prompt's routing (MixLoRALinear._routing), and the prompt's embedding stays.
    """
    embedding = model.get_input_embeddings()
    if (embedding.num_embeddings, embedding.embedding_dim) != (vocab_size, d_words):
        raise ValueError(f"vocab_size={vocab_size}, d_words={d_words}, but {type(model).__name__}'s input embeddings "
                         f"are {embedding.num_embeddings} x {embedding.embedding_dim}: adapters of another base model?")
    layers = []

    def make(base: nn.Linear) -> WordsLinear:
        layers.append(WordsLinear(base, num_factors, rank, d_words, image_token_id, vocab_size, alpha, dropout,
                                  scores, upcast))
        return layers[-1]

    def hand_over(module: nn.Module, inputs: tuple, embedded: Tensor) -> None:
        input_ids = inputs[0]  # (N, L)
        for layer in layers:
            if layer.mask is None or input_ids.shape[1] == layer.mask.shape[1]:
                layer.input_ids, layer.embedded = input_ids, embedded.detach()

    replace_linears(model, targets, make)
    embedding.register_forward_hook(hand_over)
    return model


BUILDERS["words"] = add_words  # so that mixlora.load_adapters rebuilds words layers from their saved arguments


def update_targets(x_bar: Tensor, gram: Tensor, num_clusters: int, iters: int, gen: torch.Generator) -> Tensor:
    """What the routers are fitted to, from the words x̄ (n, d) and the Gram (n, n) of the updates U_i:

      1. U = fitted(x̄, gram): the part of U the words predict (the image averages out);
      2. k-means of U with k = num_clusters (E): factor e is cluster e's, in every layer;
      3. target (n, k) = −(distance to each centroid)², centred per instance and per cluster, so that
         an instance's largest are its nearest clusters, and no cluster is favoured on average.
    """
    if len(x_bar) < num_clusters:
        raise ValueError(f"the start clusters instances into E = {num_clusters} clusters; it needs at least "
                         f"{num_clusters} instances, got {len(x_bar)}")
    U = fitted(x_bar, gram)  # (n, 32)
    target = -torch.cdist(U, k_means(U, num_clusters, iters, gen)) ** 2  # (n, k)
    target = target - target.mean(1, keepdim=True)  # only an instance's ranking of the clusters counts
    return target - target.mean(0)  # no factor favoured on average: a bias-free router has no offset


def fit_routers(x_bar: Tensor, target: Tensor, dropped: Tensor | None = None) -> Tensor:
    """R (E, d) = ridge(x̄, target)ᵀ, scaled to logits of standard deviation 2: an instance's top-r are
    its r nearest clusters. Fitted on the word-dropout copies `dropped` (copies, n, d) of x̄ where
    given, each with its instance's target (word dropout: no single word of a phrasing decides)."""
    X, Y = (x_bar, target) if dropped is None else (dropped.flatten(0, 1), target.repeat(len(dropped), 1))
    R = ridge(X, Y)  # (d, E)
    return (R * 2.0 / (X @ R).std().clamp_min(1e-12)).T


def ridge(X: Tensor, Y: Tensor) -> Tensor:
    """The least-squares map W (d, k) from X (n, d) to Y (n, k), with a little ridge: (XᵀX + λI)⁻¹ XᵀY."""
    XtX = X.T @ X
    return torch.linalg.solve(XtX + 1e-2 * XtX.trace() / len(XtX) * torch.eye(len(XtX), dtype=X.dtype), X.T @ Y)


def fitted(X: Tensor, gram: Tensor, m: int = 32) -> Tensor:
    """Features U (n, ·) given by their Gram matrix (n, n), least-squares fitted on X (n, d): the
    part of U that X predicts, as its top m directions (n, m). Fitting on the instruction's x̄
    averages out what varies within an instruction (the image)."""
    X = X - X.mean(0)
    hat = X @ ridge(X, torch.eye(len(X), dtype=X.dtype))  # (n, n): the fit's hat matrix
    values, vectors = torch.linalg.eigh(hat @ gram @ hat)
    return vectors[:, -m:] * values[-m:].clamp_min(0).sqrt()


def k_means(x: Tensor, k: int, iters: int, gen: torch.Generator) -> Tensor:
    """Lloyd's algorithm from k points drawn at random: (n, d) -> (k, d) centroids."""
    centroids = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    for _ in range(iters):
        nearest = torch.cdist(x, centroids).argmin(1)  # (n,)
        for j in range(k):
            if (nearest == j).any():
                centroids[j] = x[nearest == j].mean(0)
    return centroids
