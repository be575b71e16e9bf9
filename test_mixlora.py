"""Property tests for mixlora.py: the equations of docs/method.md, checked over random shapes in float64."""

import copy
import importlib.util
import json
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from mixlora import (SCORES, LoRALinear, MixLoRALinear, WordsLinear, adapter_state_dict, add_lora, add_mixlora,
                     add_words, fit_routers, load_adapter_state_dict, load_adapters, mark_only_adapters_trainable,
                     routing_mask, save_adapters, update_targets)

settings.register_profile("default", deadline=None, max_examples=40, derandomize=True)
settings.load_profile("default")
F64 = torch.float64


@dataclass
class Case:
    N: int
    T: int
    d_in: int
    d_out: int
    E: int
    r: int
    seed: int
    conditional: bool


@st.composite
def cases(draw, E_equals_r: bool = False) -> Case:
    r = draw(st.integers(1, 5))
    E = r if E_equals_r else draw(st.integers(r, 12))
    return Case(N=draw(st.integers(1, 5)), T=draw(st.integers(1, 6)), d_in=draw(st.integers(1, 9)),
                d_out=draw(st.integers(1, 9)), E=E, r=r, seed=draw(st.integers(0, 2**31 - 1)),
                conditional=draw(st.booleans()))


def random_mask(N: int, T: int, g: torch.Generator) -> torch.Tensor:
    mask = torch.rand(N, T, generator=g) < 0.5
    mask[torch.arange(N), torch.randint(T, (N,), generator=g)] = True  # each instance routes on something
    return mask


def build(c: Case, **kwargs) -> tuple[MixLoRALinear, torch.Tensor, torch.Tensor]:
    """A float64 MixLoRALinear with a non-zero b-pool, an input x and a prompt mask."""
    torch.manual_seed(c.seed)
    layer = MixLoRALinear(nn.Linear(c.d_in, c.d_out, dtype=F64), c.E, c.r, alpha=2.0 * c.r,
                          conditional=c.conditional, **kwargs)
    nn.init.normal_(layer.lora_B)
    g = torch.Generator().manual_seed(c.seed)
    x = torch.randn(c.N, c.T, c.d_in, dtype=F64, generator=g)
    return layer, x, random_mask(c.N, c.T, g)


# ---- the method's consequences --------------------------------------------------------------

@given(cases(E_equals_r=True), st.booleans(), st.sampled_from(list(SCORES)))
def test_E_equals_r_is_lora(c: Case, use_mask: bool, scores: str):
    torch.manual_seed(c.seed)
    base = nn.Linear(c.d_in, c.d_out, dtype=F64)
    lora = LoRALinear(base, c.r, alpha=3.0)
    nn.init.normal_(lora.lora_B)
    mix = MixLoRALinear(base, c.r, c.r, alpha=3.0, conditional=c.conditional, scores=scores)
    with torch.no_grad():
        mix.lora_A.copy_(lora.lora_A)
        mix.lora_B.copy_(lora.lora_B)
    x = torch.randn(c.N, c.T, c.d_in, dtype=F64)
    mask = random_mask(c.N, c.T, torch.Generator().manual_seed(c.seed)) if use_mask else None
    torch.testing.assert_close(mix(x, mask), lora(x), rtol=1e-12, atol=1e-12)
    assert torch.equal(mix.last_routing.index_a, torch.arange(c.r).expand(c.N, c.r))


