"""QLoRA-style: MixLoRA on a float32, bfloat16, int8 or 4-bit base, and what each costs on this machine.

A random Llama is built from its config and saved to a temporary folder, then loaded back as each base (as a
user loads a checkpoint: dtype=, or a transformers quantization config), in a fresh process per base so that
one's memory does not count for another. MixLoRA (E = 16, r = 4, the released recipe's) goes on every linear of
the LM; the adapters are float32 on every base (add_mixlora's upcast). Printed per base: the base's bytes,
the adapters' bytes, the median time of a training step (forward and
backward inside routing_mask, AdamW) and the process's peak resident memory over the steps.
The base's bytes are what its parameters and buffers store (int8 data and scales; packed 4-bit and absmax).

    python -m hf.qlora_bench                 # a 4-layer Llama of width 512 (17M parameters)
    python -m hf.qlora_bench --quick         # the tests' tiny Llama (width 64): seconds
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import transformers

import cli
from mixlora import adapter_state_dict, add_mixlora, mark_only_adapters_trainable, routing_mask

BASES = ["float32", "bfloat16", "torchao-int8", "bnb-nf4", "bnb-int8"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_base(path: str, base: str) -> transformers.LlamaForCausalLM:
    """The Llama saved at path, loaded as base says: a dtype, or quantized on load (bitsandbytes nf4 computes in bf16)."""
    kwargs = {}
    if base == "bfloat16":
        kwargs["dtype"] = torch.bfloat16
    elif base == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig
        kwargs["quantization_config"] = transformers.TorchAoConfig(Int8WeightOnlyConfig())
    elif base == "bnb-int8":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
    elif base == "bnb-nf4":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    elif base != "float32":
        raise ValueError(f"unknown base {base!r}; expected one of {', '.join(BASES)}")
    return transformers.LlamaForCausalLM.from_pretrained(path, device_map="cpu", **kwargs)


def stored_bytes(t: torch.Tensor) -> int:
    """The bytes t stores: a torchao tensor counts its inner tensors (int8 data, scales), not the float dtype it
    reports; a bitsandbytes weight its int8 or packed 4-bit data and its scales (SCB; absmax). (transformers'
    get_memory_footprint counts torchao's int8 weights as float32, and no scales.)"""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(stored_bytes(getattr(t, name)) for name in names)
    quant_state, scales = getattr(t, "quant_state", None), getattr(t, "SCB", None)
    return t.nbytes + (quant_state.absmax.nbytes if quant_state is not None else 0) + (scales.nbytes if scales is not None else 0)


def memory_kib(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset_peak()) of this process, in KiB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: VmHWM := VmRSS


def measure(path: str, base: str, steps: int, batch_size: int, length: int) -> dict:
    """One base, in this process: its bytes, the adapters' bytes, a step's median seconds and the peak memory."""
    warnings.filterwarnings("ignore", "MatMul8bitLt")  # bitsandbytes int8: float32 inputs go through fp16
    torch.manual_seed(0)
    model = load_base(path, base)
    base_bytes = sum(stored_bytes(t) for t in [*model.parameters(), *model.buffers()])
    add_mixlora(model.model, TARGETS, num_factors=16, rank=4)
    mark_only_adapters_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(3, model.config.vocab_size, (batch_size, length))
    labels = ids.clone()
    labels[:, :length * 3 // 4] = -100  # the prompt: the first 3/4; the answer: the rest
    times = []
    reset_peak()
    before = memory_kib("VmRSS")
    for _ in range(steps + 1):  # the first step (which also creates AdamW's state) is not timed
        t0 = time.perf_counter()
        with routing_mask(model, labels == -100):
            model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"base": base, "base_bytes": base_bytes, "adapter_bytes": sum(t.nbytes for t in adapter_state_dict(model).values()),
            "adapter_dtypes": sorted({str(p.dtype) for p in params}), "step_s": statistics.median(times[1:]),
            "rss_before_mib": before / 1024, "peak_rss_mib": memory_kib("VmHWM") / 1024}


def main(argv: list[str] | None = None) -> list[dict]:
    p = cli.parser(__doc__)
    p.add_argument("--quick", action="store_true", help="the tests' tiny Llama (width 64, 2 layers), 2 timed steps")
    p.add_argument("--bases", default=",".join(BASES), help=f"comma-separated, some of {', '.join(BASES)}")
    p.add_argument("--steps", type=cli.at_least(1), default=None, help="timed steps per base (default 5; 2 with --quick)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # BASE,PATH: measure one base in this process, print JSON
    a = p.parse_args(argv)
    steps, (batch_size, length) = a.steps or (2 if a.quick else 5), ((2, 16) if a.quick else (4, 64))
    if a.child:
        base, path = a.child.split(",", 1)
        print(json.dumps(measure(path, base, steps, batch_size, length)))
        return []
    bases = a.bases.split(",")
    for base in bases:
        if base not in BASES:
            p.error(f"argument --bases: unknown base {base!r}; expected some of {', '.join(BASES)}")
    width, layers = (64, 2) if a.quick else (512, 4)
    config = transformers.LlamaConfig(hidden_size=width, intermediate_size=width * 11 // 4, num_hidden_layers=layers,
                                      num_attention_heads=8 if width > 64 else 4, num_key_value_heads=8 if width > 64 else 2,
                                      vocab_size=64 if a.quick else 4096, max_position_embeddings=256)
    rows = []
    with tempfile.TemporaryDirectory() as path:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        parameters = sum(p.numel() for p in model.parameters())
        model.save_pretrained(path)
        del model
        for base in bases:
            argv = [sys.executable, "-m", "hf.qlora_bench", "--child", f"{base},{path}", "--steps", str(steps)]
            argv += ["--quick"] if a.quick else []
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"error: the {base} base failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"Llama of width {width}, {layers} layers, {parameters / 1e6:.1f}M parameters; MixLoRA E = 16, r = 4 on its "
          f"7 linears per layer; batch {batch_size} x {length} tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {steps} steps\n")
    first = rows[0]
    print("| base | base MiB | adapters MiB (dtype) | adapters / base | step s | vs " + first["base"] +
          " | peak RSS MiB (before steps) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['base']} | {r['base_bytes'] / 2**20:.2f} | {r['adapter_bytes'] / 2**20:.2f} "
              f"({', '.join(d.removeprefix('torch.') for d in r['adapter_dtypes'])}) | "
              f"{r['adapter_bytes'] / r['base_bytes']:.2f} | {r['step_s']:.3f} | {r['step_s'] / first['step_s']:.2f}x | "
              f"{r['peak_rss_mib']:.0f} ({r['rss_before_mib']:.0f}) |")
    return rows


if __name__ == "__main__":
    main()
