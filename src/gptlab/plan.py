"""`gptlab plan`: what a pretraining run will cost (parameters, FLOPs, memory, time) before launching it.

Parameter and FLOP counts come from gptlab.model itself, built on the meta device (no memory, no init
cost), so the plan can never disagree with the model that trains. Memory and time are estimates whose
assumptions the report states: plain data parallel (DDP) or FSDP full sharding, bf16 autocast with flash
attention, and an MFU (model FLOPs utilisation) the caller picks.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from gptlab import paths
from gptlab.config import GptlabError, Params

GPT2_IDS = 50257  # GPT-2's tokenizer: 50,000 merges + 256 bytes + <|endoftext|>
CHAR_IDS_GUESS = 256  # a char vocabulary is only known after tokenize; a byte's worth is a fair guess
DEFAULT_GPUS = 1
DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16 (1979 is with 2:4 sparsity)
DEFAULT_MFU = 0.40  # a well-tuned GPT-2-scale run on H100s reaches roughly 0.35-0.50
# bytes per parameter held by each GPU under DDP: fp32 weights, fp32 grads, AdamW's exp_avg and exp_avg_sq
WEIGHT_BYTES, GRAD_BYTES, ADAM_BYTES = 4, 4, 8
GIB = 2**30


class PlanError(GptlabError):
    """An assumption that cannot hold (no GPUs, an MFU above 1); the message names the option."""


def check_assumptions(gpus: int, peak_tflops: float, mfu: float, micro_batch_size: int | None) -> None:
    if gpus < 1:
        raise PlanError(f"--gpus: must be at least 1, got {gpus}")
    if not peak_tflops > 0:  # `not >` also rejects nan
        raise PlanError(f"--peak_tflops: must be positive, got {peak_tflops}")
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu: must lie in (0, 1], got {mfu}")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise PlanError(f"--micro_batch_size: must be at least 1, got {micro_batch_size}")


def tokenizer_ids(params: Params, tokenizer_dir: str | Path = paths.TOKENIZER) -> tuple[int, str]:
    """(ids the tokenizer will have, a note on where that number comes from)."""
    kind = params.tokenizer.kind
    if kind == "gpt2":
        return GPT2_IDS, "gpt2 tokenizer"
    if kind == "bpe":
        return params.tokenizer.vocab_size, "bpe tokenizer.vocab_size"
    return char_ids(Path(tokenizer_dir))


def char_ids(tokenizer_dir: Path) -> tuple[int, str]:
    """A char tokenizer's size: data/tokenizer's if tokenize has built a char one there, else a guess."""
    from gptlab.tokenizer import META_FILE, TokenizerError, load_tokenizer

    if (tokenizer_dir / META_FILE).is_file():
        try:
            tok = load_tokenizer(tokenizer_dir)
        except TokenizerError:  # a damaged folder is tokenize's problem to report; the plan only estimates
            tok = None
        if tok is not None and tok.kind == "char":
            return tok.n_vocab, f"char tokenizer in {tokenizer_dir}"
    return CHAR_IDS_GUESS, f"char tokenizer not built yet: UNKNOWN size, {CHAR_IDS_GUESS} assumed"


def count_model(params: Params, vocab_rows: int) -> tuple[int, int, int]:
    """(parameters incl. wpe, parameters without wpe, training FLOPs per token), from the model's own methods."""
    import torch

    from gptlab.model import GPT, GPTConfig

    m = params.model
    cfg = GPTConfig(m.n_layer, m.n_head, m.n_embd, m.block_size, vocab_rows, m.bias, m.dropout)
    with torch.device("meta"):  # shapes only: a 124M model costs no memory and no init time
        model = GPT(cfg)
    return model.num_params(non_embedding=False), model.num_params(), model.flops_per_token()


def activation_bytes(n_layer: int, batch: int, block: int, width: int, vocab_rows: int) -> int:
    """Activations one micro-batch keeps for the backward pass, per GPU, bf16 autocast + flash attention.

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (eq. 1): a
    transformer layer stores s*b*h*(34 + 5*a*s/h) bytes with 16-bit activations (s = T, b = B, h = C,
    a = heads). The 5*a*s/h term is the attention scores, softmax and its dropout mask; flash attention
    never materialises them, leaving 34*B*T*C per layer (a slight overestimate at dropout 0, where the two
    1-byte dropout masks are not kept). On top, the loss takes the logits in fp32 (losses.token_loss
    calls .float()), and log_softmax keeps that copy: 4*B*T*V bytes. Embeddings and ln_f are a few B*T*C
    more and ignored.
    """
    per_layer = 34 * batch * block * width
    logits = 4 * batch * block * vocab_rows
    return n_layer * per_layer + logits


