"""Fine-tune a Hugging Face image-text-to-text model (LLaVA, LLaVA-NeXT, Qwen2-VL, ...) with MixLoRA or LoRA
through the Trainer, then answer prompts.

    python -m hf.finetune_vlm --model llava-hf/llava-1.5-7b-hf --data train.json --image-folder images \\
        --out runs/llava-mixlora                         # train: writes save_adapters' directory and run.json there
    python -m hf.finetune_vlm --generate prompts.json --image-folder images --out runs/llava-mixlora
                                                         # answer: writes runs/llava-mixlora/answers.json
    torchrun --nproc_per_node 2 -m hf.finetune_vlm ...   # data parallel (DDP through accelerate; gloo on the CPU)

--model is a local checkpoint directory or, with a network, a hub id: anything AutoModelForImageTextToText
and AutoProcessor load. --data is LLaVA's conversation JSON, one single-turn record per image:

    [{"id": "0", "image": "cats/0.png",               # relative to --image-folder (default: the JSON's folder)
      "conversations": [{"from": "human", "value": "<image>\\nWhat is on the mat?"},
                        {"from": "gpt", "value": "A cat."}]}]

Each record becomes a chat (a user turn: the image where "<image>" stands, and the text; an assistant turn:
the answer) written with the processor's chat template, or LLaVA v1's (LLAVA_V1_TEMPLATE) where the
checkpoint has none. The prompt is the template up to and including its generation prompt; the answer is
everything the template writes after it (the answer, its end-of-turn token, and the tokenizer's EOS where
the template writes none). The processor turns a batch of these texts and images into every tensor the model
takes (pixel_values, and image_grid_thw, image_sizes, pixel_attention_mask, mm_token_type_ids ... as the
family needs), all passed on. The labels are -100 everywhere but on the answer, and MixLoRATrainer routes
every MixLoRA layer on the rest, (labels == -100) & attention_mask: the image and the question, never the
answer or padding. --generate pads the prompts on the left and generates inside
routing_mask(model, attention_mask): the prefill routes on the prompt and every new token reuses that
routing, as in training. Multi-turn records are refused (a later turn would route on earlier answers).

The adapters go on the language model only: model.get_decoder(), the module transformers names
language_model (LLaVA, Qwen2-VL, Gemma 3) or text_model (Idefics3); the vision tower, the projector and
lm_head are outside it. Defaults are the authors' released recipe: q, k, v, o, gate, up, down of that LM,
E = 16, r = 4, α = 2E (2r for LoRA), dropout 0.05, lr 4e-5 cosine (LLaVA's 3% warm-up), 3 epochs.
--router words (ours, not the paper's: mixlora.add_words, docs/method.md §3.11) routes every layer on the instruction's mean input
embedding, with routers fitted by update k-means on the first --start-records records, then frozen.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, Trainer, TrainingArguments, set_seed

import cli
from hf.routing import update_kmeans_start
from mixlora import (WordsLinear, add_lora, add_mixlora, add_words, adapter_state_dict, load_adapters,
                     mark_only_adapters_trainable, routing_mask, save_adapters, save_atomically)

# LLaVA v1's conversation, "USER: <image>\\n{question} ASSISTANT: {answer}</s>", as a chat template: for
# checkpoints without one of their own (llava-1.5 in its original release, a model built from a config).
LLAVA_V1_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %} {% else %}ASSISTANT: {{ message['content'][0]['text'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # every linear of the LM


class MixLoRATrainer(Trainer):
    """transformers.Trainer with every MixLoRA layer routed on the prompt: (labels == -100) & attention_mask."""

    def prompt_mask(self, inputs):
        mask = inputs["attention_mask"].bool()
        if inputs.get("labels") is not None:  # predict() may have none: then the prompt is all of it
            mask = mask & (inputs["labels"] == -100)
        return mask.to(self.args.device)  # training_step gets its inputs before they are moved there

    def training_step(self, model, inputs, *args, **kwargs):  # forward and backward run in here, so
        with routing_mask(model, self.prompt_mask(inputs)):   # checkpointing's recomputation routes too
            return super().training_step(model, inputs, *args, **kwargs)

    def prediction_step(self, model, inputs, *args, **kwargs):  # evaluate() and predict()
        with routing_mask(model, self.prompt_mask(inputs)):
            return super().prediction_step(model, inputs, *args, **kwargs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser(__doc__)
    p.add_argument("--model", help="an image-text-to-text checkpoint directory or hub id (for --generate: default, the trained one)")
    p.add_argument("--data", help="training records, LLaVA's conversation JSON")
    p.add_argument("--eval-data", help="records to report the loss on after training (routed on the prompt)")
    p.add_argument("--image-folder", help="root of the records' relative image paths (default: the JSON's folder)")
    p.add_argument("--out", required=True, help="where the adapters, run.json and answers.json go")
    p.add_argument("--generate", metavar="PROMPTS", help="answer these records with the adapters in --out")
    p.add_argument("--method", default="mixlora", choices=["lora", "mixlora"])
    p.add_argument("--factors", type=cli.at_least(1), default=16, help="E, MixLoRA's factors per pool (>= r)")
    p.add_argument("--rank", type=cli.at_least(1), default=4, help="r, for LoRA and MixLoRA alike")
    p.add_argument("--alpha", type=cli.above(0.0), help="α > 0, scale α/r (default 2E for MixLoRA, 2r for LoRA)")
    p.add_argument("--scores", default="softmax", choices=["softmax", "sigmoid"],
                   help="MixLoRA's router scores: softmax over E (the paper) or one sigmoid per factor")
    p.add_argument("--router", default="paper", choices=["paper", "words"], help="MixLoRA's routers: the paper's, "
                   "or (ours, mixlora.add_words) frozen ones on the instruction's mean input embedding, started by update k-means")
    p.add_argument("--start-records", type=cli.at_least(1), default=512,
                   help="--router words: the first training records its start is fitted on")
    p.add_argument("--dropout", type=cli.at_least(0.0, float), default=0.05, help="adapter dropout, in [0, 1)")
    p.add_argument("--targets", default=TARGETS, help="comma-separated names of the LM's linears to adapt")
    p.add_argument("--epochs", type=cli.at_least(1), default=3)
    p.add_argument("--steps", type=cli.at_least(1), help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=cli.at_least(1), default=16, help="the global batch of one optimizer "
                   "step (generation: prompts per batch)")
    p.add_argument("--grad-accum", type=cli.at_least(1), default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=cli.above(0.0), default=4e-5)
    p.add_argument("--seed", type=cli.at_least(0), default=0)
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--fsdp", action="store_true", help="GPUs: shard the base, the adapters, their gradients and "
                   "AdamW's state over the torchrun processes (FSDP2 through accelerate, one unit per decoder layer)")
    p.add_argument("--deepspeed", metavar="CONFIG", help="a DeepSpeed config, e.g. hf/ds_zero3.json (ZeRO-3 over the "
                   "torchrun processes; needs `pip install deepspeed`)")
    p.add_argument("--bf16", action="store_true", help="base in bfloat16; adapters train in float32 under autocast")
    p.add_argument("--max-new-tokens", type=cli.at_least(1), default=128)
    p.add_argument("--device", type=cli.device, default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N; "
                   "training on a GPU takes the Trainer's choice (one GPU per torchrun process)")
    args = p.parse_args(argv)
    if args.dropout >= 1:
        p.error(f"argument --dropout: expected a number in [0, 1), got {args.dropout:g}")
    if args.method == "mixlora" and args.factors < args.rank:
        p.error(f"argument --factors: expected E >= --rank {args.rank} (each instance picks r of E), "
                f"got {args.factors}")
    if args.method == "lora" and args.router == "words":
        p.error("argument --router: words routes MixLoRA's factors; --method lora has no routers")
    if not args.generate and not (args.model and args.data):
        p.error("argument --data: training needs --model and --data (or answer prompts with --generate PROMPTS)")
    shards = int(os.environ.get("WORLD_SIZE", 1)) * args.grad_accum
    if not args.generate and args.batch_size % shards:
        p.error(f"argument --batch-size: {args.batch_size} is the global batch; it must divide evenly into "
                f"{shards} micro-batches (processes x --grad-accum)")
    if args.fsdp and (args.device == "cpu" or not torch.cuda.is_available()):
        p.error("argument --fsdp: accelerate 1.15 applies FSDP on GPUs only; on the CPU its Trainer would silently "
                "train DDP (for FSDP2 on the CPU, shard by hand: tests/test_finetune_vlm.py's FSDP_PROBE)")
    args.targets = args.targets.split(",")
    if args.alpha is None:
        args.alpha = 2.0 * (args.factors if args.method == "mixlora" else args.rank)
    return args


# ---- data ------------------------------------------------------------------------------------------

class InputError(ValueError):
    """Input that cannot be used (a record, a target, a missing file), in one line that names it."""


def load_records(path: str, image_folder: str | None, answers: bool) -> list[dict]:
    """Read and check every record up front, so that a bad one stops the run before anything loads."""
    folder = Path(image_folder) if image_folder else Path(path).parent
    try:
        records = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read a JSON list of records ({e})")
    if not isinstance(records, list) or not records:
        raise InputError(f"{path}: expected a non-empty JSON list of records")
    for i, r in enumerate(records):
        where = f"{path}: record {i}" + (f" (id {r['id']!r})" if isinstance(r, dict) and "id" in r else "")
        turns = r.get("conversations") if isinstance(r, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
            raise InputError(f'{where}: expected {{"image": ..., "conversations": '
                             f'[{{"from": "human", "value": ...}}, ...]}}')
        if turns[0].get("from") != "human" or str(turns[0].get("value")).count("<image>") != 1:
            raise InputError(f'{where}: the first turn must be the human\'s, with "<image>" where the image goes '
                            f'(once), e.g. "<image>\\nWhat is this?"')
        if answers and (len(turns) < 2 or turns[1].get("from") != "gpt" or not str(turns[1].get("value", "")).strip()):
            raise InputError(f'{where}: no answer: expected a "gpt" turn with a non-empty value after the human turn')
        if len(turns) > 2:
            raise InputError(f"{where}: {len(turns)} turns; only single-turn records (human, then gpt) are supported")
        if not isinstance(r.get("image"), str) or not (folder / r["image"]).is_file():
            raise InputError(f"{where}: image file {folder / str(r.get('image'))} not found "
                            f"(image paths are relative to --image-folder, default the JSON's folder)")
        r["image"] = str(folder / r["image"])
    return records


class Collator:
    """Records -> the processor's batch (input_ids, attention_mask, pixel_values, ...), and labels when training.

    Each record is written as a chat with the processor's template (LLAVA_V1_TEMPLATE where it has
    none). Training pads on the right and puts the answer's tokens in labels, -100 elsewhere;
    generation pads on the left, so that every row's new tokens start at the same position.
    """

    def __init__(self, processor, train: bool):
        self.processor, self.train, self.tok = processor, train, processor.tokenizer
        self.template = processor.chat_template or LLAVA_V1_TEMPLATE

    def texts(self, record: dict) -> tuple[str, str]:
        """The record's prompt, and (training) what the template writes after it: the answer, ending in EOS."""
        before, _, after = record["conversations"][0]["value"].partition("<image>")
        content = [{"type": "text", "text": t.strip()} for t in [before] if t.strip()] + [{"type": "image"}]
        content += [{"type": "text", "text": t.strip()} for t in [after] if t.strip()]
        chat = [{"role": "user", "content": content}]
        prompt = self.processor.apply_chat_template(chat, chat_template=self.template, add_generation_prompt=True)
        if not self.train:
            return prompt, ""
        answer = record["conversations"][1]["value"].strip()
        chat.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        full = self.processor.apply_chat_template(chat, chat_template=self.template)
        if not full.startswith(prompt):
            raise InputError(f"record {record.get('id', '?')!r}: the chat template does not write the prompt "
                             f"(its generation prompt) as the start of prompt + answer, so the answer cannot be found")
        answer = full[len(prompt):]
        return prompt, answer if self.tok.eos_token in answer else answer + self.tok.eos_token

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        texts = [self.texts(r) for r in records]
        images = []
        for r in records:
            with Image.open(r["image"]) as image:
                images.append([image.convert("RGB")])  # one image per record
        full = [prompt + answer for prompt, answer in texts]
        # As transformers' apply_chat_template: a template that writes BOS itself gets no second one.
        special = not (self.tok.bos_token and full[0].startswith(self.tok.bos_token))
        batch = dict(self.processor(images=images, text=full, padding=True, add_special_tokens=special,
                                    padding_side="right" if self.train else "left", return_tensors="pt"))
        if self.train:  # labels: the last answer_length tokens before the padding
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # (N, T)
            for n, (r, (prompt, answer)) in enumerate(zip(records, texts)):
                labels[n, :int(batch["attention_mask"][n].sum()) - self.answer_length(r, prompt, answer, special)] = -100
            batch["labels"] = labels
        return batch

    def answer_length(self, record: dict, prompt: str, answer: str, special: bool) -> int:
        """How many tokens the answer adds to the prompt, tokenized as one text (as the batch is).

        The image placeholder counts as one token in both texts here, so the count is the same after the
        processor expands it into the image's tokens.
        """
        alone = self.tok(prompt, add_special_tokens=special)["input_ids"]
        joint = self.tok(prompt + answer, add_special_tokens=special)["input_ids"]
        if joint[:len(alone)] != alone:
            raise InputError(f"record {record.get('id', '?')!r}: the prompt's last token and the answer's first "
                             f"merge into one token, so the answer cannot be labelled on its own")
        return len(joint) - len(alone)


