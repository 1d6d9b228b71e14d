"""Benchmark: gptlab's GPT training step against transformers' GPT2LMHeadModel, tokens/s on the CPU, plus MFU.

    python bench/train_throughput.py      # writes bench/results/train_throughput.json

Both sides run the SAME training step on the SAME weights, batches, optimizer and thread count, side by side
in one run; the only difference is the model class:
    logits = model(idx)                      # ours: gptlab.model.GPT; theirs: GPT2LMHeadModel(idx).logits
    loss = gptlab.losses.token_loss(logits, targets)
    loss.backward()
    clip_grad_norm_(params, 1.0)
    optimizer.step()                         # gptlab.train.build_optimizer(model, TrainConfig(), cpu) for both:
    optimizer.zero_grad(set_to_none=True)    #   same decay / no-decay groups, same fused AdamW
Theirs is GPT2Config with the same sizes (n_positions = block, gelu_new, every dropout 0, tied embeddings,
the default attn_implementation and use_cache, both recorded), loaded with our initial weights
(to_hf_state_dict), so both start from the same point; the logits are checked to agree before timing. Both
sides use the same loss function on the logits (not HF's labels= path), so the loss costs the same.

Configs: small (4 layers, 4 heads, 128 wide, block 64, batch 12, vocab 65) and large (6 layers, 6 heads, 384
wide, block 256, batch 8, vocab 50304). Per config, after warmup, --rounds timing rounds alternate the two sides
(the order flips every round, so drift and cache effects hit both); each round times as many steps as fill
about --round-seconds (one step for large), so the two sides of a round are seconds apart. Reported figures are
medians over the rounds that began on a quiet machine (all rounds if fewer than half did; see Quiet);
ratio_vs_hf = our median tokens/s / theirs. Two checks: ratio_paired, the median of the
per-round ratios (drift within a round cancels), and ratio_best, our best round / their best round (the least
disturbed speed of each; other tenants of a VM slow rounds down in ways /proc/stat does not show).

MFU = our tokens/s x GPT.flops_per_token() / peak, where the peak is the best fp32 matmul rate measured in this
run with the same thread count (square (n x n) @ (n x n) products, several sizes and repeats, interleaved with
the timing rounds). The machine may be shared: before each round the script waits (up to --quiet-wait s) for
it to be quiet (see Quiet) and records how busy it was.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from machine_facts import busy_fraction, torch_machine, write_report

from gptlab.config import TrainConfig
from gptlab.losses import token_loss
from gptlab.model import GPT, GPTConfig, to_hf_state_dict
from gptlab.train import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "small": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch": 12, "vocab_size": 65},
    "large": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "batch": 8, "vocab_size": 50304},
}
MATMUL_SIZES = (1024, 2048, 3072)
N_BATCHES = 4  # distinct random batches, cycled


class Quiet:
    """Waits for a quiet machine before each round. Two signs of others' work: the share of CPU time other
    processes of this machine use (/proc/stat), and a probe - a fixed ~50 ms of small matmuls and GELUs on our
    threads - running slower than its best time so far, which also catches what /proc/stat can not see (other
    tenants of a VM's physical cores, memory bandwidth). Waits up to max_wait s for both to settle (busy at most
    10%, probe within 15% of its best), then goes on regardless and records the last readings."""

    def __init__(self, max_wait: float):
        self.max_wait = max_wait
        self.a, self.b = torch.randn(768, 128), torch.randn(128, 512)
        self.best_probe = min(self._probe() for _ in range(5))

    def _probe(self) -> float:
        t0 = time.perf_counter()
        for _ in range(10):
            torch.nn.functional.gelu(torch.mm(self.a, self.b), approximate="tanh")
        return time.perf_counter() - t0

    def wait(self) -> dict:
        deadline = time.monotonic() + self.max_wait
        while True:
            busy, probe = busy_fraction(0.2), self._probe()
            self.best_probe = min(self.best_probe, probe)
            slowdown = probe / self.best_probe
            if (busy <= 0.10 and slowdown <= 1.15) or time.monotonic() >= deadline:
                return {"others_busy_before": round(busy, 3), "probe_slowdown_before": round(slowdown, 2)}
            time.sleep(0.5)


def matmul_peak(sizes=MATMUL_SIZES, repeats: int = 3) -> dict[str, float]:
    """Best fp32 matmul FLOP/s per size, (n x n) @ (n x n) = 2 n^3 FLOPs, with the current thread count."""
    best = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)  # warm
        t = min(_time_mm(a, b, out) for _ in range(repeats))
        best[str(n)] = 2 * n**3 / t
    return best


def _time_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> float:
    t0 = time.perf_counter()
    torch.mm(a, b, out=out)
    return time.perf_counter() - t0


class Side:
    """One model + its optimizer + the training step, as described in the module docstring."""

    def __init__(self, name: str, model: torch.nn.Module, forward, batches, clip: float, cfg: TrainConfig):
        self.name, self.model, self.forward, self.batches, self.clip = name, model, forward, batches, clip
        self.model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = build_optimizer(model, cfg, torch.device("cpu"))
        self.i = 0

    def step(self) -> float:
        idx, targets = self.batches[self.i % len(self.batches)]
        self.i += 1
        logits = self.forward(idx)
        loss = token_loss(logits, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def run(self, steps: int) -> float:
        """Wall seconds for `steps` training steps."""
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        return time.perf_counter() - t0


def build_sides(spec: dict, seed: int = 0) -> tuple[Side, Side, dict]:
    from transformers import GPT2Config, GPT2LMHeadModel

    gcfg = GPTConfig(n_layer=spec["n_layer"], n_head=spec["n_head"], n_embd=spec["n_embd"],
                     block_size=spec["block_size"], vocab_size=spec["vocab_size"], bias=True, dropout=0.0)
    torch.manual_seed(seed)
    ours = GPT(gcfg)
    hcfg = GPT2Config(vocab_size=spec["vocab_size"], n_positions=spec["block_size"], n_embd=spec["n_embd"],
                      n_layer=spec["n_layer"], n_head=spec["n_head"], activation_function="gelu_new",
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    hcfg.n_ctx = spec["block_size"]  # older transformers read it; newer ones ignore it
    theirs = GPT2LMHeadModel(hcfg)
    missing, unexpected = theirs.load_state_dict(to_hf_state_dict(ours), strict=False)
    assert not unexpected and all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing), (missing, unexpected)
    assert theirs.lm_head.weight is theirs.transformer.wte.weight or \
        theirs.lm_head.weight.data_ptr() == theirs.transformer.wte.weight.data_ptr(), "HF head is not tied"

    gen = torch.Generator().manual_seed(seed + 1)
    B, T, V = spec["batch"], spec["block_size"], spec["vocab_size"]
    batches = [(torch.randint(0, V, (B, T), generator=gen), torch.randint(0, V, (B, T), generator=gen))
               for _ in range(N_BATCHES)]
    with torch.no_grad():
        ours.eval(), theirs.eval()
        a, b = ours(batches[0][0]), theirs(batches[0][0]).logits
        max_diff = (a - b).abs().max().item()
    assert max_diff < 1e-4, f"ours and transformers' logits differ by {max_diff}"

    cfg = TrainConfig()
    clip = cfg.grad_clip
    assert clip == 1.0
    our_side = Side("ours", ours, ours, batches, clip, cfg)
    their_side = Side("transformers", theirs, lambda idx: theirs(idx).logits, batches, clip, cfg)
    facts = {
        "n_params_non_embedding": ours.num_params(), "n_params_total": ours.num_params(non_embedding=False),
        "flops_per_token": ours.flops_per_token(), "tokens_per_step": B * T,
        "hf_attn_implementation": theirs.config._attn_implementation,
        "hf_use_cache_default": bool(theirs.config.use_cache),
        "optimizer_fused": bool(our_side.opt.defaults.get("fused")),
        "hf_optimizer_fused": bool(their_side.opt.defaults.get("fused")),
        "initial_logits_max_abs_diff": max_diff,
    }
    return our_side, their_side, facts


def bench_config(name: str, spec: dict, args, peaks: list[dict]) -> dict:
    ours, theirs, facts = build_sides(spec)
    tokens_per_step = facts["tokens_per_step"]
    for side in (ours, theirs):  # warmup: allocator, oneDNN primitives, optimizer state
        side.run(args.warmup)
    per_step = max(ours.run(1), theirs.run(1))
    steps = max(1, round(args.round_seconds / per_step))
    rounds = []
    for r in range(args.rounds):
        quiet = args.quiet.wait()
        order = (ours, theirs) if r % 2 == 0 else (theirs, ours)
        secs = {side.name: side.run(steps) for side in order}
        rounds.append({"ours_tokens_per_s": steps * tokens_per_step / secs["ours"],
                       "hf_tokens_per_s": steps * tokens_per_step / secs["transformers"],
                       "first": order[0].name, **quiet})
        if r % 2 == 1:
            peaks.append(matmul_peak())
        row = rounds[-1]
        print(f"  {name} round {r + 1}/{args.rounds}: ours {row['ours_tokens_per_s']:,.0f} tok/s | "
              f"transformers {row['hf_tokens_per_s']:,.0f} tok/s | "
              f"{row['ours_tokens_per_s'] / row['hf_tokens_per_s']:.3f}x", flush=True)
    # the figures come from the rounds that began on a quiet machine (both sides of a round kept or dropped
    # together), or from all rounds if fewer than half did; every round is in "rounds"
    quiet = [r for r in rounds if r["others_busy_before"] <= 0.10 and r["probe_slowdown_before"] <= 1.15]
    used = quiet if 2 * len(quiet) >= len(rounds) else rounds
    ours_tps = statistics.median(r["ours_tokens_per_s"] for r in used)
    hf_tps = statistics.median(r["hf_tokens_per_s"] for r in used)
    return {
        "ratio_vs_hf": round(ours_tps / hf_tps, 3),
        "ratio_paired": round(statistics.median(r["ours_tokens_per_s"] / r["hf_tokens_per_s"] for r in used), 3),
        "ratio_best": round(max(r["ours_tokens_per_s"] for r in used) / max(r["hf_tokens_per_s"] for r in used), 3),
        "rounds_used": f"{len(used)} of {len(rounds)} ({'the quiet ones' if used is quiet else 'all: too few quiet'})",
        "ours_tokens_per_s": round(ours_tps),
        "hf_tokens_per_s": round(hf_tps),
        "ours_ms_per_step": round(1000 * tokens_per_step / ours_tps, 2),
        "hf_ms_per_step": round(1000 * tokens_per_step / hf_tps, 2),
        "config": spec,
        **facts,
        "steps_per_round": steps,
        "rounds": [{k: (round(v) if k.endswith("tokens_per_s") else round(v, 4) if isinstance(v, float) else v)
                    for k, v in r.items()} for r in rounds],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch.set_num_threads")
    parser.add_argument("--rounds", type=int, default=21, help="interleaved timing rounds per config (median kept)")
    parser.add_argument("--round-seconds", type=float, default=2.0,
                        help="target seconds per side per round (at least one step)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side before timing")
    parser.add_argument("--quiet-wait", type=float, default=20.0,
                        help="seconds to wait at most, before each round, for a quiet machine (0: do not wait)")
    parser.add_argument("--only", choices=sorted(CONFIGS), action="append", help="run only these configs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_throughput.json")
    args = parser.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    args.quiet = Quiet(args.quiet_wait)

    peaks = [matmul_peak()]
    results = {}
    for name in args.only or CONFIGS:
        print(f"{name}: {CONFIGS[name]}", flush=True)
        results[name] = bench_config(name, CONFIGS[name], args, peaks)
    peaks.append(matmul_peak())
    by_size = {n: max(p[n] for p in peaks) for n in peaks[0]}
    peak = max(by_size.values())
    for name, entry in results.items():
        entry["mfu"] = round(entry["ours_tokens_per_s"] * entry["flops_per_token"] / peak, 4)
        entry["hf_mfu"] = round(entry["hf_tokens_per_s"] * entry["flops_per_token"] / peak, 4)
        print(f"{name}: ours {entry['ours_tokens_per_s']:,} tok/s, transformers {entry['hf_tokens_per_s']:,} tok/s, "
              f"ratio {entry['ratio_vs_hf']}x (paired {entry['ratio_paired']}x), MFU {entry['mfu']:.1%}", flush=True)
    report = {
        **results,
        "ratio_vs_hf_note": "median our tokens/s / median transformers GPT2LMHeadModel tokens/s over interleaved "
                            "rounds, same config, weights, batches, loss, clipping, optimizer and threads",
        "mfu_note": "our tokens/s x GPT.flops_per_token() / peak_flops (best fp32 matmul rate measured in this run)",
        "peak_flops": round(peak),
        "peak_flops_by_matmul_size": {n: round(v) for n, v in by_size.items()},
        "what_is_timed": "forward, token_loss (cross-entropy), backward, clip_grad_norm_ 1.0, fused AdamW step, "
                         "zero_grad; random token ids, cycled over a few fixed batches",
        "machine": torch_machine(args.threads),
        "command": command,
    }
    if args.only is None:
        write_report(args.out, report)
    else:
        print(json.dumps({k: {kk: v[kk] for kk in ("ratio_vs_hf", "ratio_paired", "ratio_best", "mfu")} for k, v in results.items()}))


if __name__ == "__main__":
    main()