@given(cases(E_equals_r=True), st.booleans(), st.sampled_from(list(SCORES)), st.floats(0.25, 4.0))
def test_E_equals_r_trains_as_lora(c: Case, use_mask: bool, scores: str, cfs_weight: float):
    """E = r is LoRA in training too (§3.4): the routing's gradient trains the routers and nothing else.

    Two adapted layers in a row, so that a gradient through the second layer's x̄ would reach the
    first layer's pools; the same pools, the same AdamW steps, the same pools after them.
    """
    torch.manual_seed(c.seed)
    hidden = c.d_in + 2
    base = nn.Sequential(nn.Linear(c.d_in, hidden, dtype=F64), nn.Tanh(), nn.Linear(hidden, c.d_out, dtype=F64))
    lora = add_lora(copy.deepcopy(base), ["0", "2"], c.r, alpha=3.0)
    mix = add_mixlora(copy.deepcopy(base), ["0", "2"], c.r, c.r, alpha=3.0, conditional=c.conditional,
                      cfs_weight=cfs_weight, scores=scores)
    with torch.no_grad():
        for i in (0, 2):
            nn.init.normal_(lora[i].lora_B)
            mix[i].lora_A.copy_(lora[i].lora_A)
            mix[i].lora_B.copy_(lora[i].lora_B)
    pools = {m: [p for n, p in m.named_parameters() if n.split(".")[-1] in ("lora_A", "lora_B")] for m in (lora, mix)}
    for m in (lora, mix):
        mark_only_adapters_trainable(m)  # MixLoRA's routers train too, and must change nothing
    opts = {m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05) for m in (lora, mix)}
    g = torch.Generator().manual_seed(c.seed)
    for _ in range(3):
        x = torch.randn(c.N, c.T, c.d_in, dtype=F64, generator=g)
        mask = random_mask(c.N, c.T, g) if use_mask else torch.ones(c.N, c.T, dtype=torch.bool)
        ys = {}
        for m in (lora, mix):
            with routing_mask(m, mask):
                ys[m] = m(x)
                loss_of_output(ys[m]).backward()
        torch.testing.assert_close(ys[mix], ys[lora], rtol=1e-12, atol=1e-12)
        for p, q in zip(pools[mix], pools[lora], strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
        for m in (lora, mix):
            opts[m].step()
            opts[m].zero_grad()
    for p, q in zip(pools[mix], pools[lora], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@given(cases())
def test_zero_b_pool_gives_the_base_layer_exactly(c: Case):
    layer, x, mask = build(c)
    nn.init.zeros_(layer.lora_B)
    assert torch.equal(layer(x, mask), layer.base(x))


@given(cases())
def test_batched_forward_equals_loop_and_explicit_delta_weight(c: Case):
    layer, x, mask = build(c)
    y = layer(x, mask)
    loop = torch.cat([layer(x[n:n + 1], mask[n:n + 1]) for n in range(c.N)])
    torch.testing.assert_close(y, loop, rtol=1e-12, atol=1e-12)
    delta = layer.delta_weight(x, mask)  # (N, d_out, d_in)
    assert delta.shape == (c.N, c.d_out, c.d_in)
    torch.testing.assert_close(y, layer.base(x) + torch.einsum("nti,noi->nto", x, delta), rtol=1e-12, atol=1e-12)


@given(cases())
def test_delta_weight_is_eq1_on_the_chosen_factors(c: Case):
    layer, x, mask = build(c)
    routing = layer.route(x, mask)
    delta = layer.delta_weight(x, mask)
    for n in range(c.N):  # ΔW_n = (α/r) B[:, S^B] A[S^A]: a LoRA of rank r per instance
        expected = layer.scaling * layer.lora_B[:, routing.index_b[n]] @ layer.lora_A[routing.index_a[n]]
        torch.testing.assert_close(delta[n], expected, rtol=1e-12, atol=1e-12)


@given(cases())
def test_routing_invariants(c: Case):
    layer, x, mask = build(c)
    routing = layer.route(x, mask)
    for index in (routing.index_a, routing.index_b):
        assert index.shape == (c.N, c.r) and index.dtype == torch.int64
        assert index.min() >= 0 and index.max() < c.E
        assert (index.diff(dim=-1) > 0).all()  # strictly ascending, hence distinct
    for gate in (routing.gate_a, routing.gate_b):
        assert gate.dtype == F64 and torch.equal(gate, torch.ones_like(gate))


@given(cases(), st.randoms(use_true_random=False))
def test_permuting_the_batch_permutes_routing_and_output(c: Case, rnd):
    layer, x, mask = build(c)
    perm = torch.tensor(rnd.sample(range(c.N), c.N))
    y, routing = layer(x, mask), layer.last_routing
    y_p = layer(x[perm], mask[perm])
    torch.testing.assert_close(y_p, y[perm], rtol=1e-12, atol=1e-12)
    assert torch.equal(layer.last_routing.index_a, routing.index_a[perm])
    assert torch.equal(layer.last_routing.index_b, routing.index_b[perm])


@given(cases())
def test_routing_ignores_other_instances_and_masked_out_positions(c: Case):
    layer, x, mask = build(c)
    routing = layer.route(x, mask)
    noise = torch.randn_like(x) * 10
    x2 = torch.where(mask[..., None], x, noise)  # change every position routing must not see
    x2[1:] = noise[1:]  # and every other instance entirely
    mask2 = mask.clone()
    mask2[1:] = random_mask(c.N - 1, c.T, torch.Generator().manual_seed(c.seed + 1))
    routing2 = layer.route(x2, mask2)
    assert torch.equal(routing2.index_a[0], routing.index_a[0])
    assert torch.equal(routing2.index_b[0], routing.index_b[0])


@given(cases())
def test_no_mask_routes_on_the_mean_of_all_positions(c: Case):
    layer, x, _ = build(c)
    everywhere = torch.ones(c.N, c.T, dtype=torch.bool)
    plain, masked = layer.route(x), layer.route(x, everywhere)
    assert torch.equal(plain.index_a, masked.index_a) and torch.equal(plain.index_b, masked.index_b)
    torch.testing.assert_close(plain.p_a, masked.p_a, rtol=1e-12, atol=1e-14)  # a mean and a masked mean: rounding apart
    torch.testing.assert_close(plain.p_b, masked.p_b, rtol=1e-12, atol=1e-14)


def test_two_dimensional_input_is_one_position_per_instance():
    layer, x, _ = build(Case(N=4, T=1, d_in=6, d_out=5, E=8, r=3, seed=0, conditional=True))
    y2 = layer(x[:, 0])
    assert y2.shape == (4, 5)
    torch.testing.assert_close(y2, layer(x)[:, 0], rtol=0, atol=0)


def test_routing_mask_context_routes_every_layer_and_is_reset():
    layer, x, mask = build(Case(N=5, T=7, d_in=6, d_out=6, E=10, r=3, seed=1, conditional=True))
    model = nn.Sequential(layer)
    with routing_mask(model, mask):
        y = model(x)
    torch.testing.assert_close(y, layer(x, mask), rtol=0, atol=0)
    assert layer.mask is None
    assert not torch.equal(layer(x), y)  # without the mask it routes on every position


def test_routing_mask_contexts_nest_and_restore_the_outer_one():
    c = Case(N=3, T=6, d_in=6, d_out=5, E=10, r=3, seed=2, conditional=True)
    layer, x, outer_mask = build(c)
    inner_x = torch.randn(3, 4, 6, dtype=F64)  # the inner context's prompt has another length
    inner_mask = random_mask(3, 4, torch.Generator().manual_seed(9))
    new_token = torch.randn(3, 1, 6, dtype=F64)
    with routing_mask(layer, outer_mask):  # a fresh context: the reference
        layer(x)
        fresh = layer(new_token)
    with routing_mask(layer, outer_mask):
        layer(x)  # the outer prompt, routed and held
        with routing_mask(layer, inner_mask):
            torch.testing.assert_close(layer(inner_x), layer.base(inner_x) + layer(inner_x, inner_mask) - layer.base(inner_x))
            inner_routing = layer.held
            assert not torch.equal(inner_routing.index_a, layer.route(x, outer_mask).index_a)  # it routed anew
        assert layer.mask is outer_mask
        assert torch.equal(layer(new_token), fresh)  # a decode step reuses the outer prompt's routing
        torch.testing.assert_close(layer(x), layer(x, outer_mask), rtol=0, atol=0)  # and the outer length routes on its mask
        with pytest.raises(RuntimeError, match="inside"), routing_mask(layer, inner_mask):
            layer(inner_x)
            raise RuntimeError("raised inside")
        assert layer.mask is outer_mask and torch.equal(layer(new_token), fresh)  # restored on error too
    assert layer.mask is None and layer.held is None


def test_a_context_starts_with_nothing_held_also_inside_another_one():
    # An inner context that inherited the outer one's held routing would let a decode step before
    # the inner prompt silently reuse the outer prompt's routing: it must be an error instead.
    layer, x, outer_mask = build(Case(N=3, T=6, d_in=6, d_out=5, E=10, r=3, seed=4, conditional=True))
    inner_mask = random_mask(3, 4, torch.Generator().manual_seed(3))
    new_token = torch.randn(3, 1, 6, dtype=F64)
    for contexts in (1, 2):  # a fresh context, and one inside a context that holds a routing
        with routing_mask(layer, outer_mask):
            layer(x)  # the outer prompt, routed and held
            assert layer.held is not None
            with routing_mask(layer, inner_mask) if contexts == 2 else routing_mask(layer, outer_mask):
                assert layer.held is None
                with pytest.raises(ValueError, match="no prompt has been routed inside this routing_mask"):
                    layer(new_token)
            assert layer.held is not None  # the outer one's comes back


def test_checkpointing_backward_in_an_outer_context_after_an_inner_one():
    # The Hugging Face Trainer's case: the forward in an inner context (compute_loss), backward
    # after it has exited, in an outer one (training_step). The recomputation must route on the
    # outer mask, as the forward did on the same mask, and give the same gradients.
    from torch.utils.checkpoint import checkpoint
    layer, x, mask = build(Case(N=4, T=5, d_in=6, d_out=6, E=8, r=2, seed=5, conditional=True))
    grads = []
    for checkpointed in (False, True):
        layer.zero_grad()
        with routing_mask(layer, mask):
            with routing_mask(layer, mask):
                y = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
            loss_of_output(y).backward()
        grads.append([p.grad.clone() for p in layer.parameters() if p.requires_grad])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=1e-12, atol=1e-12)


def loss_of_output(y: torch.Tensor) -> torch.Tensor:
    return (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum()


# ---- Conditional Factor Selection --------------------------------------------------------------

def test_cfs_makes_b_depend_on_the_a_pool_and_ifs_does_not():
    for conditional in (False, True):
        layer, x, mask = build(Case(N=64, T=4, d_in=8, d_out=8, E=16, r=4, seed=3, conditional=conditional))
        before = layer.route(x, mask)
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn_like(layer.lora_A))
        after = layer.route(x, mask)
        assert torch.equal(before.index_a, after.index_a)  # S^A depends on R^A and x̄ only
        assert torch.equal(before.index_b, after.index_b) == (not conditional)


def test_cfs_logits_are_the_dot_product_of_chosen_a_factors_with_w_cfs():
    layer, x, mask = build(Case(N=6, T=3, d_in=5, d_out=4, E=9, r=3, seed=4, conditional=True))
    with torch.no_grad():
        layer.router_B.zero_()  # p^B = 1/E + softmax(c): S^B is the top-r of c alone
    routing = layer.route(x, mask)
    for n in range(6):
        c = torch.stack([sum(layer.lora_A[routing.index_a[n, j]] @ layer.router_cfs[:, j, e] for j in range(3))
                         for e in range(9)])
        assert torch.equal(routing.index_b[n], c.topk(3).indices.sort().values)


# ---- gradients --------------------------------------------------------------------------------

def loss_of(layer: MixLoRALinear, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (layer(x, mask) * torch.linspace(-1, 1, layer.out_features, dtype=x.dtype)).sum()


@given(cases())
def test_routers_get_gradients_and_unchosen_pool_rows_get_zero(c: Case):
    layer, x, mask = build(c)
    loss_of(layer, x, mask).backward()
    used_a = torch.zeros(c.E, dtype=torch.bool)
    used_b = torch.zeros(c.E, dtype=torch.bool)
    used_a[layer.last_routing.index_a.flatten()] = True
    used_b[layer.last_routing.index_b.flatten()] = True
    assert torch.equal(layer.lora_A.grad[~used_a], torch.zeros_like(layer.lora_A.grad[~used_a]))
    assert torch.equal(layer.lora_B.grad[:, ~used_b], torch.zeros_like(layer.lora_B.grad[:, ~used_b]))
    routers = ["router_A", "router_B"] + (["router_cfs"] if c.conditional else [])
    for name in routers:
        assert getattr(layer, name).grad is not None
    if c.E > c.r:  # with E = r the softmax's gradient sums to zero over all rows: no signal to route on
        assert layer.router_A.grad.abs().sum() > 0 and layer.router_B.grad.abs().sum() > 0


def papers_p(layer: MixLoRALinear, x: torch.Tensor, mask: torch.Tensor, index_a: torch.Tensor):
    """p^A and p^B written out from docs/method.md (§3.2-3.3, and §3.9 for scores="sigmoid"), for a layer and its S^A.

    Routing reads x and the a-pool but trains only the routers (§3.4): both enter detached.
    """
    x, A = x.detach(), layer.lora_A.detach()
    m = mask.to(x.dtype)
    x_bar = (m[..., None] * x).sum(1) / m.sum(1, keepdim=True)  # the masked mean of x, not of dropout(x)
    if layer.scores == "softmax":
        def score(z):
            return torch.exp(z) / torch.exp(z).sum(-1, keepdim=True)
    else:  # each factor on its own
        def score(z):
            return 1 / (1 + torch.exp(-z))
    p_a = score(x_bar @ layer.router_A.T)  # IFS
    p_b = score(x_bar @ layer.router_B.T)
    if layer.conditional:  # c_e = Σ_j <a_{S^A_j}, W^CFS_{j,:,e}>, p^B += λ score(c)
        W = layer.router_cfs.permute(1, 0, 2)  # (r, d_in, E): W[j, :, e] = W^CFS_{j,:,e}
        c = torch.stack([sum(A[index_a[n, j]] @ W[j] for j in range(layer.rank))
                         for n in range(x.shape[0])])  # (N, E)
        p_b = p_b + layer.cfs_weight * score(c)
    return p_a, p_b


@given(cases(), st.floats(0.25, 4.0), st.sampled_from(list(SCORES)))
def test_routing_is_top_r_of_the_papers_p_and_gates_carry_its_gradient(c: Case, cfs_weight: float, scores: str):
    layer, x, mask = build(c, cfs_weight=cfs_weight, scores=scores)
    if c.conditional:  # W^CFS large enough that softmax(c) and c would rank factors differently
        with torch.no_grad():
            layer.router_cfs.mul_(8.0)
    x.requires_grad_(True)
    layer.train()  # and with dropout on the adapter's input, routing still sees x itself
    layer.dropout.p = 0.5
    routing = layer.route(x, mask)
    p_a, p_b = papers_p(layer, x, mask, routing.index_a)
    assert torch.equal(routing.index_a, p_a.topk(c.r).indices.sort().values)
    assert torch.equal(routing.index_b, p_b.topk(c.r).indices.sort().values)
    torch.testing.assert_close(routing.p_a, p_a, rtol=1e-12, atol=1e-14)  # the scores it reports
    torch.testing.assert_close(routing.p_b, p_b, rtol=1e-12, atol=1e-14)
    g = torch.Generator().manual_seed(c.seed)
    u, v = torch.randn(c.N, c.r, generator=g, dtype=F64), torch.randn(c.N, c.r, generator=g, dtype=F64)
    wrt = [x] + [p for n, p in layer.named_parameters() if n.startswith(("router", "lora_A"))]
    expected = torch.autograd.grad((p_a.gather(1, routing.index_a) * u).sum() + (p_b.gather(1, routing.index_b) * v).sum(),
                                   wrt, allow_unused=True, materialize_grads=True)
    got = torch.autograd.grad((routing.gate_a * u).sum() + (routing.gate_b * v).sum(), wrt,
                              allow_unused=True, materialize_grads=True)
    for e, g_ in zip(expected, got):
        torch.testing.assert_close(g_, e, rtol=1e-10, atol=1e-12)
    assert not got[0].any() and not got[1].any()  # nothing reaches x or the a-pool through the gates
    assert torch.equal(routing.gate_a, torch.ones_like(routing.gate_a))  # and exactly 1 in value
    assert torch.equal(routing.gate_b, torch.ones_like(routing.gate_b))


def test_dropout_is_on_the_adapters_input_only_and_routing_never_sees_it():
    layer, x, mask = build(Case(N=32, T=6, d_in=16, d_out=8, E=12, r=3, seed=7, conditional=True), dropout=0.5)
    layer.train()
    y = layer(x, mask)
    assert torch.equal(layer.last_routing.index_a, layer.route(x, mask).index_a)
    assert torch.equal(layer.last_routing.index_b, layer.route(x, mask).index_b)
    assert not torch.allclose(y, layer.eval()(x, mask))  # training mode drops inputs of ΔW x ...
    with torch.no_grad():
        layer.lora_B.zero_()
    torch.testing.assert_close(layer.train()(x, mask), layer.base(x), rtol=0, atol=0)  # ... never of W x


@given(cases())
def test_frozen_routers_get_no_gradient_and_route_the_same(c: Case):
    layer, x, mask = build(c, router_grad=False)
    names = dict(layer.named_parameters())
    assert set(names) == {"lora_A", "lora_B", "base.weight", "base.bias"}
    assert {"router_A", "router_B"} <= dict(layer.named_buffers()).keys()
    routing = layer.route(x, mask)
    assert routing.gate_a.grad_fn is None and routing.gate_b.grad_fn is None
    loss_of(layer, x, mask).backward()
    assert layer.lora_B.grad is not None


# ---- precision --------------------------------------------------------------------------------

def test_routing_runs_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    layer = MixLoRALinear(nn.Linear(32, 16), 16, 4)
    nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(8, 10, 32)
    mask = random_mask(8, 10, torch.Generator().manual_seed(0))
    y32, routing32 = layer(x, mask), layer.last_routing
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, routing16 = layer(x, mask), layer.last_routing
    assert routing16.gate_a.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(routing32, routing16))
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=2e-2, atol=2e-2)


