"""The Trainer path and hf/finetune_vlm.py, end to end on tiny random VLMs saved to disk.

Nothing is downloaded: word-level tokenizers (the `tokenizers` library), image processors of each
family with small sizes, chat templates written here, and models built from configs (LLaVA,
Qwen2-VL, LLaVA-NeXT) are saved with save_pretrained, the images are drawn with pillow, and the
script loads them as it would load a hub checkpoint. `transformers` and `accelerate`
(hf/requirements.txt) are optional: without them this skips.
"""

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from PIL import Image, ImageDraw  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402

from hf import finetune_vlm  # noqa: E402
from mixlora import (MixLoRALinear, add_lora, adapter_state_dict, read_adapters, routing_mask,  # noqa: E402
                     save_adapters)

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
WORDS = ("USER: ASSISTANT: [INST] [/INST] user assistant what colour is the shape ? describe it a red green blue "
         "yellow square circle").split()
COLOURS, SHAPES = ["red", "green", "blue", "yellow"], ["square", "circle"]
# Chat templates written here, in the form of the families' own (Qwen2-VL-Instruct's without its
# default system turn; llava-v1.6-mistral's). LLaVA gets none: the script's LLaVA v1 template.
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST] {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %} [/INST]"
    "{% else %} {{ message['content'][0]['text'] }}{{ eos_token }}{% endif %}{% endfor %}")
# initializer_range 0.5 rather than 0.02: logits large enough for a few adapter steps to learn answers
LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=64, initializer_range=0.5)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16,
            patch_size=8)
PINPOINTS = [[16, 32], [32, 16], [32, 32]]  # LLaVA-NeXT's "any resolution" grids, in 16 x 16 tiles


def word_tokenizer(specials: list[str], bos: str | None, eos: str, pad: str, **kwargs):
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                                **kwargs)


def llava_tokenizer():
    return word_tokenizer(SPECIALS, "<s>", "</s>", "<pad>", extra_special_tokens={"image_token": "<image>"})


def tiny_processor(family: str = "llava"):
    if family == "qwen2_vl":
        tok = word_tokenizer(QWEN_SPECIALS, None, "<|im_end|>", "<|endoftext|>",
                             additional_special_tokens=QWEN_SPECIALS[1:])
        images = transformers.Qwen2VLImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 512}, patch_size=4,
                                                       merge_size=2, temporal_patch_size=2)
        return transformers.Qwen2VLProcessor(image_processor=images, tokenizer=tok, chat_template=QWEN_TEMPLATE)
    if family == "llava_next":
        images = transformers.LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                                         image_grid_pinpoints=PINPOINTS)
        return transformers.LlavaNextProcessor(image_processor=images, tokenizer=llava_tokenizer(), patch_size=8,
                                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                               chat_template=NEXT_TEMPLATE)
    # 16 x 16 images in 8 x 8 patches: 4 patch tokens (+ CLS, which the "default" strategy drops)
    images = transformers.CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return transformers.LlavaProcessor(image_processor=images, tokenizer=llava_tokenizer(), patch_size=8,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1)


def tiny_vlm(processor, family: str = "llava", seed: int = 0):
    torch.manual_seed(seed)
    tok = processor.tokenizer
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    image = tok.convert_tokens_to_ids("<|image_pad|>" if family == "qwen2_vl" else "<image>")
    if family == "qwen2_vl":
        # head_dim 8: rotary over 4 frequencies, split 2 / 1 / 1 over time, height and width (M-RoPE)
        text = dict(LM, **ids, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
        vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, in_channels=3, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2)
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=image,
                                            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                                            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                                            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"), **ids)
        model = transformers.Qwen2VLForConditionalGeneration(config)
    else:
        cls, extra = ((transformers.LlavaNextForConditionalGeneration, dict(image_grid_pinpoints=PINPOINTS))
                      if family == "llava_next" else (transformers.LlavaForConditionalGeneration, dict(image_seq_length=4)))
        config = (transformers.LlavaNextConfig if family == "llava_next" else transformers.LlavaConfig)(
            vision_config=transformers.CLIPVisionConfig(**CLIP), text_config=transformers.LlamaConfig(**LM, **ids),
            image_token_id=image, vision_feature_layer=-1, vision_feature_select_strategy="default",
            pad_token_id=tok.pad_token_id, **extra)
        model = cls(config)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    return model.eval()