# ---- adapters ---------------------------------------------------------------------------------------

def language_model(model: PreTrainedModel) -> torch.nn.Module:
    """The LM inside the VLM: model.get_decoder(), transformers' language_model or text_model submodule.

    Adapting only inside it keeps the vision tower (whose attention also has q_proj, k_proj, v_proj),
    the projector and lm_head as they are.
    """
    lm = model.get_decoder()
    if lm is model or lm is getattr(model, "model", None):
        raise InputError(f"{type(model).__name__}.get_decoder() returns the whole model, not its language model: "
                         f"its vision tower would be adapted too")
    return lm


def image_token_id(model: PreTrainedModel) -> int:
    """The id of the image placeholder token, which the words router leaves out of the instruction."""
    token = getattr(model.config, "image_token_id", None)
    if token is None:
        raise InputError(f"--router words needs the model's image token id, and {type(model).__name__}'s config "
                         f"has no image_token_id")
    return token


def add_adapters(model: PreTrainedModel, config: dict) -> None:
    """LoRA or MixLoRA (the paper's routers, or the words router) on the LM's targets, as the flags say;
    ValueError names a bad target."""
    if config["method"] == "lora":
        add_lora(language_model(model), config["targets"], config["rank"], config["alpha"], config["dropout"])
    elif config.get("router") == "words":
        embedding = model.get_input_embeddings()
        add_words(language_model(model), config["targets"], config["factors"], config["rank"], embedding.embedding_dim,
                  image_token_id(model), embedding.num_embeddings, config["alpha"], config["dropout"], config["scores"])
    else:
        add_mixlora(language_model(model), config["targets"], config["factors"], config["rank"], config["alpha"],
                    config["dropout"], scores=config["scores"])