def test_x_bar_is_pooled_in_float32_and_routing_is_the_same_under_bf16_autocast():
    """§3.5: x is cast before it is pooled, so bf16 activations route exactly as their float32 values do."""
    torch.manual_seed(0)
    layer = MixLoRALinear(nn.Linear(64, 16), 16, 4)
    x = torch.randn(32, 50, 64).to(torch.bfloat16)  # bf16 activations, as a bf16 model makes
    mask = random_mask(32, 50, torch.Generator().manual_seed(0))
    exact = layer.route(x.float(), mask)  # the float32 values of the same activations
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed = layer.route(x, mask)
    for got, want in zip(routed, exact):
        assert torch.equal(got, want)
    m = mask.float() / mask.sum(1, keepdim=True)
    x_bar_bf16 = torch.bmm(m[:, None].to(torch.bfloat16), x).squeeze(1).float()  # pooled in bf16, then cast
    x_bar_fp32 = torch.bmm(m[:, None], x.float()).squeeze(1)
    assert not torch.equal(x_bar_bf16, x_bar_fp32)  # so the order of cast and pooling is seen by the test


def test_a_bf16_model_without_autocast_runs_and_routes_in_float32():
    torch.manual_seed(0)
    layer = MixLoRALinear(nn.Linear(32, 16), 16, 4).to(torch.bfloat16)
    y = layer(torch.randn(3, 5, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and layer.last_routing.gate_a.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("make", [lambda base, **kw: LoRALinear(base, 4, **kw),
                                  lambda base, **kw: MixLoRALinear(base, 16, 4, **kw)], ids=["lora", "mixlora"])
def test_adapters_on_a_half_precision_base_are_float32_unless_upcast_is_off(make, dtype):
    """PEFT's autocast_adapter_dtype: float32 pools and routers train; x goes in as float32, y comes out as the base's."""
    torch.manual_seed(0)
    base = nn.Linear(32, 16, dtype=dtype)
    layer = make(base)
    nn.init.normal_(layer.lora_B, std=0.1)
    assert {t.dtype for n, t in layer.state_dict().items() if not n.startswith("base.")} == {torch.float32}
    x = torch.randn(3, 5, 32, dtype=dtype, requires_grad=True)
    y = layer(x)
    x32 = x.detach().float()
    delta = layer.scaling * (x32 @ layer.lora_A.T @ layer.lora_B.T if isinstance(layer, LoRALinear) else
                             torch.bmm(torch.bmm(x32, layer.factors(layer.last_routing)[0].transpose(1, 2)),
                                       layer.factors(layer.last_routing)[1]))
    assert y.dtype == dtype and torch.equal(y, base(x) + delta.to(dtype))
    y.float().square().sum().backward()
    assert x.grad.dtype == dtype and layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast still runs the adapter's matmuls in bf16
        assert layer(x).dtype == torch.bfloat16
    kept = make(nn.Linear(32, 16, dtype=dtype), upcast=False)
    assert {t.dtype for n, t in kept.state_dict().items()} == {dtype} and kept(x).dtype == dtype
    wide = make(nn.Linear(32, 16, dtype=F64))  # float32 "at least": a float64 base keeps float64 adapters
    assert {t.dtype for t in wide.state_dict().values()} == {F64}


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(num_factors=8, rank=0), "rank must be"),
    (dict(num_factors=3, rank=4), "num_factors"),
    (dict(num_factors=8, rank=2, dropout=1.0), "dropout"),
    (dict(num_factors=8, rank=2, dropout=-0.1), "dropout"),
    (dict(num_factors=8, rank=2, scores="softmax2"), r"scores must be one of 'softmax', 'sigmoid', got 'softmax2'"),
])
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MixLoRALinear(nn.Linear(4, 4), **kwargs)