def memory(n_params: int, acts: int, shards: int) -> dict[str, int]:
    """Bytes per GPU; weights, grads and AdamW state divided over `shards` GPUs (1 = DDP, N = FSDP)."""
    out = {
        "weights": -(-WEIGHT_BYTES * n_params // shards),  # ceil: a shard is padded, never truncated
        "grads": -(-GRAD_BYTES * n_params // shards),
        "optimizer": -(-ADAM_BYTES * n_params // shards),
        "activations": acts,
    }
    out["total"] = sum(out.values())
    return out


def plan(params: Params, gpus: int = DEFAULT_GPUS, peak_tflops: float = DEFAULT_PEAK_TFLOPS,
         mfu: float = DEFAULT_MFU, micro_batch_size: int | None = None,
         tokenizer_dir: str | Path = paths.TOKENIZER) -> dict:
    """The cost of `params`' pretraining run on `gpus` GPUs, as a JSON-ready dict (bytes, FLOPs, seconds)."""
    from gptlab.tokenizer import padded_vocab_size

    check_assumptions(gpus, peak_tflops, mfu, micro_batch_size)
    m = params.model
    train = params.pretrain
    if micro_batch_size is not None:
        train = dataclasses.replace(train, micro_batch_size=micro_batch_size)
    accum = train.grad_accum_steps(m.block_size, gpus, "pretrain")  # ConfigError if the geometry does not divide
    ids, vocab_source = tokenizer_ids(params, tokenizer_dir)
    rows = padded_vocab_size(ids)
    total, non_embedding, flops_per_token = count_model(params, rows)
    tokens = train.max_steps * train.tokens_per_step
    flops = flops_per_token * tokens
    achieved = gpus * peak_tflops * 1e12 * mfu  # FLOP/s the whole job sustains
    acts = activation_bytes(m.n_layer, train.micro_batch_size, m.block_size, m.n_embd, rows)
    return {
        "preset": params.preset,
        "model": {"n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd, "block_size": m.block_size,
                  "tokenizer_kind": params.tokenizer.kind, "tokenizer_ids": ids, "vocab_source": vocab_source,
                  "vocab_rows": rows},
        "parameters": total,
        "parameters_non_embedding": non_embedding,
        "flops_per_token": flops_per_token,
        "tokens_per_step": train.tokens_per_step,
        "micro_batch_size": train.micro_batch_size,
        "grad_accum_steps": accum,
        "steps": train.max_steps,
        "total_tokens": tokens,
        "total_flops": flops,
        "memory_per_gpu_bytes": {"ddp": memory(total, acts, 1), "fsdp": memory(total, acts, gpus)},
        "seconds": flops / achieved,
        "hours": flops / achieved / 3600,
        "tokens_per_second": achieved / flops_per_token,
        "assumptions": {"gpus": gpus, "peak_tflops": peak_tflops, "mfu": mfu,
                        "precision": "bf16 autocast, fp32 master weights and AdamW state",
                        "attention": "flash attention (no T x T score matrices stored)",
                        "activations": "34*B*T*C bytes per layer (Korthikanti et al. 2022) + 4*B*T*V fp32 logits",
                        "time": "total FLOPs / (gpus * peak * mfu)"},
    }


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _count(n: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h ({seconds:,.0f} s)"


def format_plan(p: dict) -> str:
    """The plan as aligned text for a terminal: one `label  value` row each, then memory, then assumptions."""
    m, a, gpus = p["model"], p["assumptions"], p["assumptions"]["gpus"]
    geometry = (f"{p['micro_batch_size']} seqs x {m['block_size']} tokens x {gpus} GPU(s)"
                f" x {p['grad_accum_steps']} accumulation step(s)")
    rows = [
        ("model", f"{m['n_layer']} layers, {m['n_head']} heads, {m['n_embd']} wide, block {m['block_size']}"),
        ("vocab", f"{m['vocab_rows']:,} rows = {m['tokenizer_ids']:,} ids padded to 64s ({m['vocab_source']})"),
        ("parameters", f"{p['parameters']:,} ({_count(p['parameters'])}; incl. position embeddings)"),
        ("  non-embedding", f"{p['parameters_non_embedding']:,} (without position embeddings)"),
        ("FLOPs per token", f"{p['flops_per_token']:,} (training: 6N + 12*n_layer*n_embd*block_size)"),
        ("tokens per step", f"{p['tokens_per_step']:,} = {geometry}"),
        ("steps", f"{p['steps']:,}"),
        ("total tokens", f"{p['total_tokens']:,} ({_count(p['total_tokens'])})"),
        ("total FLOPs", f"{p['total_flops']:.3e}"),
        ("time", f"{_duration(p['seconds'])} on {gpus} GPU(s), {p['tokens_per_second']:,.0f} tokens/s"),
    ]
    lines = [f"pretrain plan ({'preset ' + p['preset'] if p['preset'] else 'no preset'})"]
    lines += [f"  {label:<17}{value}" for label, value in rows]
    lines += ["", f"  {'memory per GPU':<17}{'DDP':>12}{f'FSDP over {gpus}':>16}"]
    mem = p["memory_per_gpu_bytes"]
    for key, label in (("weights", "weights fp32"), ("grads", "grads fp32"), ("optimizer", "AdamW state"),
                       ("activations", "activations"), ("total", "total")):
        lines.append(f"    {label:<15}{_size(mem['ddp'][key]):>12}{_size(mem['fsdp'][key]):>16}")
    lines += ["", "assumptions (each option named can change it):"]
    lines += [f"  {line}" for line in (
        f"{a['peak_tflops']:g} TFLOP/s peak per GPU (--peak_tflops; 989 = H100 SXM dense bf16)",
        f"MFU {a['mfu']:g} (--mfu) on {gpus} GPU(s) (--gpus); time = {a['time']}",
        f"{a['precision']}; {a['attention']}",
        f"activations at micro-batch {p['micro_batch_size']} (--micro_batch_size): {a['activations']}",
        "FSDP: full sharding of weights, grads and AdamW state; the one layer it gathers is not counted",
    )]
    return "\n".join(lines)
