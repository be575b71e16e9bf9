"""Fine-tune a Hugging Face LLaVA with MixLoRA (or LoRA) through the Trainer, then answer prompts.

    python -m hf.finetune_vlm --model llava-hf/llava-1.5-7b-hf --data train.json --image-folder images \\
        --out runs/llava-mixlora                         # train: writes adapters.pt and adapters.json there
    python -m hf.finetune_vlm --generate prompts.json --image-folder images --out runs/llava-mixlora
                                                         # answer: writes runs/llava-mixlora/answers.json
    torchrun --nproc_per_node 2 -m hf.finetune_vlm ... # data parallel (DDP through accelerate; gloo on the CPU)

--model is a local checkpoint directory (a LlavaForConditionalGeneration and its processor) or, with
a network, a hub id. --data is LLaVA's conversation JSON, one single-turn record per image:

    [{"id": "0", "image": "cats/0.png",               # relative to --image-folder (default: the JSON's folder)
      "conversations": [{"from": "human", "value": "<image>\\nWhat is on the mat?"},
                        {"from": "gpt", "value": "A cat."}]}]

Each record becomes PROMPT (LLaVA v1's template, the processor expanding <image> into the image
tokens) + " answer" + EOS. The labels are -100 everywhere but on the answer and its EOS, and
MixLoRATrainer routes every MixLoRA layer on the rest, (labels == -100) & attention_mask: the image
and the question, never the answer or padding. --generate reads the same format (a "gpt" turn,
if present, is ignored), pads on the left and generates inside routing_mask(model, attention_mask):
the prefill routes on the prompt and every new token reuses that routing, as in training.
Defaults are the authors' released recipe: q, k, v, o, gate, up, down of the LM (never the vision
tower), E = 16, r = 4, α = 2E (2r for LoRA), dropout 0.05, lr 4e-5 cosine (LLaVA's 3% warm-up), 3 epochs.
"""

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoProcessor, LlavaForConditionalGeneration, Trainer, TrainingArguments, set_seed

import cli
from mixlora import (add_lora, add_mixlora, adapter_state_dict, load_adapter_state_dict,
                     mark_only_adapters_trainable, routing_mask, save_atomically)