def test_bad_inputs_raise_with_what_is_expected():
    layer, x, mask = build(Case(N=3, T=4, d_in=5, d_out=2, E=6, r=2, seed=0, conditional=True))
    with pytest.raises(ValueError, match=r"\(N, T, 5\)"):
        layer(torch.randn(3, 4, 6, dtype=F64))
    with pytest.raises(ValueError, match=r"\(N, T, 5\)"):
        layer(torch.randn(2, 3, 4, 5, dtype=F64))
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        layer(x, mask[:, :3])
    with pytest.raises(ValueError, match="bool"):
        layer(x, mask.long())
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"instance\(s\) \[1\]"):
        layer(x, empty)
    with pytest.raises(ValueError, match=r"instance\(s\) \[1\]"):  # routing_mask checks it, once for all layers
        routing_mask(layer, empty).__enter__()
    with pytest.raises(ValueError, match=r"\(\.\.\., 5\)"):
        LoRALinear(nn.Linear(5, 2), 2)(torch.randn(3, 4))


# ---- models: add, mark trainable, save, load -------------------------------------------------------

# ---- routing on the instruction's words (ours, §3.11) ---------------------------------------------

IMAGE = 1  # the image placeholder token of WordsModel's vocabulary


class WordsModel(nn.Module):
    """What the words router needs of a model: get_input_embeddings(), and linears that read its output."""

    def __init__(self, vocab: int = 12, d: int = 6):
        super().__init__()
        self.embed, self.up, self.down = nn.Embedding(vocab, d, dtype=F64), nn.Linear(d, 8, dtype=F64), nn.Linear(8, d, dtype=F64)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(self.embed(ids))))


