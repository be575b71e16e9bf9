"""Our LoRA is PEFT's LoRA, and MixLoRA with E = r is too: outputs, gradients and training steps.

PEFT's `LoraConfig` model and ours are built on one tiny random Hugging Face Llama (float64, from
its config: nothing is downloaded), with adapters on every linear of the LM, and the same factors
copied in (ours: lora_A (r, d_in), lora_B (d_out, r); PEFT: lora_A.default.weight,
lora_B.default.weight, the same shapes). Both scale by α/r (PEFT: lora_alpha / r). `peft` and
`transformers` are test-only dependencies (hf/requirements.txt): without them this module skips.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from mixlora import add_lora, add_mixlora, mark_only_adapters_trainable, routing_mask  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 6.0  # α/r = 1.5: neither mixlora's default (α = r) nor train_toy's (α = 2r)
N, T, PROMPT = 3, 9, (4, 6, 7)  # instances, positions, each instance's prompt length


def tiny_llama() -> "transformers.LlamaForCausalLM":
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).double()


def peft_lora(base) -> "peft.PeftModel":
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, bias="none")
    return peft.get_peft_model(copy.deepcopy(base), config)


def pairs(ours, theirs) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(our adapter, PEFT's LoRA layer) for every adapted linear, matched by name."""
    peft_layers = {name.removeprefix("base_model.model."): m for name, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    ours = {name: m for name, m in ours.named_modules() if hasattr(m, "lora_A")}
    assert len(ours) == len(peft_layers) == 7 * 2 and ours.keys() == peft_layers.keys()
    return [(ours[name], peft_layers[name]) for name in ours]


def factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's (A, B): ours are lora_A, lora_B; PEFT's are its default adapter's weights."""
    if isinstance(layer, peft.tuners.lora.LoraLayer):
        return layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return layer.lora_A, layer.lora_B


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens (N, T), labels on the answer (after the prompt) and the prompt mask (N, T) that routes."""
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, 64, (N, T), generator=g)
    prompt = torch.arange(T) < torch.tensor(PROMPT)[:, None]  # (N, T)
    return tokens, tokens.masked_fill(prompt, -100), prompt


METHODS = {
    "LoRA": lambda base: add_lora(base, TARGETS, RANK, alpha=ALPHA),
    **{f"MixLoRA E=r, {scores}, {'CFS' if conditional else 'IFS only'}":
       (lambda base, scores=scores, conditional=conditional: add_mixlora(
           base, TARGETS, RANK, RANK, alpha=ALPHA, scores=scores, conditional=conditional))
       for scores in ("softmax", "sigmoid") for conditional in (True, False)},
}


@pytest.mark.parametrize("method", list(METHODS))
def test_outputs_gradients_and_adamw_steps_equal_peft_lora(method: str):
    base = tiny_llama()
    theirs = peft_lora(base)
    ours = mark_only_adapters_trainable(METHODS[method](copy.deepcopy(base)))  # MixLoRA's routers train too
    layers = pairs(ours, theirs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mine, peft_layer in layers:
            A, B = factors(peft_layer)
            mine.lora_B.normal_(generator=g)  # non-zero B, so that A gets a gradient and ΔW counts
            A.copy_(mine.lora_A)
            B.copy_(mine.lora_B)
    start = [p.clone() for mine, _ in layers for p in factors(mine)]
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.01) for m in (ours, theirs)]
    for step in range(3):
        tokens, labels, prompt = batch(step)
        with routing_mask(ours, prompt):  # MixLoRA routes on the prompt; for LoRA a no-op
            out = ours(input_ids=tokens, labels=labels)
            out.loss.backward()
        ref = theirs(input_ids=tokens, labels=labels)
        ref.loss.backward()
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-12, atol=1e-12)
        for mine, peft_layer in layers:
            for p, q in zip(factors(mine), factors(peft_layer)):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    trained = [p for mine, _ in layers for p in factors(mine)]
    assert all(not torch.equal(p, p0) for p, p0 in zip(trained, start))  # every factor moved
    for mine, peft_layer in layers:
        for p, q in zip(factors(mine), factors(peft_layer)):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