PROMPT = "USER: {human} ASSISTANT:"  # LLaVA v1's conversation template; the answer follows after a space
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
    p.add_argument("--model", help="a LLaVA checkpoint directory or hub id (for --generate: default, the trained one)")
    p.add_argument("--data", help="training records, LLaVA's conversation JSON")
    p.add_argument("--eval-data", help="records to report the loss on after training (routed on the prompt)")
    p.add_argument("--image-folder", help="root of the records' relative image paths (default: the JSON's folder)")
    p.add_argument("--out", required=True, help="where adapters.pt, adapters.json and answers.json go")
    p.add_argument("--generate", metavar="PROMPTS", help="answer these records with the adapters in --out")
    p.add_argument("--method", default="mixlora", choices=["lora", "mixlora"])
    p.add_argument("--factors", type=cli.at_least(1), default=16, help="E, MixLoRA's factors per pool (>= r)")
    p.add_argument("--rank", type=cli.at_least(1), default=4, help="r, for LoRA and MixLoRA alike")
    p.add_argument("--alpha", type=cli.above(0.0), help="α > 0, scale α/r (default 2E for MixLoRA, 2r for LoRA)")
    p.add_argument("--scores", default="softmax", choices=["softmax", "sigmoid"],
                   help="MixLoRA's router scores: softmax over E (the paper) or one sigmoid per factor")
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
    if not args.generate and not (args.model and args.data):
        p.error("argument --data: training needs --model and --data (or answer prompts with --generate PROMPTS)")
    shards = int(os.environ.get("WORLD_SIZE", 1)) * args.grad_accum
    if not args.generate and args.batch_size % shards:
        p.error(f"argument --batch-size: {args.batch_size} is the global batch; it must divide evenly into "
                f"{shards} micro-batches (processes x --grad-accum)")
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
        if turns[0].get("from") != "human" or "<image>" not in str(turns[0].get("value")):
            raise InputError(f'{where}: the first turn must be the human\'s, with "<image>" where the image goes, '
                            f'e.g. "<image>\\nWhat is this?"')
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
    """Records -> a padded batch: input_ids, attention_mask, pixel_values, and labels when training.

    Training pads on the right and puts the answer's tokens (and EOS) in labels, -100 elsewhere;
    generation pads on the left, so that every row's new tokens start at the same position.
    """

    def __init__(self, processor, train: bool):
        self.processor, self.train, tok = processor, train, processor.tokenizer
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        ids, labels, pixels = [], [], []
        for r in records:
            text = PROMPT.format(human=r["conversations"][0]["value"])
            with Image.open(r["image"]) as image:
                enc = self.processor(images=image.convert("RGB"), text=text, return_tensors="pt")
            prompt = enc["input_ids"][0].tolist()  # <image> expanded into the image tokens
            answer = self.answer_ids(text, r["conversations"][1]["value"].strip()) if self.train else []
            ids.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
            pixels.append(enc["pixel_values"][0])
        T = max(map(len, ids))
        N = len(ids)
        batch = {"input_ids": torch.full((N, T), self.pad), "attention_mask": torch.zeros(N, T, dtype=torch.long),
                 "labels": torch.full((N, T), -100), "pixel_values": torch.stack(pixels)}
        for n, (row, lab) in enumerate(zip(ids, labels)):
            at = slice(0, len(row)) if self.train else slice(T - len(row), T)
            batch["input_ids"][n, at], batch["labels"][n, at] = torch.tensor(row), torch.tensor(lab)
            batch["attention_mask"][n, at] = 1
        if not self.train:
            del batch["labels"]
        return batch

    def answer_ids(self, prompt: str, answer: str) -> list[int]:
        """The answer's tokens as they follow the prompt in one text (what generation must produce), + EOS.

        Tokenized alone, " answer" can differ at the boundary (SentencePiece adds a "▁" of its own).
        """
        tok = self.processor.tokenizer
        alone, joint = tok(prompt)["input_ids"], tok(f"{prompt} {answer}")["input_ids"]
        if joint[:len(alone)] != alone:  # the boundary merged into one token: fall back to the answer alone
            return tok(answer, add_special_tokens=False)["input_ids"] + [self.eos]
        return joint[len(alone):] + [self.eos]


# ---- adapters ---------------------------------------------------------------------------------------

def language_model(model: LlavaForConditionalGeneration) -> torch.nn.Module:
    """The LM inside LLaVA (model.model.language_model since transformers 4.52; .language_model before)."""
    inner = getattr(model, "model", model)
    return inner.language_model if hasattr(inner, "language_model") else model.language_model


def add_adapters(model: LlavaForConditionalGeneration, config: dict) -> None:
    """LoRA or MixLoRA on the LM's targets, as adapters.json describes them; ValueError names a bad target."""
    if config["method"] == "lora":
        add_lora(language_model(model), config["targets"], config["rank"], config["alpha"], config["dropout"])
    else:
        add_mixlora(language_model(model), config["targets"], config["factors"], config["rank"], config["alpha"],
                    config["dropout"], scores=config["scores"])


def save_json(obj, path: Path) -> None:
    save_atomically(lambda f: f.write(json.dumps(obj, indent=1, ensure_ascii=False).encode()), path)


# ---- train and answer ------------------------------------------------------------------------------