def words_base() -> WordsModel:
    torch.manual_seed(10)
    return WordsModel()


def words_model(E: int, r: int, seed: int = 0) -> nn.Module:
    base = words_base()
    torch.manual_seed(seed)
    model = add_words(base, ["up", "down"], E, r, d_words=6, image_token_id=IMAGE, vocab_size=12, alpha=3.0)
    with torch.no_grad():
        for layer in (model.up, model.down):
            nn.init.normal_(layer.lora_B)
    return model


def words_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (5, 7) with an image token in every prompt, and the prompt mask (its first 4 or 5 positions)."""
    ids = torch.randint(2, 12, (5, 7), generator=g)
    ids[:, 1] = IMAGE
    mask = torch.arange(7) < torch.tensor([4, 5, 4, 5, 4])[:, None]
    return ids, mask


def test_words_routing_is_top_r_of_the_known_instruction_words_mean():
    """Written out: x̄ = the mean embedding of the prompt's words but the image token and the unknown ones
    (all of its words where none is known), S^A = top-r(σ or softmax of R^A x̄) ascending; the same in every layer."""
    model, g = words_model(E=6, r=2), torch.Generator().manual_seed(1)
    ids, mask = words_batch(g)
    known = torch.ones(12, dtype=torch.bool)
    known[[3, 4]] = False
    ids[0, :5] = torch.tensor([3, IMAGE, 4, 3, 4])  # an instruction of unknown words only: all of them count
    for layer in (model.up, model.down):
        layer.known.copy_(known)
        layer.router_A.normal_(generator=g)
    with routing_mask(model, mask), torch.no_grad():
        model(ids)
    E = model.embed.weight
    for n in range(5):
        words = [t for t in range(7) if mask[n, t] and ids[n, t] != IMAGE]
        kept = [t for t in words if known[ids[n, t]]] or words
        x_bar = E[ids[n, kept]].mean(0)
        for layer in (model.up, model.down):
            expected = (layer.router_A @ x_bar).topk(2).indices.sort().values
            assert torch.equal(layer.last_routing.index_a[n], expected)


def test_words_routing_at_E_equals_r_trains_as_lora():
    """E = r: every factor is chosen, so the words router is LoRA, in the output, the pools' gradients and after
    AdamW steps; and no gradient reaches the routers (buffers) or the embedding through the routing."""
    words, g = words_model(E=3, r=3), torch.Generator().manual_seed(2)
    lora = add_lora(words_base(), ["up", "down"], 3, alpha=3.0)
    lora.load_state_dict({k: v for k, v in words.state_dict().items() if "router" not in k and "known" not in k})
    mark_only_adapters_trainable(words)
    mark_only_adapters_trainable(lora)
    assert [n for n, p in words.named_parameters() if p.requires_grad] == [n for n, p in lora.named_parameters() if p.requires_grad]
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05) for m in (words, lora)]
    for _ in range(3):
        ids, mask = words_batch(g)
        with routing_mask(words, mask):
            y = words(ids)
            y.pow(2).sum().backward()
        z = lora(ids)
        z.pow(2).sum().backward()
        torch.testing.assert_close(y, z, rtol=1e-12, atol=1e-12)
        for (n, p), q in zip(((n, p) for n, p in words.named_parameters() if p.requires_grad),
                             (q for q in lora.parameters() if q.requires_grad), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
        assert words.up.last_routing.p_a.grad_fn is None and words.up.router_A.grad is None
        for opt in opts:
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(words.up.lora_A, lora.up.lora_A, rtol=1e-10, atol=1e-12)


def test_words_routing_trains_the_chosen_factors_only_and_its_gates_carry_no_gradient():
    """E > r: the pools' gradient is that of y = W x + (α/r) Σ_j b_{S^B_j} (a_{S^A_j} · x) with the routing's S
    held fixed (gates exactly 1, no gradient through them): unchosen rows get exactly zero."""
    model, g = words_model(E=6, r=2), torch.Generator().manual_seed(3)
    ids, mask = words_batch(g)
    mark_only_adapters_trainable(model)
    with routing_mask(model, mask):
        model(ids).pow(2).sum().backward()
    layer = model.up
    S_a, S_b = layer.last_routing.index_a, layer.last_routing.index_b  # (N, r)
    A, B = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    with routing_mask(model, mask):  # (down routes as before: on the same words)
        x = model.embed(ids).detach()  # (N, T, d): up's input
        y = layer.base(x) + layer.scaling * torch.einsum("ntd,njd,noj->nto", x, A[S_a], B.T[S_b].transpose(1, 2))
        model.down(torch.tanh(y)).pow(2).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, A.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, rtol=1e-10, atol=1e-12)
    unchosen = torch.ones(6, dtype=torch.bool)
    unchosen[S_a.flatten()] = False
    assert unchosen.any() and (layer.lora_A.grad[unchosen] == 0).all()
    assert not any(p.requires_grad for n, p in model.named_parameters() if "router" in n)


def test_words_adapters_save_and_load_with_their_known_words(tmp_path):
    model = words_model(E=6, r=2)
    for layer in (model.up, model.down):
        layer.known[5] = False
        layer.router_A.normal_()
    save_adapters(model, tmp_path)
    loaded = load_adapters(words_base(), tmp_path)
    assert isinstance(loaded.up, WordsLinear) and not loaded.up.known[5] and loaded.up.known[6]
    ids, mask = words_batch(torch.Generator().manual_seed(4))
    with routing_mask(model, mask), routing_mask(loaded, mask), torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_the_fitted_routers_rank_an_instance_s_nearest_clusters_first():
    # Two well-separated groups of updates, words that tell them apart: top-1 is the group's cluster.
    g = torch.Generator().manual_seed(5)
    group = torch.arange(60) % 2
    x_bar = torch.randn(2, 4, dtype=F64, generator=g)[group] + 0.1 * torch.randn(60, 4, dtype=F64, generator=g)
    U = 5.0 * torch.randn(2, 3, dtype=F64, generator=g)[group] + 0.1 * torch.randn(60, 3, dtype=F64, generator=g)
    R = fit_routers(x_bar, update_targets(x_bar, U @ U.T, 2, 10, torch.Generator().manual_seed(0)))  # (E, d)
    top = (x_bar @ R.T).argmax(1)
    assert torch.equal(top, group) or torch.equal(top, 1 - group)


class Block(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.q_proj, self.v_proj, self.norm = nn.Linear(d, d), nn.Linear(d, d), nn.LayerNorm(d)

    def forward(self, x):
        return self.v_proj(self.norm(x)) + self.q_proj(x)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block())


def test_add_mixlora_replaces_exactly_the_targets_and_stays_drop_in():
    model = tiny_model()
    q_weight = model[0].q_proj.weight
    add_mixlora(model, ["q_proj"], num_factors=6, rank=2)
    adapted = [n for n, m in model.named_modules() if isinstance(m, MixLoRALinear)]
    assert adapted == ["0.q_proj", "1.q_proj"]
    q = model[0].q_proj
    assert q.weight is q_weight and q.bias is q.base.bias and (q.in_features, q.out_features) == (8, 8)
    assert isinstance(model[0].v_proj, nn.Linear)
    add_lora(model, r"1\.v_proj", rank=2)  # a regex matches whole names
    assert isinstance(model[1].v_proj, LoRALinear) and isinstance(model[0].v_proj, nn.Linear)


def test_add_adapter_errors_name_the_target():
    with pytest.raises(ValueError, match="k_proj"):
        add_mixlora(tiny_model(), ["q_proj", "k_proj"], num_factors=4, rank=2)
    with pytest.raises(ValueError, match="LayerNorm, not an nn.Linear"):
        add_lora(tiny_model(), ["norm"], rank=2)
    model = add_lora(tiny_model(), ["q_proj"], rank=2)
    with pytest.raises(ValueError, match="already has an adapter"):
        add_mixlora(model, ["q_proj"], num_factors=4, rank=2)
    with pytest.raises(ValueError, match="already has an adapter"):
        add_lora(model, r".*q_proj\.base", rank=2)
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match="MultiheadAttention"):
        add_lora(mha, ["out_proj"], rank=2)
    model = tiny_model()
    with pytest.raises(ValueError, match="num_factors"):
        add_mixlora(model, ["q_proj"], num_factors=1, rank=2)
    assert not any(isinstance(m, MixLoRALinear) for m in model.modules())  # nothing half-done


def test_linears_that_their_parent_bypasses_are_refused():
    """nn.TransformerEncoderLayer's fused fast path (eval, no_grad) reads linear1/linear2.weight
    directly: an adapter put there by hand changes training but not inference. add_* refuse it."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        base_eval, base_train = encoder.eval()(x), encoder.train()(x)
        encoder.linear1 = LoRALinear(encoder.linear1, rank=2)  # by hand, past add_lora's check
        nn.init.normal_(encoder.linear1.lora_B)
        assert not torch.allclose(encoder.train()(x), base_train)  # training mode applies it ...
        torch.testing.assert_close(encoder.eval()(x), base_eval)  # ... the fast path ignores it
    for target in ("linear1", "linear2"):
        with pytest.raises(ValueError, match="TransformerEncoderLayer.*fast path"):
            add_lora(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), [target], rank=2)
        with pytest.raises(ValueError, match="TransformerEncoderLayer.*fast path"):
            add_mixlora(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), [target], num_factors=4, rank=2)


