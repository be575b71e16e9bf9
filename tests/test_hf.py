"""MixLoRA inside a model nobody here wrote: a tiny random Hugging Face LLaVA, built from its config.

Nothing is downloaded: a Llama text config and a CLIP vision config of width 32 make a
LlavaForConditionalGeneration of a few hundred thousand parameters, in float64 so that near-ties
in routing cannot flip between two ways of computing the same thing. MixLoRA goes on the LM's
seven projections only, as in the paper. `transformers` is a test-only dependency: without it
this module skips.
"""

import re
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mixlora import (LoRALinear, MixLoRALinear, adapter_state_dict, add_lora, add_mixlora, load_adapters,  # noqa: E402
                     routing_mask, save_adapters)

IMAGE_TOKEN, PAD, EOS, IMAGE_TOKENS = 63, 0, 2, 4  # a 16 x 16 image in 8 x 8 patches: 4 image tokens
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llava(seed: int = 0) -> "transformers.LlavaForConditionalGeneration":
    torch.manual_seed(seed)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=4, image_size=16, patch_size=8),
        text_config=transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                             max_position_embeddings=64),
        image_token_id=IMAGE_TOKEN, image_seq_length=IMAGE_TOKENS, vision_feature_layer=-1,
        vision_feature_select_strategy="default", pad_token_id=PAD)
    return transformers.LlavaForConditionalGeneration(config).double().eval()


def with_mixlora(model, seed: int = 0, **kwargs):
    """MixLoRA E=8 r=2 on the LM, with random b-pools so that the adapters change the outputs."""
    add_mixlora(model.model.language_model, TARGETS, num_factors=8, rank=2, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mixlora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=layer.lora_B.dtype) * 0.5)
    return model


def mixlora_layers(model) -> list[MixLoRALinear]:
    return [m for m in model.modules() if isinstance(m, MixLoRALinear)]


def prompts(N: int = 3, text: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Image placeholders, then `text` instruction tokens; all rows the same length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((N, IMAGE_TOKENS), IMAGE_TOKEN), torch.randint(3, 60, (N, text), generator=g)], 1)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values=torch.rand(N, 3, 16, 16, generator=g, dtype=torch.float64))


def training_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Prompt, answer and right padding; labels are -100 except on the answer tokens."""
    batch = prompts(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    answers = torch.randint(3, 60, (3, 4), generator=g)
    batch["input_ids"] = torch.cat([batch["input_ids"], answers], 1)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][2, -2:] = 0  # row 2 has a 2-token answer, then padding
    batch["input_ids"][2, -2:] = PAD
    batch["labels"] = torch.full_like(batch["input_ids"], -100)
    batch["labels"][:, -4:] = answers
    batch["labels"][2, -2:] = -100
    return batch


def greedy(model, batch: dict, use_cache: bool, max_new_tokens: int = 6, **kwargs) -> torch.Tensor:
    # No image placeholder (LLaVA would expect another image for it when it re-reads the sequence,
    # use_cache=False) and no EOS (every row then answers max_new_tokens tokens).
    return model.generate(**batch, use_cache=use_cache, max_new_tokens=max_new_tokens, do_sample=False,
                          suppress_tokens=[IMAGE_TOKEN, EOS], **kwargs)


def record_routing(model) -> list[list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """Per layer, (positions, S^A, S^B) of every forward from now on."""
    seen = []
    for layer in mixlora_layers(model):
        calls = []
        layer.register_forward_hook(lambda m, args, out, calls=calls: calls.append(
            (args[0].shape[1], m.last_routing.index_a, m.last_routing.index_b)))
        seen.append(calls)
    return seen


# ---- the README's example, run as written ------------------------------------------------------

def readme_example() -> str:
    """The hand-written Python block under "## Use it on your model" in README.md."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("## Use it on your model", 1)[1]
    return next(b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "opt.step()" in b)