def save_json(obj, path: Path) -> None:
    save_atomically(lambda f: f.write(json.dumps(obj, indent=1, ensure_ascii=False).encode()), path)


# save, saved_config and load are the script's only ways to the files in --out.

def save(model: PreTrainedModel, config: dict, out: Path, write: bool = True) -> None:
    """save_adapters' files (adapter_config.json and adapter_model.safetensors: what rebuilds the adapters), then
    run.json (config: the base model's name in "model", "bf16", the flags and the run's record).

    Under FSDP and ZeRO-3 every process must call it: FSDP's adapter tensors are DTensors, which
    full_tensor() gathers; ZeRO-3's are empty partitions, which GatheredParameters gathers. The one
    process with write=True writes the full tensors.
    """
    zero3 = [p for p in model.parameters() if p.requires_grad and hasattr(p, "ds_numel")]
    with contextlib.ExitStack() as gathered:
        if zero3:
            import deepspeed  # only where the model is already under ZeRO-3
            gathered.enter_context(deepspeed.zero.GatheredParameters(zero3))
        adapters = {k: v.full_tensor() if isinstance(v, DTensor) else v.clone()
                    for k, v in adapter_state_dict(model).items()}
    if not write:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").unlink(missing_ok=True)  # an earlier run's record must not vouch for this save
    save_adapters(model, out, adapters)
    save_json(config, out / "run.json")  # written last: its presence means a complete save