def test_mark_only_adapters_trainable():
    model = add_mixlora(tiny_model(), ["q_proj", "v_proj"], num_factors=6, rank=2)
    mark_only_adapters_trainable(model)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "router_A", "router_B", "router_cfs"}
    assert frozen == {"weight", "bias"}


@pytest.mark.parametrize("router_grad, scores", [(True, "softmax"), (False, "softmax"), (True, "sigmoid")])
def test_adapter_state_dict_round_trips(router_grad: bool, scores: str):
    def adapted():
        return add_mixlora(tiny_model(), ["q_proj", "v_proj"], num_factors=6, rank=2, router_grad=router_grad,
                           scores=scores)
    trained, fresh = adapted(), adapted()
    assert all(m.scores == scores for m in trained.modules() if isinstance(m, MixLoRALinear))
    with torch.no_grad():
        for _, t in adapter_state_dict(trained).items():
            t.normal_()
    state = adapter_state_dict(trained)
    assert not any(".base." in k for k in state) and any("router_A" in k for k in state)
    x = torch.randn(3, 4, 8)
    assert not torch.equal(fresh(x), trained(x))
    load_adapter_state_dict(fresh, state)
    assert torch.equal(fresh(x), trained(x))


def test_mismatched_adapter_checkpoints_say_what_differs():
    state = adapter_state_dict(add_mixlora(tiny_model(), ["q_proj"], num_factors=6, rank=2))
    with pytest.raises(ValueError, match=r"shape of 0\.q_proj\.lora_A: checkpoint \(6, 8\), model \(8, 8\)"):
        load_adapter_state_dict(add_mixlora(tiny_model(), ["q_proj"], num_factors=8, rank=2), state)
    with pytest.raises(ValueError, match=r"unexpected: 0\.q_proj\.router_cfs"):
        load_adapter_state_dict(add_mixlora(tiny_model(), ["q_proj"], 6, 2, conditional=False), state)
    with pytest.raises(ValueError, match=r"missing: 0\.v_proj\.lora_A"):
        load_adapter_state_dict(add_mixlora(tiny_model(), ["q_proj", "v_proj"], 6, 2), state)


