"""LoRA and MixLoRA on a bf16 or quantized (QLoRA-style) base: a tiny random Llama saved to disk and loaded back
as a user loads a checkpoint, in float32, bfloat16, torchao int8 weight-only, bitsandbytes nf4 (4-bit) and
bitsandbytes int8. Every row must wrap, train float32 adapters (the base frozen), generate with the prompt's
routing, and save and load onto a fresh base with the same answers. Nothing is downloaded; a row skips where its
package (transformers, torchao, bitsandbytes) is missing.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf import qlora_bench  # noqa: E402
from mixlora import (LoRALinear, MixLoRALinear, add_lora, add_mixlora, load_adapters,  # noqa: E402
                     mark_only_adapters_trainable, routing_mask, save_adapters)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAD, EOS = 0, 2
BASES = qlora_bench.BASES  # float32, bfloat16, torchao-int8, bnb-nf4, bnb-int8


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
                                      pad_token_id=PAD, eos_token_id=EOS)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_base(path, base: str):
    """The checkpoint at path, loaded as base says, the way a user would load a 7B one; skips without its package."""
    for prefix, package in (("torchao-", "torchao"), ("bnb-", "bitsandbytes")):
        if base.startswith(prefix):
            pytest.importorskip(package)
    return qlora_bench.load_base(path, base).eval()


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids (prompt of 6 + answer of 3), labels (-100 on the prompt), and the prompt mask."""
    ids = torch.randint(3, 60, (3, 9), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :6] = -100
    return ids, labels, labels == -100


def answers(model, prompt: torch.Tensor) -> torch.Tensor:
    with routing_mask(model, torch.ones_like(prompt, dtype=torch.bool)), torch.no_grad():
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                              do_sample=False, pad_token_id=PAD, suppress_tokens=[EOS])


def add(model, method: str, **kwargs):
    if method == "lora":
        add_lora(model.model, TARGETS, rank=2, **kwargs)
    else:
        add_mixlora(model.model, TARGETS, num_factors=8, rank=2, **kwargs)
    return model


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")  # bitsandbytes int8 says that it casts float32 inputs to fp16
@pytest.mark.parametrize("method", ["mixlora", "lora"])
@pytest.mark.parametrize("base", BASES)
def test_adapters_train_generate_save_and_load_on_every_base(llama_dir, tmp_path, base, method):
    model = load_base(llama_dir, base)
    ids, labels, prompt_mask = batch()
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
    add(model, method)
    mark_only_adapters_trainable(model)
    layers = [m for m in model.modules() if isinstance(m, (LoRALinear, MixLoRALinear))]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(layers) == 2 * 7 and {p.dtype for p in trainable} == {torch.float32}  # whatever the base stores
    assert {id(p) for p in trainable} == {id(p) for m in layers for n, p in m.named_parameters() if "base." not in n}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for step in range(3):
        with routing_mask(model, prompt_mask):
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
        if step > 0:  # every pool and router gets a gradient (lora_A's is zero at step 0, with B = 0)
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]
    prompt = ids[:, :6]
    trained = answers(model, prompt)
    if method == "mixlora":  # the decode steps reused the prompt's routing
        assert all(m.routed_on_prompt and m.last_routing.index_a.shape == (3, 2) for m in layers)
    save_adapters(model, tmp_path / "adapters")
    fresh = load_adapters(load_base(llama_dir, base), tmp_path / "adapters")
    assert torch.equal(answers(fresh, prompt), trained)
    with torch.no_grad():  # the base did not train: without the b-pools, the model is the base, to the bit
        for layer in layers:
            layer.lora_B.zero_()
        assert torch.equal(model(input_ids=ids).logits, base_logits)


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@pytest.mark.parametrize("base, dtype", [("bfloat16", torch.bfloat16), ("bnb-nf4", torch.bfloat16),
                                         ("bnb-int8", torch.float32), ("torchao-int8", torch.float32)])
def test_upcast_off_keeps_the_adapters_in_the_base_compute_dtype(llama_dir, base, dtype):
    """upcast=False, for memory: the pools take the dtype the base computes in (bitsandbytes' compute_dtype for nf4;
    for int8, with no bias to tell, float32), never the uint8 or int8 storage; and the model still trains."""
    model = add(load_base(llama_dir, base), "mixlora", upcast=False)
    mark_only_adapters_trainable(model)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {dtype}
    ids, labels, prompt_mask = batch()
    with routing_mask(model, prompt_mask):
        model(input_ids=ids, labels=labels).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_bench_measures_float32_adapters_that_cost_the_same_on_a_4_bit_base(llama_dir):
    """hf/qlora_bench.py's measurement, in this process on the tiny Llama: nf4 stores the LM's linears in half a byte
    a weight and a float32 absmax per 64 (lm_head, embeddings and norms stay float32); the adapters cost the same."""
    pytest.importorskip("bitsandbytes")
    fp32, nf4 = (qlora_bench.measure(str(llama_dir), base, steps=1, batch_size=2, length=8) for base in ("float32", "bnb-nf4"))
    assert fp32["adapter_dtypes"] == nf4["adapter_dtypes"] == ["torch.float32"]
    assert fp32["adapter_bytes"] == nf4["adapter_bytes"] > 0
    model = qlora_bench.load_base(str(llama_dir), "float32")
    quantized = sum(m.weight.numel() for m in model.model.modules() if isinstance(m, torch.nn.Linear))  # not lm_head
    assert nf4["base_bytes"] == fp32["base_bytes"] - 4 * quantized + quantized // 2 + 4 * (quantized // 64)
    assert fp32["step_s"] > 0 and nf4["peak_rss_mib"] >= nf4["rss_before_mib"] > 0