def saved_config(out: Path) -> dict:
    """The run.json save() wrote into out (the base model's name in "model", "bf16", the adapters' settings)."""
    try:
        return json.loads((out / "run.json").read_text())
    except OSError:
        raise InputError(f"{out / 'run.json'} not found: train into --out {out} first")


def load(model: PreTrainedModel, out: Path) -> None:
    """Put the adapters saved in out onto model (the base they were trained on)."""
    try:
        load_adapters(model, out)  # the same add_lora / add_mixlora / add_words calls, then the tensors
    except ValueError as e:  # another base model, or files this mixlora.py cannot read
        raise InputError(" ".join(str(e).split())) from None  # one line, as every error here
    words = {m.image_token_id for m in model.modules() if isinstance(m, WordsLinear)}
    if words and words != {image_token_id(model)}:
        raise InputError(f"{out}: the words router was trained with image token id {words.pop()}, but this "
                         f"{type(model).__name__}'s is {image_token_id(model)}: another base model?")


# ---- train and answer ------------------------------------------------------------------------------

def train(args: argparse.Namespace) -> PreTrainedModel:
    records = load_records(args.data, args.image_folder, answers=True)
    eval_records = load_records(args.eval_data, args.image_folder, answers=True) if args.eval_data else None
    config = {k: getattr(args, k) for k in ("model", "method", "factors", "rank", "alpha", "scores", "dropout",
                                            "targets", "bf16", "router")}
    set_seed(args.seed)  # the adapters' init: the same in every process
    processor = AutoProcessor.from_pretrained(args.model)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype)
    try:
        add_adapters(model, config)
    except InputError:
        raise
    except ValueError as e:  # a target that matches nothing, or something that is not an nn.Linear
        raise InputError(f"argument --targets: {e}") from None
    mark_only_adapters_trainable(model)  # the adapters are float32 on a bfloat16 base too (add_mixlora's upcast)
    # Non-reentrant checkpointing (the reentrant kind would need the frozen embeddings' output to require
    # a gradient); transformers 5 renamed the option activation_checkpointing and made it the default.
    # Under FSDP, its own (per sharded unit) instead: the Trainer's would gather every unit's weights twice.
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    checkpointing = ({"activation_checkpointing": args.gradient_checkpointing} if "activation_checkpointing" in fields
                     else {"gradient_checkpointing": args.gradient_checkpointing,
                           "gradient_checkpointing_kwargs": {"use_reentrant": False}})
    if args.fsdp:
        checkpointing = {"activation_checkpointing": False, "fsdp": True,
                         "fsdp_config": {"version": 2, "activation_checkpointing": args.gradient_checkpointing}}
    world = int(os.environ.get("WORLD_SIZE", 1))
    targs = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=args.batch_size // (world * args.grad_accum),
        per_device_eval_batch_size=args.batch_size // world, gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs, max_steps=args.steps or -1, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0, seed=args.seed, bf16=args.bf16,
        use_cpu=args.device == "cpu", logging_steps=10, save_strategy="no", report_to="none",
        remove_unused_columns=False,  # the collator reads the records' image and conversations
        ddp_find_unused_parameters=False,  # every adapter parameter gets a gradient, zeros if unchosen
        deepspeed=args.deepspeed,
        **checkpointing)
    if args.router == "words":  # the start, from the base model's answers to the first --start-records records
        first, size, collate = records[:args.start_records], targs.per_device_train_batch_size, Collator(processor, True)
        if len(first) < args.factors:
            raise InputError(f"argument --start-records: the start clusters records into E = {args.factors} "
                             f"clusters, so it needs at least {args.factors} records; got {len(first)}")
        update_kmeans_start(model.to(targs.device), (collate(first[i:i + size]) for i in range(0, len(first), size)),
                            seed=args.seed)
        config["start_records"] = len(first)
    trainer = MixLoRATrainer(model=model, args=targs, train_dataset=records, eval_dataset=eval_records,
                             data_collator=Collator(processor, train=True))
    trainer.train()
    config.update(steps=trainer.state.global_step, processes=trainer.args.world_size)  # for the record
    if eval_records:
        config["eval_loss"] = trainer.evaluate()["eval_loss"]
    save(model, config, Path(args.out), write=trainer.is_world_process_zero())  # every process: FSDP gathers
    return model


