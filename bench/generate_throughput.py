"""Benchmark: gptlab's generation against transformers' GPT2LMHeadModel.generate, tokens/s on the CPU.

    python bench/generate_throughput.py            # writes bench/results/generate_throughput.json
    python bench/generate_throughput.py --quick    # 3 rounds, prints the figures, writes nothing

Both sides decode the SAME weights (ours -> to_hf_state_dict -> theirs) from the SAME prompts with the same
settings and thread count, side by side in one run:
    ours:   gptlab.sampling.generate(model, prompts, Sampling(200))  # greedy, no stop id, KV cache on
    theirs: GPT2LMHeadModel.generate(idx, attention_mask=ones, do_sample=False, max_new_tokens=200,
                                     min_new_tokens=200, eos_token_id=None)   # greedy, its default KV cache
Model: 6 layers, 6 heads, 384 wide, vocab 50304, block 1024 (GPT-2 small's shape at a quarter of the width),
random weights; prompts of 16 random token ids; batch 1 and 8. tokens/s = batch x 200 new tokens / the wall
time of the whole generate call (prefill included). Before timing, both sides' greedy tokens are compared and
the agreement recorded (they share weights, so only float rounding could make them part).

Per batch size, after a warmup call per side, --rounds rounds alternate the two sides (the order flips every
round); each round is one generate call per side. Figures are medians over the rounds that began on a quiet
machine (train_throughput.Quiet; all rounds if fewer than half did); ratio_vs_hf = our median tokens/s /
theirs, ratio_paired the median of per-round ratios, ratio_best best round over best round.
Where our time goes (torch.profiler): a decode step is GPT.forward on one new token with the KV cache, and it is
memory-bound, reading every weight once (~120 MB: the output head's 77 MB, the blocks' 42 MB). The output head
decides it: x @ W.T on the (vocab, C) matrix runs ~9 ms at batch 1 and ~12 ms at batch 8 on 2 cores (MKL's
few-row and matrix-vector kernels read that layout slowly), (W @ x.T).T ~2 ms and ~5 ms, so the last position's
logits are computed that way round (gptlab.model.last_logits; transformers' generate uses x @ W.T). torch.compile
of the decode step (inductor, dynamic shapes) was tried: ~50 s to compile on 2 cores and no faster (within 2%),
so it is not offered.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from machine_facts import torch_machine, write_report
from train_throughput import Quiet

from gptlab.model import GPT, GPTConfig, to_hf_state_dict
from gptlab.sampling import Sampling, generate

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 1024, "vocab_size": 50304}
PROMPT_TOKENS = 16
NEW_TOKENS = 200
BATCHES = (1, 8)


def build_models(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    ours = GPT(GPTConfig(**MODEL, bias=True, dropout=0.0)).eval()
    hcfg = GPT2Config(vocab_size=MODEL["vocab_size"], n_positions=MODEL["block_size"], n_embd=MODEL["n_embd"],
                      n_layer=MODEL["n_layer"], n_head=MODEL["n_head"], activation_function="gelu_new",
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    theirs = GPT2LMHeadModel(hcfg).eval()
    missing, unexpected = theirs.load_state_dict(to_hf_state_dict(ours), strict=False)
    assert not unexpected and all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing), (missing, unexpected)
    return ours, theirs


def hf_generate(theirs, idx: torch.Tensor) -> torch.Tensor:
    """The new tokens (B, NEW_TOKENS) of transformers' greedy generate, never stopping early."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=None, bos_token_id=None, use_cache=True)
    with torch.inference_mode():
        out = theirs.generate(idx, attention_mask=torch.ones_like(idx), generation_config=config)
    return out[:, idx.shape[1]:]


def our_generate(ours, idx: torch.Tensor) -> torch.Tensor:
    return torch.tensor(generate(ours, idx.tolist(), Sampling(NEW_TOKENS)))


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    assert a.shape == b.shape, (a.shape, b.shape)
    same = (a == b).all(dim=0)
    first = int((~same).nonzero()[0]) if not bool(same.all()) else None
    return {"greedy_tokens_equal": first is None, "token_agreement": round(float((a == b).float().mean()), 4),
            "first_different_step": first}