def tiny_llava(processor, seed: int = 0) -> "transformers.LlavaForConditionalGeneration":
    return tiny_vlm(processor, "llava", seed)


def records(folder: Path, n: int = 8) -> list[dict]:
    """n images (colour x shape) in folder, and LLaVA records whose answers have 1 or 3 words."""
    out = []
    for i in range(n):
        colour, shape = COLOURS[i % 4], SHAPES[i // 4 % 2]
        image = Image.new("RGB", (20, 24), "white")
        draw = ImageDraw.Draw(image)
        # The circle is the smaller, so that a random one-layer vision tower on 16 x 16 pixels tells them apart.
        (draw.rectangle([2, 2, 18, 22], fill=colour) if shape == "square" else draw.ellipse([6, 8, 14, 16], fill=colour))
        image.save(folder / f"{i}.png")
        question, answer = [("what colour is the shape ?", colour), ("describe it", f"a {colour} {shape}")][i % 2]
        out.append({"id": f"r{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
    return out


@pytest.fixture(scope="module")
def without_video_processor():
    """Qwen2VLProcessor's video processor needs torchvision, whose PyPI build for torch 2.13 needs CUDA's torch
    (not the CPU one here): the tests build and load the processor without it, for images only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.Qwen2VLProcessor, "get_attributes", classmethod(lambda cls: ["image_processor",
                                                                                               "tokenizer"]))
        yield


@pytest.fixture(scope="module")
def saved_vlm(tmp_path_factory, without_video_processor):
    """family -> a folder with a saved tiny VLM of that family (model, processor), 8 images and train.json."""
    folders = {}

    def make(family: str) -> Path:
        if family not in folders:
            root = folders[family] = tmp_path_factory.mktemp(family)
            processor = tiny_processor(family)
            tiny_vlm(processor, family).save_pretrained(root / "model")
            processor.save_pretrained(root / "model")
            (root / "train.json").write_text(json.dumps(records(root)))
        return folders[family]
    return make


@pytest.fixture
def llava_dir(saved_vlm) -> Path:
    return saved_vlm("llava")


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors this small gain nothing from threads, and a busy machine makes each op wait for them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mixlora_layers(model) -> list[MixLoRALinear]:
    return [m for m in model.modules() if isinstance(m, MixLoRALinear)]


# ---- hf/README.md's Trainer block, run as written ---------------------------------------------------

def readme_trainer_block() -> str:
    section = (Path(__file__).parents[1] / "hf" / "README.md").read_text().split("## In your own Trainer", 1)[1]
    return next(b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "class MixLoRATrainer" in b)


def test_the_readme_trainer_class_is_the_scripts():
    assert inspect.getsource(finetune_vlm.MixLoRATrainer) in readme_trainer_block()


def run_readme_trainer(folder: Path, monkeypatch, checkpointing: bool) -> dict:
    """The README's block on a float64 tiny LLaVA and 4 records; what every MixLoRA forward saw."""
    folder.mkdir()
    monkeypatch.chdir(folder)
    block = readme_trainer_block()
    assert block.count("activation_checkpointing=True") == 1
    if not checkpointing:
        block = block.replace("activation_checkpointing=True", "activation_checkpointing=False")
    processor = tiny_processor()
    model = tiny_llava(processor).double()
    data = [dict(r, image=str(folder / r["image"])) for r in records(folder, n=4)]
    scope = dict(model=model, train_dataset=data, eval_dataset=data[:3],
                 collator=finetune_vlm.Collator(processor, train=True))
    frozen = [(p, p.detach().clone()) for p in model.parameters()]  # the base model, before the adapters
    seen, init = [], {}

    def record(m, args, out):  # every MixLoRA forward: train/eval, inside backward?, its mask, routed on it?
        if isinstance(m, MixLoRALinear):
            init.setdefault(m, [t.detach().clone() for t in (m.router_A, m.router_B, m.router_cfs)])
            seen.append((m.training, torch._C._current_graph_task_id() != -1, m.mask, m.routed_on_prompt))

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        torch.manual_seed(0)  # the adapters' init
        exec(compile(block, "hf/README.md", "exec"), scope)
    finally:
        hook.remove()
    assert all(torch.equal(p, before) for p, before in frozen)  # the base model did not train
    layers = mixlora_layers(model)
    assert len(layers) == 2 * 7 and all(".language_model." in n for n, m in model.named_modules() if m in layers)
    for layer in layers:  # R^A, R^B and W^CFS moved from their init
        routers = (layer.router_A, layer.router_B, layer.router_cfs)
        assert all(not torch.equal(t, t0) for t, t0 in zip(routers, init[layer]))
    prompt = lambda batch: (batch["labels"] == -100) & batch["attention_mask"].bool()
    assert read_adapters(folder / "adapters")[1].keys() == adapter_state_dict(model).keys()
    return dict(seen=seen, adapters=adapter_state_dict(model), metrics=scope["metrics"],
                train_mask=prompt(scope["collator"](data)), eval_mask=prompt(scope["collator"](data[:3])))


def test_the_readme_trainer_block_routes_on_the_prompt_and_checkpointing_changes_nothing(tmp_path, monkeypatch):
    plain = run_readme_trainer(tmp_path / "plain", monkeypatch, checkpointing=False)
    run = run_readme_trainer(tmp_path / "checkpointed", monkeypatch, checkpointing=True)
    # 3 epochs of one batch: 3 forwards per layer, each recomputed in backward under checkpointing
    # (but down_proj, whose output backward does not need), then one evaluate() batch.
    train = [s for s in run["seen"] if s[0] and not s[1]]
    recomputed = [s for s in run["seen"] if s[1]]
    evaluated = [s for s in run["seen"] if not s[0]]
    assert (len(train), len(recomputed), len(evaluated)) == (3 * 14, 3 * 12, 14)
    assert not any(s[1] for s in plain["seen"]) and len(plain["seen"]) == 3 * 14 + 14
    # Training routes on (labels == -100) & attention_mask: the batch's rows, in the sampler's order.
    rows = lambda mask: sorted(map(tuple, mask.tolist()))
    for training, _, mask, routed in train + recomputed:
        assert routed and rows(mask) == rows(run["train_mask"])
    assert not run["train_mask"].all(1).any()  # so the answers (and padding) were excluded
    for _, _, mask, routed in evaluated:  # evaluate(): the prompt too, in the eval set's order
        assert routed and torch.equal(mask, run["eval_mask"])
    assert torch.isfinite(torch.tensor(run["metrics"]["eval_loss"]))
    assert plain["adapters"].keys() == run["adapters"].keys()
    torch.testing.assert_close(run["adapters"], plain["adapters"], rtol=1e-12, atol=1e-12)


# ---- finetune_vlm.py, end to end -----------------------------------------------------------------

@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next"])
def test_train_then_generate_answers_as_the_trained_model_does(family, saved_vlm, tmp_path):
    llava_dir, out = saved_vlm(family), tmp_path / "run"
    data = ["--model", str(llava_dir / "model"), "--data", str(llava_dir / "train.json"), "--device", "cpu"]
    model = finetune_vlm.main(data + ["--out", str(out), "--steps", "90", "--batch-size", "4", "--lr", "7e-3",
                                        "--dropout", "0", "--eval-data", str(llava_dir / "train.json")])
    run, (config, tensors) = json.loads((out / "run.json").read_text()), read_adapters(out)
    [adapters] = config["adapters"]
    assert adapters["method"] == "mixlora" and (adapters["num_factors"], adapters["rank"], adapters["alpha"]) == (16, 4, 32.0)
    assert len(adapters["modules"]) == 2 * 7 and adapters["upcast"] and adapters["conditional"]
    assert run["steps"] == 90 and run["processes"] == 1 and run["eval_loss"] < 0.1
    assert tensors.keys() == adapter_state_dict(model).keys()
    lm = next(name for name, m in model.named_modules() if m is model.get_decoder())  # model.language_model
    adapted = [name for name, m in model.named_modules() if isinstance(m, MixLoRALinear)]
    assert len(adapted) == 2 * 7 and all(name.startswith(lm + ".layers.") for name in adapted)
    # A new process would do this: load the base, rebuild and load the adapters, answer in left-padded
    # batches of 3 (the two questions differ in length), with the KV cache.
    answers = finetune_vlm.main(["--generate", str(llava_dir / "train.json"), "--out", str(out), "--device", "cpu",
                                   "--batch-size", "3", "--max-new-tokens", "5"])
    assert json.loads((out / "answers.json").read_text()) == answers
    truth = [r["conversations"][1]["value"] for r in json.loads((llava_dir / "train.json").read_text())]
    assert [a["id"] for a in answers] == [f"r{i}" for i in range(8)]
    assert [a["answer"] for a in answers] == truth  # it learned them: the answers depend on the image
    # The same as the trained model in memory, one prompt at a time, without padding or KV cache.
    processor = transformers.AutoProcessor.from_pretrained(llava_dir / "model")
    collate, model = finetune_vlm.Collator(processor, train=False), model.eval()
    records = finetune_vlm.load_records(str(llava_dir / "train.json"), None, answers=False)
    for record, answer in zip(records, answers):
        batch = collate([record])
        with routing_mask(model, batch["attention_mask"].bool()), torch.no_grad():
            new = model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=False,
                                 suppress_tokens=[model.config.image_token_id])
        text = processor.tokenizer.decode(new[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        assert text == answer["answer"]
    # ... and the base model does not know them.
    base = transformers.AutoModelForImageTextToText.from_pretrained(llava_dir / "model").eval()
    batch = collate(records)
    new = base.generate(**batch, max_new_tokens=5, do_sample=False, suppress_tokens=[base.config.image_token_id])
    assert sum(a.strip() == t for a, t in zip(processor.tokenizer.batch_decode(new[:, batch["input_ids"].shape[1]:],
                                                                              skip_special_tokens=True), truth)) <= 2


# Each family's prompt, as its template writes it (the image's tokens shown once), and its image token count.
PROMPTS = {"llava": ("<s> USER: <image> what colour is the shape ? ASSISTANT:", 4),
           "qwen2_vl": ("<|im_start|> user <|vision_start|> <|image_pad|> <|vision_end|> what colour is the shape ? "
                        "<|im_end|> <|im_start|> assistant", 6),  # 24 x 16 pixels, 4 x 4 patches merged 2 x 2
           "llava_next": ("<s> [INST] <image> what colour is the shape ? [/INST]", 24)}  # 4 + 4 x 4 + a row end per row


@pytest.mark.parametrize("family", PROMPTS)
def test_the_collator_labels_the_answer_and_eos_only_and_pads_prompts_on_the_left(family, saved_vlm):
    folder = saved_vlm(family)
    processor = transformers.AutoProcessor.from_pretrained(folder / "model")
    records = finetune_vlm.load_records(str(folder / "train.json"), None, answers=True)[:2]
    train = finetune_vlm.Collator(processor, train=True)(records)
    prompts = finetune_vlm.Collator(processor, train=False)(records)
    tok, image = processor.tokenizer, processor.image_token_id
    text, image_tokens = PROMPTS[family]
    for n, record in enumerate(records):
        answer = train["labels"][n] != -100
        assert torch.equal(train["labels"][n][answer], train["input_ids"][n][answer])
        assert tok.decode(train["labels"][n][answer]) == f"{record['conversations'][1]['value']} {tok.eos_token}"
        T = int(train["attention_mask"][n].sum())  # right-padded: prompt, answer, then padding
        assert answer[:T].tolist() == [False] * (T - int(answer.sum())) + [True] * int(answer.sum())
        assert (train["input_ids"][n] == image).sum() == image_tokens and "labels" not in prompts
        prompt = train["input_ids"][n][:T][~answer[:T]]  # ... and the same prompt, left-padded, to answer
        assert torch.equal(prompts["input_ids"][n][-len(prompt):], prompt)
        assert prompts["attention_mask"][n].sum() == len(prompt)
        if n == 0:
            assert tok.decode(prompt.unique_consecutive()) == text
    assert prompts["attention_mask"][:, -1].all() and not prompts["attention_mask"][:, 0].all()
    # The image tensors the family takes, and token-aligned ones (Qwen2-VL's mm_token_type_ids) padded alike.
    assert {"llava": {"pixel_values"}, "qwen2_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
            "llava_next": {"pixel_values", "image_sizes"}}[family] == set(train) - {"input_ids", "attention_mask", "labels"}
    for key in set(train) & {"mm_token_type_ids"}:
        assert torch.equal(train[key] != 0, train["input_ids"] == image)


def test_bf16_and_gradient_checkpointing_flags(llava_dir, tmp_path, monkeypatch):
    """The 7B recipe's flags on the CPU: a bfloat16 base, float32 adapters under autocast, recomputed activations."""
    out = tmp_path / "run"
    model = finetune_vlm.main(["--model", str(llava_dir / "model"), "--data", str(llava_dir / "train.json"),
                              "--device", "cpu", "--out", str(out), "--steps", "40", "--batch-size", "4",
                              "--lr", "1e-2", "--dropout", "0", "--bf16", "--gradient-checkpointing"])
    checkpointing = getattr(type(model), "is_activation_checkpointing", None)  # is_gradient_checkpointing before 5
    assert (model.is_activation_checkpointing if checkpointing else model.is_gradient_checkpointing)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    routed_in, routing_mask = [], finetune_vlm.routing_mask

    def recording_routing_mask(model, mask):  # generation routes as training did: float32 routers and pools
        routed_in.extend({t.dtype for t in (m.router_A, m.router_cfs, m.lora_A)} for m in mixlora_layers(model))
        return routing_mask(model, mask)

    monkeypatch.setattr(finetune_vlm, "routing_mask", recording_routing_mask)
    answers = finetune_vlm.main(["--generate", str(llava_dir / "train.json"), "--out", str(out), "--device", "cpu",
                                 "--max-new-tokens", "5"])
    assert routed_in and all(dtypes == {torch.float32} for dtypes in routed_in)
    truth = [r["conversations"][1]["value"] for r in json.loads((llava_dir / "train.json").read_text())]
    assert [a["answer"] for a in answers] == truth


# ---- one-line errors ------------------------------------------------------------------------------

def bad(record: dict) -> list[dict]:
    return [{"id": "ok", "image": "0.png", "conversations": [{"from": "human", "value": "<image>\nwhat colour ?"},
                                                            {"from": "gpt", "value": "red"}]}, record]


CASES = {
    "missing image": (bad({"id": "7", "image": "nowhere.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "red"}]}), [],
        ["record 1 (id '7')", "nowhere.png not found"]),
    "no <image>": (bad({"id": "7", "image": "0.png", "conversations": [
        {"from": "human", "value": "what ?"}, {"from": "gpt", "value": "red"}]}), [],
        ["record 1 (id '7')", 'with "<image>" where the image goes']),
    "no answer": (bad({"image": "0.png", "conversations": [{"from": "human", "value": "<image>\nwhat ?"}]}), [],
                  ["record 1:", 'no answer: expected a "gpt" turn']),
    "multi-turn": (bad({"id": 3, "image": "0.png", "conversations": 2 * [
        {"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "red"}]}), [],
        ["record 1 (id 3)", "4 turns; only single-turn records"]),
    "unknown target": (bad({"id": "ok2", "image": "0.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "red"}]}),
        ["--targets", "q_proj,qkv_proj"], ["argument --targets", "['qkv_proj'] match no module"]),
    "a bad number": ([], ["--lr", "0"], ["argument --lr", "expected a number > 0, got 0"]),
    "E < r": ([], ["--factors", "2", "--rank", "4"], ["argument --factors", "expected E >= --rank 4"]),
    "FSDP on the CPU": ([], ["--fsdp"], ["argument --fsdp", "would silently train DDP"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_stops_the_run_in_one_line(case, llava_dir, tmp_path, capsys):
    data, flags, says = CASES[case]
    (tmp_path / "data.json").write_text(json.dumps(data))
    Image.new("RGB", (16, 16)).save(tmp_path / "0.png")
    with pytest.raises(SystemExit) as exit_info:
        finetune_vlm.main(["--model", str(llava_dir / "model"), "--data", str(tmp_path / "data.json"),
                             "--out", str(tmp_path / "run"), "--device", "cpu"] + flags)
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and not (tmp_path / "run" / "adapter_config.json").exists()
    assert err[-1].startswith("error: ") and all(s in err[-1] for s in says) and "Traceback" not in "".join(err)


def test_generate_before_training_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        finetune_vlm.main(["--generate", str(tmp_path / "prompts.json"), "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2 and "run.json not found: train into --out" in capsys.readouterr().err



def test_generate_with_adapters_of_another_model_says_so(llava_dir, tmp_path, capsys):
    out = tmp_path / "run"
    save_adapters(add_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), ["0"], rank=2), out)  # not the LLaVA's
    (out / "run.json").write_text(json.dumps({"model": str(llava_dir / "model"), "bf16": False}))
    with pytest.raises(SystemExit) as exit_info:
        finetune_vlm.main(["--generate", str(llava_dir / "train.json"), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and "Traceback" not in "".join(err) and not (out / "answers.json").exists()
    assert err[-1].startswith("error: ") and "sit on '0', which this LlavaForConditionalGeneration" in err[-1]

# ---- several processes ----------------------------------------------------------------------------

def test_torchrun_with_two_processes_matches_one_process(llava_dir, tmp_path):
    """2 gloo processes, each on half of every global batch of 4, end where one process ends.

    8 records and 4 steps: two epochs, each in its own shuffled order, which must be the same in both.
    """
    flags = ["--model", str(llava_dir / "model"), "--data", str(llava_dir / "train.json"), "--device", "cpu",
             "--steps", "4", "--batch-size", "4", "--lr", "1e-2", "--dropout", "0"]
    finetune_vlm.main(flags + ["--out", str(tmp_path / "one")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "hf.finetune_vlm",
           *flags, "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, "\n".join(l for l in done.stderr.splitlines() if "it/s]" not in l)[-3000:]
    one, two = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("one", "two"))
    assert (one["processes"], two["processes"], one["steps"], two["steps"]) == (1, 2, 4, 4)
    expected, got = (read_adapters(tmp_path / d)[1] for d in ("one", "two"))
    assert all(v.abs().sum() > 0 for k, v in got.items() if k.endswith("lora_B"))
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


# ---- hf/count_7b.py ---------------------------------------------------------------------------------

def test_count_7b_counts_what_the_formula_gives_on_the_meta_device(llava_dir):
    """MixLoRA trains E (d_in + d_out) pool, 2 E d_in router and r E d_in W^CFS parameters per linear."""
    from hf import count_7b
    config = transformers.AutoConfig.from_pretrained(llava_dir / "model")
    frozen, trained = count_7b.count(config, dict(method="mixlora", rank=4, factors=16))
    d, f = 32, 64  # hidden, intermediate; k and v project to 2 KV heads of 8: 16
    shapes = [(d, d), (d, 16), (d, 16), (d, d), (d, f), (d, f), (f, d)]  # (d_in, d_out): q k v o gate up down
    assert trained == 2 * sum(16 * (i + o) + (2 + 4) * 16 * i for i, o in shapes)
    assert frozen == sum(p.numel() for p in transformers.AutoModelForImageTextToText.from_pretrained(
        llava_dir / "model").parameters())


# FSDP2 by hand: accelerate 1.15 applies its FSDP plugin only on accelerators (state.py: MULTI_GPU, ...), so
# on the CPU the Trainer's fsdp=True trains DDP. This is the loop a forker's own FSDP2 code runs.
FSDP_PROBE = """
import json, sys
from pathlib import Path
import torch, torch.distributed as dist, transformers
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from hf import finetune_vlm
from mixlora import MixLoRALinear, mark_only_adapters_trainable, routing_mask

folder, out = sys.argv[1:]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
processor = transformers.AutoProcessor.from_pretrained(folder + "/model")
model = transformers.AutoModelForImageTextToText.from_pretrained(folder + "/model")
torch.manual_seed(0)  # the adapters' init, in every process
config = dict(model=folder + "/model", method="mixlora", factors=16, rank=4, alpha=32.0, dropout=0.0, scores="softmax",
              targets=finetune_vlm.TARGETS.split(","), bf16=False, steps=4, processes=world)
finetune_vlm.add_adapters(model, config)
mark_only_adapters_trainable(model)
model.activation_checkpointing_enable({"use_reentrant": False})
for layer in finetune_vlm.language_model(model).layers:  # one FSDP unit per decoder layer, then the rest
    fully_shard(layer)
fully_shard(model)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
records = finetune_vlm.load_records(folder + "/train.json", None, answers=True)
collate = finetune_vlm.Collator(processor, train=True)
model.train()
for step in range(4):  # global batches of 4 records in order; each process takes every world-th
    share = records[4 * step % 8:][:4][rank::world]
    batch = collate(share)
    tokens = sum((collate([r])["labels"] != -100).sum() for r in records[4 * step % 8:][:4])  # the global batch's
    with routing_mask(model, (batch["labels"] == -100) & batch["attention_mask"].bool()):
        # The mean over the global batch's answer tokens; FSDP averages the processes' gradients, hence * world.
        loss = model(**batch, num_items_in_batch=tokens).loss * world
        loss.backward()
    opt.step()
    opt.zero_grad()
layers = [m for m in model.modules() if isinstance(m, MixLoRALinear)]
facts = dict(sharded=all(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad),
             routed_on_prompt=len(layers) == 14 and all(m.routed_on_prompt for m in layers))
finetune_vlm.save(model, config, Path(out), write=rank == 0)  # the script's save: every process gathers, one writes
if rank == 0:
    open(out + "/facts.json", "w").write(json.dumps(facts))
dist.destroy_process_group()
"""


def test_fsdp2_with_two_processes_matches_one_process_and_its_adapters_load_in_one(llava_dir, tmp_path):
    """fully_shard over 2 gloo processes, with activation checkpointing, ends where 1 process ends."""
    (tmp_path / "probe.py").write_text(FSDP_PROBE)
    root = Path(__file__).parents[1]
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(tmp_path / "probe.py"), str(llava_dir), str(tmp_path / str(n))]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root,
                              env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        # Every adapter a DTensor shard, and every MixLoRA layer routed on routing_mask's mask inside the
        # sharded model (a recomputation outside it would have raised).
        assert json.loads((tmp_path / str(n) / "facts.json").read_text()) == dict(sharded=True, routed_on_prompt=True)
    expected, got = (read_adapters(tmp_path / d)[1] for d in ("1", "2"))
    assert all(v.shape == expected[k].shape for k, v in got.items())  # full tensors, gathered, not a shard
    assert all(v.abs().sum() > 0 for k, v in got.items() if k.endswith("lora_B"))
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
    assert json.loads((tmp_path / "2" / "run.json").read_text())["processes"] == 2
    # save() wrote them as it does after the Trainer: the script's --generate answers with them in one process.
    answers = [finetune_vlm.main(["--generate", str(llava_dir / "train.json"), "--out", str(tmp_path / d), "--device",
                                  "cpu", "--max-new-tokens", "5"]) for d in ("1", "2")]
    assert answers[0] == answers[1]


def test_deepspeed_zero3_with_two_processes_matches_one_process(llava_dir, tmp_path):
    """--deepspeed hf/ds_zero3.json over 2 gloo processes ends where 1 process ends, and save() gathers."""
    pytest.importorskip("deepspeed")  # not in hf/requirements.txt: pip install torch==2.13.0 deepspeed==0.19.8
    root = Path(__file__).parents[1]
    config = json.loads((root / "hf" / "ds_zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even this model's parameters
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    flags = ["--model", str(llava_dir / "model"), "--data", str(llava_dir / "train.json"), "--device", "cpu",
             "--steps", "4", "--batch-size", "4", "--lr", "1e-2", "--dropout", "0"]
    finetune_vlm.main(flags + ["--out", str(tmp_path / "one")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "hf.finetune_vlm",
           *flags, "--deepspeed", str(tmp_path / "zero3.json"), "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, "\n".join(l for l in done.stderr.splitlines() if "it/s]" not in l)[-3000:]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2
    expected, got = (read_adapters(tmp_path / d)[1] for d in ("one", "two"))
    assert all(v.shape == expected[k].shape for k, v in got.items())  # gathered, not ZeRO-3's empty partitions
    assert all(v.abs().sum() > 0 for k, v in got.items() if k.endswith("lora_B"))
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