def train(args: argparse.Namespace) -> LlavaForConditionalGeneration:
    records = load_records(args.data, args.image_folder, answers=True)
    eval_records = load_records(args.eval_data, args.image_folder, answers=True) if args.eval_data else None
    config = {k: getattr(args, k) for k in ("model", "method", "factors", "rank", "alpha", "scores", "dropout",
                                            "targets", "bf16")}
    set_seed(args.seed)  # the adapters' init: the same in every process
    processor = AutoProcessor.from_pretrained(args.model)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype)
    try:
        add_adapters(model, config)
    except ValueError as e:  # a target that matches nothing, or something that is not an nn.Linear
        raise InputError(f"argument --targets: {e}") from None
    mark_only_adapters_trainable(model)
    if args.bf16:  # AdamW on bfloat16 weights would lose small updates: the adapters stay in float32
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    # Non-reentrant checkpointing (the reentrant kind would need the frozen embeddings' output to require
    # a gradient); transformers 5 renamed the option activation_checkpointing and made it the default.
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    checkpointing = ({"activation_checkpointing": args.gradient_checkpointing} if "activation_checkpointing" in fields
                     else {"gradient_checkpointing": args.gradient_checkpointing,
                           "gradient_checkpointing_kwargs": {"use_reentrant": False}})
    world = int(os.environ.get("WORLD_SIZE", 1))
    targs = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=args.batch_size // (world * args.grad_accum),
        per_device_eval_batch_size=args.batch_size // world, gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs, max_steps=args.steps or -1, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0, seed=args.seed, bf16=args.bf16,
        use_cpu=args.device == "cpu", logging_steps=10, save_strategy="no", report_to="none",
        remove_unused_columns=False,  # the collator reads the records' image and conversations
        ddp_find_unused_parameters=False,  # every adapter parameter gets a gradient, zeros if unchosen
        **checkpointing)
    trainer = MixLoRATrainer(model=model, args=targs, train_dataset=records, eval_dataset=eval_records,
                             data_collator=Collator(processor, train=True))
    trainer.train()
    config.update(steps=trainer.state.global_step, processes=trainer.args.world_size)  # for the record
    if eval_records:
        config["eval_loss"] = trainer.evaluate()["eval_loss"]
    if trainer.is_world_process_zero():
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_atomically(lambda f: torch.save(adapter_state_dict(model), f), out / "adapters.pt")
        save_json(config, out / "adapters.json")  # written last: its presence means a complete save
    return model


@torch.no_grad()
def generate(args: argparse.Namespace) -> list[dict]:
    out = Path(args.out)
    try:
        config = json.loads((out / "adapters.json").read_text())
    except OSError:
        raise InputError(f"{out / 'adapters.json'} not found: train into --out {out} first")
    records = load_records(args.generate, args.image_folder, answers=False)
    device, dtype = torch.device(args.device), torch.bfloat16 if config["bf16"] else torch.float32
    processor = AutoProcessor.from_pretrained(args.model or config["model"])
    model = LlavaForConditionalGeneration.from_pretrained(args.model or config["model"], dtype=dtype)
    add_adapters(model, config)
    load_adapter_state_dict(model, torch.load(out / "adapters.pt", map_location="cpu", weights_only=True))
    model.to(device, dtype).eval()
    collate, tok = Collator(processor, train=False), processor.tokenizer
    answers = []
    for start in tqdm(range(0, len(records), args.batch_size), desc="generate", unit="batch"):
        chunk = records[start:start + args.batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        # The held-routing rule: the prefill routes on the prompt (not the padding), new tokens reuse it.
        with routing_mask(model, batch["attention_mask"].bool()):
            new = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=collate.pad,
                                 eos_token_id=collate.eos, suppress_tokens=[model.config.image_token_id])
        texts = tok.batch_decode(new[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        answers += [{"id": r.get("id", start + i), "answer": t.strip()} for i, (r, t) in enumerate(zip(chunk, texts))]
    save_json(answers, out / "answers.json")
    return answers


def main(argv: list[str] | None = None) -> LlavaForConditionalGeneration | list[dict]:
    args = parse_args(argv)
    try:
        return generate(args) if args.generate else train(args)
    except InputError as e:  # bad records or targets: one line, exit code 2 as for a bad flag, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