def test_the_readme_example_trains_and_generates_a_hugging_face_llava(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, batch, prompt = tiny_llava(), training_batch(), prompts(seed=5)
    prompt["attention_mask"][0, :2] = 0  # a left-padded row, as a processor makes them
    prompt["input_ids"][0, :2] = PAD
    prompt["input_ids"][0, 2:2 + IMAGE_TOKENS] = IMAGE_TOKEN
    prompt["input_ids"][0, 2 + IMAGE_TOKENS:] = prompts(seed=5)["input_ids"][0, IMAGE_TOKENS:-2]
    scope = dict(model=model, input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                 attention_mask=batch["attention_mask"], labels=batch["labels"],
                 prompt_ids=prompt["input_ids"], prompt_pixel_values=prompt["pixel_values"],
                 prompt_attention_mask=prompt["attention_mask"])
    frozen = [(p, p.detach().clone()) for p in model.parameters()]  # the base model, before adapters
    exec(readme_example(), scope)
    layers = mixlora_layers(model)
    assert len(layers) == 2 * 7 and not any("vision" in n for n, m in model.named_modules() if isinstance(m, MixLoRALinear))
    assert all(torch.equal(p, before) for p, before in frozen)  # the base model did not train
    for layer in layers:  # R^A, R^B and W^CFS moved from their init; lora_B from zero
        assert all(p.grad is None and p.abs().sum() > 0 for p in (layer.router_cfs, layer.lora_B))
    trained = dict(model.named_parameters())
    answers = scope["answers"]
    assert answers.shape == (3, prompt["input_ids"].shape[1] + 8)
    with routing_mask(model, prompt["attention_mask"].bool()):
        uncached = model.generate(input_ids=prompt["input_ids"], pixel_values=prompt["pixel_values"],
                                  attention_mask=prompt["attention_mask"], max_new_tokens=8, do_sample=False,
                                  use_cache=False)
    assert torch.equal(answers, uncached)
    fresh = load_adapters(tiny_llava(), tmp_path / "adapters")  # what a forker does with the directory
    assert {n for n, _ in fresh.named_parameters()} == set(trained)
    with routing_mask(fresh, prompt["attention_mask"].bool()):
        assert torch.equal(fresh.generate(input_ids=prompt["input_ids"], pixel_values=prompt["pixel_values"],
                                          attention_mask=prompt["attention_mask"], max_new_tokens=8, do_sample=False),
                           answers)


# ---- training -------------------------------------------------------------------------------------

def test_a_training_step_routes_on_the_prompt_and_trains_the_routers():
    model = with_mixlora(tiny_llava())
    batch = training_batch()
    prompt_mask = (batch["labels"] == -100) & batch["attention_mask"].bool()
    with routing_mask(model, prompt_mask):
        model(**batch).loss.backward()
    chosen = [(m.last_routing.index_a, m.last_routing.index_b) for m in mixlora_layers(model)]
    for layer in mixlora_layers(model):
        for p in (layer.router_A, layer.router_B, layer.router_cfs, layer.lora_A, layer.lora_B):
            assert p.grad is not None and p.grad.abs().sum() > 0
    # Other answers, the same prompts: every layer routes exactly as before.
    other = dict(batch, input_ids=batch["input_ids"].clone())
    answer = batch["labels"] != -100
    other["input_ids"][answer] = (other["input_ids"][answer] + 7) % 60 + 3
    with routing_mask(model, prompt_mask), torch.no_grad():
        model(**other)
    for (a, b), layer in zip(chosen, mixlora_layers(model)):
        assert torch.equal(layer.last_routing.index_a, a) and torch.equal(layer.last_routing.index_b, b)


def gradients(model, batch: dict) -> dict[str, torch.Tensor]:
    model.zero_grad()
    prompt_mask = (batch["labels"] == -100) & batch["attention_mask"].bool()
    with routing_mask(model, prompt_mask):
        model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = training_batch()
    plain = with_mixlora(tiny_llava()).train()
    checkpointed = with_mixlora(tiny_llava()).train()
    enable = getattr(checkpointed, "activation_checkpointing_enable", None)  # transformers >= 5 renamed it
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = record_routing(checkpointed)
    expected, got = gradients(plain, batch), gradients(checkpointed, batch)
    # The forward, and its recomputation in backward (which stops early, once it has what backward
    # needs: down_proj's output is not needed, so only 12 of the 14 layers run twice).
    assert [len(c) for c in calls] == [2] * 6 + [1] + [2] * 6 + [1]
    assert expected.keys() == got.keys() and any("router_cfs" in n for n in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-12, msg=name)
    # backward outside the context would recompute without the prompt mask: refused, not wrong.
    prompt_mask = (batch["labels"] == -100) & batch["attention_mask"].bool()
    with routing_mask(checkpointed, prompt_mask):
        loss = checkpointed(**batch).loss
    with pytest.raises(ValueError, match="inside the `with routing_mask"):
        loss.backward()


# ---- generation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "torch.save"])
@pytest.mark.parametrize("adapters", [dict(method="lora"), dict(), dict(scores="sigmoid"), dict(conditional=False),
                                      dict(router_grad=False)], ids=["lora", "mixlora", "sigmoid", "ifs", "frozen"])
def test_saved_adapters_answer_as_the_trained_model_on_a_fresh_base(tmp_path, monkeypatch, adapters, safetensors):
    if safetensors:
        pytest.importorskip("safetensors")
    else:
        for name in ("safetensors", "safetensors.torch"):
            monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    model = tiny_llava()
    if adapters.pop("method", "mixlora") == "lora":
        add_lora(model.model.language_model, TARGETS, rank=2)
    else:
        add_mixlora(model.model.language_model, TARGETS, num_factors=8, rank=2, **adapters)
    with torch.no_grad():  # "trained": every adapter tensor moved from the init a fresh base would draw
        for t in adapter_state_dict(model).values():
            t.normal_(0, 0.5)
    batch = prompts()
    with routing_mask(model, batch["attention_mask"].bool()):
        trained = greedy(model, batch, use_cache=True)
    save_adapters(model, tmp_path)
    assert (tmp_path / ("adapter_model.safetensors" if safetensors else "adapter_model.pt")).is_file()
    fresh = load_adapters(tiny_llava(), tmp_path)
    assert [type(m) for m in fresh.modules()] == [type(m) for m in model.modules()]
    assert sum(isinstance(m, (LoRALinear, MixLoRALinear)) for m in fresh.modules()) == 2 * 7
    with routing_mask(fresh, batch["attention_mask"].bool()):
        assert torch.equal(greedy(fresh, batch, use_cache=True), trained)


def test_cached_generation_equals_uncached_and_teacher_forcing():
    model, batch = with_mixlora(tiny_llava()), prompts()
    prompt_mask = batch["attention_mask"].bool()
    with routing_mask(model, prompt_mask):
        cached = greedy(model, batch, use_cache=True)
    with routing_mask(model, prompt_mask):
        uncached = greedy(model, batch, use_cache=False)
    assert torch.equal(cached, uncached)
    prefill = [(m.last_routing.index_a, m.last_routing.index_b) for m in mixlora_layers(model)]
    # Teacher-force the generated sequence, routing on its prompt: the same argmax everywhere.
    T = batch["input_ids"].shape[1]
    full_mask = torch.cat([prompt_mask, torch.zeros(3, cached.shape[1] - T, dtype=torch.bool)], 1)
    with routing_mask(model, full_mask), torch.no_grad():
        logits = model(input_ids=cached, pixel_values=batch["pixel_values"], attention_mask=torch.ones_like(cached)).logits
    logits[..., [IMAGE_TOKEN, EOS]] = -torch.inf
    assert torch.equal(logits[:, T - 1:-1].argmax(-1), cached[:, T:])
    for (a, b), layer in zip(prefill, mixlora_layers(model)):
        assert torch.equal(layer.last_routing.index_a, a) and torch.equal(layer.last_routing.index_b, b)


def test_generation_after_an_inner_context_equals_generation_in_a_fresh_one():
    # A nested context (a user's own routing_mask around a forward, a Trainer wrapping two
    # methods) must give back the outer mask: otherwise the outer prompt's forward would route on
    # every position and each decode step on its one new token, silently.
    model, batch, other = with_mixlora(tiny_llava()), prompts(seed=0), prompts(seed=1, text=7)
    with routing_mask(model, batch["attention_mask"].bool()):
        fresh = greedy(model, batch, use_cache=True)
    with routing_mask(model, batch["attention_mask"].bool()):
        with routing_mask(model, other["attention_mask"].bool()), torch.no_grad():
            model(**other)  # routes on its own prompt, of another length
        nested = greedy(model, batch, use_cache=True)
        held = [m.held.index_a for m in mixlora_layers(model)]
    with routing_mask(model, batch["attention_mask"].bool()), torch.no_grad():
        model(**batch)
        assert all(torch.equal(m.held.index_a, a) for m, a in zip(mixlora_layers(model), held))
    assert torch.equal(nested, fresh)
    outside = greedy(model, batch, use_cache=True)  # no context: every step re-routes on its own token
    assert not torch.equal(outside, fresh)  # which is why it matters


def test_decode_steps_hold_the_prompts_routing_and_would_not_without_the_mask():
    model, batch = with_mixlora(tiny_llava()), prompts(N=4)
    seen = record_routing(model)
    with routing_mask(model, batch["attention_mask"].bool()):
        greedy(model, batch, use_cache=True)
    for calls in seen:
        (T, a, b), *steps = calls
        assert T == batch["input_ids"].shape[1] and [t for t, _, _ in steps] == [1] * 5
        assert all(torch.equal(sa, a) and torch.equal(sb, b) for _, sa, sb in steps)
        calls.clear()
    greedy(model, batch, use_cache=True)  # outside routing_mask: each step routes on its one new token
    assert any(not torch.equal(calls[k][1], calls[0][1]) for calls in seen for k in range(1, 6))


def test_a_left_padded_row_routes_and_answers_as_the_same_prompt_unpadded():
    model, batch = with_mixlora(tiny_llava()), prompts(N=2, text=6)
    short = prompts(N=1, text=4, seed=1)  # padded on the left to the batch's length
    batch["input_ids"][1] = torch.cat([torch.full((2,), PAD), short["input_ids"][0]])
    batch["attention_mask"][1, :2] = 0
    batch["pixel_values"][1] = short["pixel_values"][0]
    with routing_mask(model, batch["attention_mask"].bool()):
        padded = greedy(model, batch, use_cache=True)
    routed = [(m.last_routing.index_a[1], m.last_routing.index_b[1]) for m in mixlora_layers(model)]
    with routing_mask(model, short["attention_mask"].bool()):
        alone = greedy(model, short, use_cache=True)
    assert torch.equal(padded[1, 2:], alone[0])
    for (a, b), layer in zip(routed, mixlora_layers(model)):
        assert torch.equal(layer.last_routing.index_a[0], a) and torch.equal(layer.last_routing.index_b[0], b)


def test_beam_search_takes_the_mask_expanded_like_the_batch():
    model, batch = with_mixlora(tiny_llava()), prompts()
    mask = batch["attention_mask"].bool()
    with routing_mask(model, mask), pytest.raises(ValueError, match=r"repeat_interleave\(k, dim=0\)"):
        greedy(model, batch, use_cache=True, num_beams=2)
    beams = {}
    for use_cache in (True, False):
        with routing_mask(model, mask.repeat_interleave(2, dim=0)):
            beams[use_cache] = greedy(model, batch, use_cache=use_cache, num_beams=2)
    assert torch.equal(beams[True], beams[False])
    # The beams of one instance share its prompt, so reordering them keeps its routing.
    for layer in mixlora_layers(model):
        assert torch.equal(layer.last_routing.index_a[0::2], layer.last_routing.index_a[1::2])


def test_a_decode_step_before_its_prompt_is_refused():
    model, batch = with_mixlora(tiny_llava()), prompts()
    mask, layer = batch["attention_mask"].bool(), mixlora_layers(model)[0]
    x = torch.randn(3, 1, layer.in_features, dtype=torch.float64)
    with routing_mask(model, mask):
        greedy(model, batch, use_cache=True, max_new_tokens=1)  # a prompt routed, in an earlier context
    with routing_mask(model, mask), pytest.raises(ValueError, match="run the prompt"):
        layer(x)  # a new context holds nothing from it
    with routing_mask(model, mask):
        greedy(model, batch, use_cache=True, max_new_tokens=1)
        with pytest.raises(ValueError, match="keep the batch of the prompt"):
            layer(x[:2])