def mixed_adapters(**mixlora) -> nn.Module:
    """LoRA on the first block's q_proj, MixLoRA on every v_proj, random b-pools: two groups to save."""
    model = add_lora(tiny_model(), ["0.q_proj"], rank=2, alpha=3.0, dropout=0.1)
    add_mixlora(model, ["v_proj"], num_factors=6, rank=2, **mixlora)
    with torch.no_grad():
        for name, t in adapter_state_dict(model).items():
            t.normal_()
    return model


def without_safetensors(monkeypatch):
    for name in ("safetensors", "safetensors.torch"):
        monkeypatch.setitem(sys.modules, name, None)  # import safetensors.torch now raises ImportError


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "torch.save"])
@pytest.mark.parametrize("mixlora", [dict(), dict(scores="sigmoid", conditional=False, router_grad=False),
                                     dict(cfs_weight=0.5, alpha=4.0, upcast=False)], ids=["defaults", "ifs-frozen-sigmoid", "cfs0.5"])
def test_saved_adapters_load_onto_a_fresh_base_with_their_config(tmp_path, monkeypatch, mixlora, safetensors):
    if safetensors:
        pytest.importorskip("safetensors")
    else:
        without_safetensors(monkeypatch)
    trained = mixed_adapters(**mixlora)
    save_adapters(trained, tmp_path / "adapters")
    files = {p.name for p in (tmp_path / "adapters").iterdir()}
    assert files == {"adapter_config.json", "adapter_model." + ("safetensors" if safetensors else "pt")}
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert "peft_type" not in config and config["format_version"] == 1
    lora, mix = config["adapters"]
    assert lora == dict(method="lora", rank=2, alpha=3.0, dropout=0.1, upcast=True, modules=["0.q_proj"])
    assert mix == dict(method="mixlora", num_factors=6, rank=2, alpha=mixlora.get("alpha", 2), dropout=0.0,
                       conditional=mixlora.get("conditional", True), cfs_weight=mixlora.get("cfs_weight", 1.0),
                       router_grad=mixlora.get("router_grad", True), scores=mixlora.get("scores", "softmax"),
                       upcast=mixlora.get("upcast", True), modules=["0.v_proj", "1.v_proj"])
    fresh = tiny_model()
    assert load_adapters(fresh, tmp_path / "adapters") is fresh
    assert [(n, type(m)) for n, m in fresh.named_modules()] == [(n, type(m)) for n, m in trained.named_modules()]
    assert str(fresh) == str(trained)
    expected = adapter_state_dict(trained)
    assert all(torch.equal(t, expected[k]) for k, t in adapter_state_dict(fresh).items())
    assert all(isinstance(t, nn.Parameter) == mixlora.get("router_grad", True)
               for k, t in fresh[0].v_proj.named_parameters(recurse=False) if "router" in k)
    x = torch.randn(3, 4, 8)
    assert torch.equal(fresh.eval()(x), trained.eval()(x))
    save_adapters(fresh, tmp_path / "adapters")  # again, into the same directory: the save it replaces is gone
    assert {p.name for p in (tmp_path / "adapters").iterdir()} == files