def bench_batch(batch: int, ours, theirs, args) -> dict:
    gen = torch.Generator().manual_seed(batch)
    idx = torch.randint(0, MODEL["vocab_size"], (batch, PROMPT_TOKENS), generator=gen)
    check = agreement(our_generate(ours, idx), hf_generate(theirs, idx))  # also the warmup of each side
    print(f"batch {batch}: greedy tokens agree {check['token_agreement']:.2%}", flush=True)
    sides = {"ours": lambda: our_generate(ours, idx), "transformers": lambda: hf_generate(theirs, idx)}
    rounds = []
    for r in range(args.rounds):
        quiet = args.quiet.wait()
        names = list(sides) if r % 2 == 0 else list(reversed(sides))
        secs = {name: _time(sides[name]) for name in names}
        rounds.append({**{f"{_short(n)}_tokens_per_s": batch * NEW_TOKENS / s for n, s in secs.items()},
                       "first": names[0], **quiet})
        row = rounds[-1]
        print(f"  batch {batch} round {r + 1}/{args.rounds}: ours {row['ours_tokens_per_s']:,.0f} tok/s | "
              f"transformers {row['hf_tokens_per_s']:,.0f} tok/s | "
              f"{row['ours_tokens_per_s'] / row['hf_tokens_per_s']:.3f}x", flush=True)
    return summarize(rounds, batch, check)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _short(name: str) -> str:
    return {"transformers": "hf"}.get(name, name)


def summarize(rounds: list[dict], batch: int, facts: dict) -> dict:
    # the figures come from the rounds that began on a quiet machine, or from all if fewer than half did
    quiet = [r for r in rounds if r["others_busy_before"] <= 0.10 and r["probe_slowdown_before"] <= 1.15]
    used = quiet if 2 * len(quiet) >= len(rounds) else rounds
    med = {k: statistics.median(r[k] for r in used) for k in rounds[0] if k.endswith("_tokens_per_s")}
    out = {
        "ratio_vs_hf": round(med["ours_tokens_per_s"] / med["hf_tokens_per_s"], 3),
        "ratio_paired": round(statistics.median(r["ours_tokens_per_s"] / r["hf_tokens_per_s"] for r in used), 3),
        "ratio_best": round(max(r["ours_tokens_per_s"] for r in used) / max(r["hf_tokens_per_s"] for r in used), 3),
        "rounds_used": f"{len(used)} of {len(rounds)} ({'the quiet ones' if used is quiet else 'all: too few quiet'})",
        **{k: round(v, 1) for k, v in med.items()},
        "ours_ms_per_step": round(1000 * batch / med["ours_tokens_per_s"], 2),
        "hf_ms_per_step": round(1000 * batch / med["hf_tokens_per_s"], 2),
    }
    rows = [{k: (round(v, 1) if k.endswith("tokens_per_s") else v) for k, v in r.items()} for r in rounds]
    return {**out, **facts, "rounds": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch.set_num_threads")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved timing rounds per batch size")
    parser.add_argument("--quick", action="store_true", help="3 rounds, no waiting for quiet; writes no JSON")
    parser.add_argument("--quiet-wait", type=float, default=20.0,
                        help="seconds to wait at most, before each round, for a quiet machine (0: do not wait)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default bench/results/generate_throughput.json; --quick: none)")
    args = parser.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    if args.quick:
        args.rounds, args.quiet_wait = 3, 0.0
    out = args.out or (None if args.quick else ROOT / "bench" / "results" / "generate_throughput.json")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    args.quiet = Quiet(args.quiet_wait)

    ours, theirs = build_models()
    results = {f"batch_{b}": bench_batch(b, ours, theirs, args) for b in BATCHES}
    for name, entry in results.items():
        print(f"{name}: ours {entry['ours_tokens_per_s']:,.0f} tok/s, transformers {entry['hf_tokens_per_s']:,.0f} "
              f"tok/s, ratio {entry['ratio_vs_hf']}x (paired {entry['ratio_paired']}x)", flush=True)
    report = {
        "ratio_vs_hf": results["batch_1"]["ratio_vs_hf"],
        "ratio_vs_hf_batch8": results["batch_8"]["ratio_vs_hf"],
        **results,
        "ratio_vs_hf_note": "median our tokens/s / median transformers GPT2LMHeadModel.generate tokens/s over "
                            "interleaved rounds; same weights, prompts, greedy settings and threads",
        "settings": {"model": MODEL, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "batches": BATCHES,
                     "decoding": "greedy; ours without a stop id, transformers with eos_token_id=None and "
                                 "min_new_tokens=max_new_tokens, so both make every token",
                     "hf_attn_implementation": theirs.config._attn_implementation,
                     "hf_cache": "transformers' default (DynamicCache)", "threads": args.threads,
                     "rounds": args.rounds},
        "what_is_timed": "one whole generate call (prefill of the prompt, then one step per new token) per side "
                         "per round; tokens/s = batch x new tokens / its wall time",
        "machine": torch_machine(args.threads),
        "command": command,
    }
    if out is not None:
        write_report(out, report)


if __name__ == "__main__":
    main()
