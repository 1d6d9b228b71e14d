"""Benchmark: tokens/s and MFU of GPT-2 124M training steps on one CUDA GPU.

    python bench/gpu_mfu.py                          # writes bench/results/gpu_mfu.json
    python bench/gpu_mfu.py --no-compile --batch-size 8
    python bench/gpu_mfu.py --device cpu --steps 2 --tiny   # smoke test of the step code, writes nothing

The model is gptlab.model.GPT at GPT-2 small's size (12 layers, 12 heads, 768 wide, block 1024, vocab 50304,
biases, no dropout). One step = one micro-batch (--batch-size sequences, 16 by default) of random token ids:
forward under torch.autocast(cuda, bfloat16) with TF32 matmuls allowed, gptlab.losses.token_loss, backward,
grad clip 1.0, fused AdamW (gptlab.train.build_optimizer), zero_grad. The model is torch.compile'd unless
--no-compile; attention is F.scaled_dot_product_attention (is_causal), restricted to the flash backend unless
--sdpa any. Batches live in pinned host memory (a few fixed ones, never written after creation, so an async
copy can not race a write) and go to the GPU with non_blocking=True, as a real loader would.

--warmup steps (compilation, cuDNN/cuBLAS autotuning, allocator growth) are run and excluded; then --steps
steps are timed between two torch.cuda.synchronize() calls. tokens/s = steps x batch x block / seconds.
MFU = tokens/s x GPT.flops_per_token() / peak, the GPU's dense bf16 peak from a table by device name (H100
SXM / H200 989 TFLOP/s, H100 PCIe 756, A100 312), or --peak-tflops.

Without CUDA (and without --device cpu) it prints one line saying a GPU is needed and exits 0, writing nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from machine_facts import write_report

from gptlab.config import TrainConfig
from gptlab.losses import token_loss
from gptlab.model import GPT, GPTConfig
from gptlab.train import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
GPT2_124M = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=True, dropout=0.0)
TINY = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=256, bias=True, dropout=0.0)
N_BATCHES = 8  # distinct pinned host batches, cycled

# dense (no sparsity) bf16 tensor-core peak, FLOP/s; first matching row wins (names as torch reports them)
PEAK_BF16 = (
    (("H100", "PCIE"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (("H200",), 989e12),
    (("GH200",), 989e12),
    (("A100",), 312e12),  # SXM4 and PCIe alike
)


def peak_flops(device_name: str) -> float | None:
    name = device_name.upper()
    for keys, flops in PEAK_BF16:
        if all(k in name for k in keys):
            return flops
    return None


def make_batches(config: GPTConfig, batch_size: int, pin: bool, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(N_BATCHES):
        ids = torch.randint(0, config.vocab_size, (batch_size, config.block_size + 1), generator=gen)
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()  # next-token targets
        out.append((x.pin_memory(), y.pin_memory()) if pin else (x, y))
    return out


def sdpa_context(backend: str, device: torch.device):
    if backend == "flash" and device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    return contextlib.nullcontext()


def build(args, device: torch.device):
    config = TINY if args.tiny else GPT2_124M
    torch.manual_seed(0)
    model = GPT(config).to(device)
    model.train()
    cfg = TrainConfig()
    optimizer = build_optimizer(model, cfg, device)
    step_model = torch.compile(model) if args.compile else model
    return config, model, step_model, optimizer, cfg.grad_clip


def train_step(step_model, optimizer, params, batch, device: torch.device, clip: float, sdpa: str):
    x, y = (t.to(device, non_blocking=True) for t in batch)
    with torch.autocast(device.type, dtype=torch.bfloat16), sdpa_context(sdpa, device):
        logits = step_model(x)
        loss = token_loss(logits, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", "--batch_size", type=int, default=16, help="micro-batch (sequences per step)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation included)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: on for CUDA, off for --device cpu)")
    parser.add_argument("--sdpa", choices=("flash", "any"), default="flash",
                        help="flash: only SDPA's flash-attention backend (fails if unusable); any: torch picks")
    parser.add_argument("--peak-tflops", "--peak_tflops", type=float, default=None,
                        help="dense bf16 peak of the GPU in TFLOP/s (default: from the table by device name)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test of the step code)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide model, for smoke tests")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON to write (default: bench/results/gpu_mfu.json on CUDA; nothing on CPU)")
    args = parser.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_mfu: needs a CUDA GPU (none found); nothing measured, nothing written")
        return
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, not {args.device}")
    if args.compile is None:
        args.compile = device.type == "cuda"
    out = args.out if args.out is not None else (
        ROOT / "bench" / "results" / "gpu_mfu.json" if device.type == "cuda" else None)

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (e.g. none) use TF32
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    config, model, step_model, optimizer, clip = build(args, device)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = make_batches(config, args.batch_size, pin=device.type == "cuda")
    tokens_per_step = args.batch_size * config.block_size

    t0 = time.perf_counter()
    for i in range(args.warmup):
        train_step(step_model, optimizer, params, batches[i % N_BATCHES], device, clip, args.sdpa)
    sync(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    sync(device)
    t0 = time.perf_counter()
    losses = []
    for i in range(args.steps):
        losses.append(train_step(step_model, optimizer, params, batches[i % N_BATCHES], device, clip, args.sdpa))
    sync(device)
    seconds = time.perf_counter() - t0
    last_loss = losses[-1].item() if losses else float("nan")
    if losses and not torch.isfinite(torch.stack(losses)).all():
        raise RuntimeError("a loss was not finite")

    tokens_per_s = args.steps * tokens_per_step / seconds
    flops_per_token = model.flops_per_token()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    if args.peak_tflops is not None:
        peak, peak_source = args.peak_tflops * 1e12, "--peak-tflops"
    elif device.type == "cuda":
        peak, peak_source = peak_flops(name), "table by device name (dense bf16)"
    else:
        peak, peak_source = None, "none (CPU smoke test)"
    mfu = tokens_per_s * flops_per_token / peak if peak else None

    report = {
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(mfu, 4) if mfu is not None else None,
        "ms_per_step": round(1000 * seconds / args.steps, 3),
        "peak_flops": peak,
        "peak_source": peak_source if peak or device.type == "cpu" else
        f"{peak_source}: {name} is not in it, pass --peak-tflops",
        "flops_per_token": flops_per_token,
        "n_params_non_embedding": model.num_params(),
        "model": {k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size",
                                                    "bias", "dropout")},
        "batch_size": args.batch_size,
        "tokens_per_step": tokens_per_step,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "warmup_seconds": round(warmup_s, 2),
        "compile": args.compile,
        "sdpa_backend": "flash only" if args.sdpa == "flash" and device.type == "cuda" else "torch's choice",
        "autocast": "bfloat16",
        "tf32": device.type == "cuda",
        "optimizer": f"AdamW fused={optimizer.defaults.get('fused')}",
        "grad_clip": clip,
        "last_loss": round(last_loss, 4),
        "max_memory_allocated_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda" else None,
        "device": device.type,
        "gpu": name if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": command,
    }
    mfu_text = f"{mfu:.1%}" if mfu is not None else "n/a"
    print(f"{name}: {tokens_per_s:,.0f} tok/s, {report['ms_per_step']} ms/step, MFU {mfu_text} "
          f"(batch {args.batch_size} x {config.block_size}, compile={args.compile}, loss {last_loss:.3f})")
    if out is not None:
        write_report(out, report)


if __name__ == "__main__":
    main()