def test_save_adapters_writes_the_tensors_it_is_given_for_a_sharded_model(tmp_path):
    """A sharded model (FSDP, ZeRO-3) holds pieces of its adapters: the caller gathers them and passes them in."""
    full = mixed_adapters()
    sharded = copy.deepcopy(full)
    with torch.no_grad():
        for t in adapter_state_dict(sharded).values():
            t.zero_()  # what this process holds is not what was trained
    save_adapters(sharded, tmp_path / "adapters", tensors=adapter_state_dict(full))
    fresh = load_adapters(tiny_model(), tmp_path / "adapters")
    expected = adapter_state_dict(full)
    assert all(torch.equal(t, expected[k]) for k, t in adapter_state_dict(fresh).items())
    missing = dict(list(expected.items())[1:])
    with pytest.raises(ValueError, match=r"tensors must have adapter_state_dict\(model\)'s 12 keys; got 11 keys, 1 of"):
        save_adapters(sharded, tmp_path / "other", tensors=missing)
    assert not (tmp_path / "other").exists()


def test_loading_adapters_refuses_what_does_not_fit_in_one_line(tmp_path, monkeypatch):
    directory = tmp_path / "adapters"
    save_adapters(mixed_adapters(), directory)
    config = json.loads((directory / "adapter_config.json").read_text())

    def refused(model, match, **changes):
        (directory / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        with pytest.raises(ValueError, match=match) as error:
            load_adapters(model, directory)
        assert "\n" not in str(error.value)
        assert not any(isinstance(m, (LoRALinear, MixLoRALinear)) for m in model.modules())  # checked, then changed

    refused(nn.Sequential(Block(), Block(d=6)), r"1\.v_proj maps 6 -> 6 features in this Sequential but 8 -> 8 in the adapters")
    refused(nn.Sequential(Block()), r"sit on '1\.v_proj', which this Sequential does not have")
    refused(tiny_model(), r"format version 2; this mixlora.py reads up to 1: update", format_version=2)
    unknown = [dict(config["adapters"][0], method="dora"), config["adapters"][1]]
    refused(tiny_model(), r"unknown method 'dora'; this mixlora.py knows 'lora', 'mixlora'", adapters=unknown)
    peft = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(peft))
    with pytest.raises(ValueError, match=r"not a MixLoRA adapter config \(peft_type LORA: a PEFT adapter"):
        load_adapters(tiny_model(), directory)
    with pytest.raises(ValueError, match=r"already has an adapter"):
        save_adapters(mixed_adapters(), directory)
        load_adapters(mixed_adapters(), directory)
    with pytest.raises(ValueError, match=r"adapter_config.json not found: save_adapters writes it"):
        load_adapters(tiny_model(), tmp_path)
    with pytest.raises(ValueError, match=r"has no adapters to save"):
        save_adapters(tiny_model(), tmp_path / "none")
    if importlib.util.find_spec("safetensors"):
        save_adapters(mixed_adapters(), directory)
        without_safetensors(monkeypatch)
        with pytest.raises(ValueError, match=r"adapter_model.safetensors needs the safetensors package"):
            load_adapters(tiny_model(), directory)


# ---- CUDA (skipped without a GPU) -------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_matches_cpu_in_fp32_and_bf16():
    torch.manual_seed(0)
    layer = MixLoRALinear(nn.Linear(64, 48), 16, 4)
    nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(6, 12, 64)
    mask = random_mask(6, 12, torch.Generator().manual_seed(0))
    y_cpu, routing_cpu = layer(x, mask), layer.last_routing
    layer.cuda()
    y_gpu = layer(x.cuda(), mask.cuda())
    assert torch.equal(layer.last_routing.index_a.cpu(), routing_cpu.index_a)
    assert torch.equal(layer.last_routing.index_b.cpu(), routing_cpu.index_b)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_bf16 = layer(x.cuda(), mask.cuda())
    assert y_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(y_bf16.float().cpu(), y_cpu, rtol=3e-2, atol=3e-2)


@cuda
def test_no_host_sync_in_forward_and_backward():
    torch.manual_seed(0)
    layer = MixLoRALinear(nn.Linear(64, 64), 16, 4, dropout=0.1).cuda()
    x = torch.randn(4, 9, 64, device="cuda")
    mask = random_mask(4, 9, torch.Generator().manual_seed(0)).cuda()
    layer(x, mask).sum().backward()  # warm-up: lazy init may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x, mask)
        y.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layer.router_A.grad is not None


@pytest.mark.parametrize("conditional, router_grad", [(True, True), (False, True), (True, False)])
def test_torch_compile_traces_the_layer_without_graph_breaks(conditional: bool, router_grad: bool):
    import torch._dynamo
    torch._dynamo.reset()
    case = Case(N=4, T=5, d_in=16, d_out=8, E=8, r=2, seed=0, conditional=conditional)
    layer, x, mask = build(case, router_grad=router_grad)
    layer.dropout.p = 0.1
    for args in [(x, mask), (x,)]:
        explanation = torch._dynamo.explain(layer)(*args)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@cuda
def test_compiled_layer_matches_eager_on_cuda():
    torch.manual_seed(0)
    layer = MixLoRALinear(nn.Linear(64, 64), 16, 4).cuda()
    nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(4, 9, 64, device="cuda")
    mask = random_mask(4, 9, torch.Generator().manual_seed(0)).cuda()
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x, mask), layer(x, mask), rtol=1e-4, atol=1e-4)