@torch.no_grad()
def generate(args: argparse.Namespace) -> list[dict]:
    out = Path(args.out)
    config = saved_config(out)
    records = load_records(args.generate, args.image_folder, answers=False)
    device, dtype = torch.device(args.device), torch.bfloat16 if config["bf16"] else torch.float32
    processor = AutoProcessor.from_pretrained(args.model or config["model"])
    model = AutoModelForImageTextToText.from_pretrained(args.model or config["model"], dtype=dtype)
    load(model, out)
    model.to(device).eval()  # not to dtype: the routers and pools stay float32, as they trained
    collate, tok = Collator(processor, train=False), processor.tokenizer
    # Stop at the checkpoint's end-of-turn token(s) and at EOS; never write an image placeholder.
    stop = model.generation_config.eos_token_id
    stop = sorted({tok.eos_token_id, *(stop if isinstance(stop, list) else [stop] if stop is not None else [])})
    image_token = getattr(model.config, "image_token_id", None)
    answers = []
    for start in tqdm(range(0, len(records), args.batch_size), desc="generate", unit="batch"):
        chunk = records[start:start + args.batch_size]
        batch = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in collate(chunk).items()}
        # The held-routing rule: the prefill routes on the prompt (not the padding), new tokens reuse it.
        # --bf16 trained under autocast (float32 adapters, bfloat16 matmuls): generation computes as training did.
        as_trained = torch.autocast(device.type, torch.bfloat16, enabled=config["bf16"])
        with routing_mask(model, batch["attention_mask"].bool()), as_trained:
            new = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else stop[0],
                                 suppress_tokens=None if image_token is None else [image_token])
        texts = tok.batch_decode(new[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        answers += [{"id": r.get("id", start + i), "answer": t.strip()} for i, (r, t) in enumerate(zip(chunk, texts))]
    save_json(answers, out / "answers.json")
    return answers


def main(argv: list[str] | None = None) -> PreTrainedModel | list[dict]:
    args = parse_args(argv)
    try:
        return generate(args) if args.generate else train(args)
    except InputError as e:  # bad records or targets: one line, exit code 2 as for a bad flag, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
