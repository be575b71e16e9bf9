"""What a 7B run holds in memory: the frozen base, the adapters, their gradients and AdamW's state.

    python -m hf.count_7b                         # prints the markdown table on hf/README.md
    python -m hf.count_7b --factors 8 --rank 2    # MixLoRA at another E and r (LoRA stays r = 4, 32)

Counted, not estimated: each model is built from its config (written here from the released
checkpoints' config.json: llava-hf/llava-1.5-7b-hf, Qwen/Qwen2-VL-7B-Instruct) on the `meta` device,
which has shapes and no storage, so nothing is downloaded or allocated; then finetune_vlm's own
add_adapters puts LoRA or MixLoRA on every linear of its language model, and the parameters are
summed. Bytes: the base in bfloat16 (2 per parameter, as --bf16 loads it); the adapters in float32
(4), their gradient (4) and AdamW's two moments (8), as the script trains them.
"""

import argparse

import torch
import transformers

import cli
from hf.finetune_vlm import TARGETS, add_adapters
from mixlora import mark_only_adapters_trainable

GiB = 2 ** 30


def llava_15_7b() -> transformers.PretrainedConfig:
    """LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px, a 2-layer MLP projector, Vicuna-7B (Llama: 4096 wide, 32 layers)."""
    return transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                    num_attention_heads=16, image_size=336, patch_size=14,
                                                    projection_dim=768),
        text_config=transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32064),
        image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default")


def qwen2_vl_7b() -> transformers.PretrainedConfig:
    """Qwen2-VL-7B: a 675M ViT, Qwen2-7B (3584 wide, 28 layers, GQA with 4 KV heads of 128: k, v out 512)."""
    return transformers.Qwen2VLConfig(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def count(config: transformers.PretrainedConfig, method: dict) -> tuple[int, int]:
    """(frozen base parameters, trainable adapter parameters) of config's model with method's adapters."""
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(config)
        add_adapters(model, dict(method, alpha=2.0 * method["factors"], dropout=0.0, scores="softmax",
                                 targets=TARGETS.split(",")))
    mark_only_adapters_trainable(model)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return frozen, sum(p.numel() for p in model.parameters() if p.requires_grad)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser(__doc__)
    p.add_argument("--factors", type=cli.at_least(1), default=16, help="MixLoRA's E (>= r)")
    p.add_argument("--rank", type=cli.at_least(1), default=4, help="MixLoRA's r")
    args = p.parse_args(argv)
    if args.factors < args.rank:
        p.error(f"argument --factors: expected E >= --rank {args.rank}, got {args.factors}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    methods = {"LoRA r = 4": dict(method="lora", rank=4, factors=4),
               "LoRA r = 32": dict(method="lora", rank=32, factors=32),
               f"MixLoRA E = {args.factors}, r = {args.rank}": dict(method="mixlora", rank=args.rank, factors=args.factors)}
    print("| model | adapters | trainable parameters | adapters + grads + AdamW (16 B each) | frozen base (bf16) |")
    print("|---|---|---:|---:|---:|")
    for name, config in [("LLaVA-1.5-7B", llava_15_7b()), ("Qwen2-VL-7B", qwen2_vl_7b())]:
        for label, method in methods.items():
            frozen, trained = count(config, method)
            print(f"| {name} | {label} | {trained / 1e6:.1f} M | {16 * trained / GiB:.2f} GiB "
                  f"| {frozen / 1e9:.2f} B: {2 * frozen / GiB:.2f} GiB |")


if __name__ == "__main__":
    main()
