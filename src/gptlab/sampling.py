"""Batched generation with a KV cache.

Prompts of equal length are decoded together, so every row of a batch shares one position and the cache needs
no padding. A prompt longer than block_size keeps its last block_size tokens. Once a sequence outgrows
block_size, every step conditions on its last block_size tokens: positions are learned and absolute, so as the
window slides every cached key changes, and each such step recomputes the whole window (correct, slower). With
or without the cache, the tokens are the same.

The cached path is written for decoding speed (bench/generate_throughput.py measures it against transformers;
a decode step is one pass over every weight for a few rows, so the matmuls' layout and the per-step Python
overhead are what count):
- the KV cache is preallocated for the whole generation, and the tokens so far live in one preallocated row;
- it runs GPT.forward's arithmetic (tested against it) on the model's weights gathered once into plain tuples
  (_Packed): no nn.Module calls or attribute look-ups in a step;
- on the CPU the linear layers read contiguous copies of their weights transposed to (in, out): the small-row
  matmuls of decoding run 2-3x faster that way than on nn.Linear's (out, in) at 8 rows (MLP sizes, 1 thread);
- only the last position goes through the output head, which stops at n_vocab and on the CPU is packed by MKL
  for the batch size at hand (~40% less time at 8 rows);
- the next token is picked on the model's device, and nothing waits on the device between steps except the
  stop_id check (every STOP_CHECK_EVERY steps off the CPU).
The copies are kept beside the model and made again once a parameter changes (_packed). A GPT subclass that
overrides forward, and use_cache=False, go through model.forward instead. The logits differ from forward's in
float rounding only (other matmul kernels); the greedy answers of the pipeline's checkpoints are unchanged.
"""
from __future__ import annotations

import math
import weakref
from collections import defaultdict
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.model import GPT, CausalSelfAttention, KVCache

STOP_CHECK_EVERY = 16  # steps between stop_id checks on an accelerator (each check waits for the device)


def generate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    stop_id: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    n_vocab: int | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """New tokens for each prompt, in input order, cut before the first stop_id.

    temperature 0 is greedy; top_k 0, top_p 1.0 and repetition_penalty 1.0 switch those off. batch_size caps
    how many rows (and KV caches) are decoded at once. n_vocab, the tokenizer's id count, keeps the model's
    vocabulary padding (ids that decode to nothing) from ever being picked.
    """
    _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, batch_size, n_vocab)
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return out
    for rows in _groups(prompts, batch_size):
        steps = stream(model, [prompts[i] for i in rows], max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, repetition_penalty=repetition_penalty, generator=generator, n_vocab=n_vocab,
                       use_cache=use_cache)
        new = _collect(steps, stop_id)  # (B, steps)
        for i, toks in zip(rows, new.tolist()):
            out[i] = _cut_at_stop(toks, stop_id)
    return out


def _groups(prompts: list[list[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices of prompts of one length, at most batch_size at a time."""
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    for rows in by_len.values():
        for start in range(0, len(rows), batch_size):
            yield rows[start:start + batch_size]


def _collect(steps: Iterator[torch.Tensor], stop_id: int | None) -> torch.Tensor:
    """Stack the (B,) steps into (B, n); stop early once every row has made stop_id."""
    new, done = [], None
    for i, nxt in enumerate(steps):
        new.append(nxt)
        if stop_id is None:
            continue
        done = (nxt == stop_id) if done is None else done | (nxt == stop_id)
        # on the CPU a check costs nothing; on an accelerator it waits for the step to finish
        if (nxt.device.type == "cpu" or i % STOP_CHECK_EVERY == STOP_CHECK_EVERY - 1) and bool(done.all()):
            break
    return torch.stack(new, dim=1)


@torch.inference_mode()
def stream(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    n_vocab: int | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """The next token of every row, (B,) on the model's device, one step at a time, for prompts of one length.

    Stop whenever you like (break out of the loop); no step is computed before it is asked for. Arguments as for
    generate. (torch's inference_mode decorator holds for each step, not between them.)
    """
    _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, 1, n_vocab)
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("stream() decodes prompts of one length together; generate() groups them")
    was_training = model.training
    model.eval()
    try:
        yield from _decode(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                           generator, n_vocab or model.config.vocab_size, use_cache)
    finally:
        model.train(was_training)


def _decode(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, generator, n_vocab,
            use_cache) -> Iterator[torch.Tensor]:
    block_size = model.config.block_size
    device = next(model.parameters()).device
    B, T0 = len(prompts), len(prompts[0])
    seq = torch.empty(B, T0 + max_new_tokens, dtype=torch.long, device=device)  # every token so far
    seq[:, :T0] = torch.tensor(prompts, dtype=torch.long)
    seen = _seen(seq[:, :T0], n_vocab) if repetition_penalty != 1.0 else None
    fast = use_cache and type(model).forward is GPT.forward  # an overridden forward must run as written
    packed = _packed(model, n_vocab, B) if fast else None
    cache = model.new_cache(T0 + max_new_tokens) if fast and T0 < block_size else None
    n = T0  # tokens in seq
    for step in range(max_new_tokens):
        if step == 0 or cache is None or cache.pos == cache.max_len:  # prefill, or a window to recompute
            cache = cache if step == 0 else None
            window = seq[:, max(0, n - block_size):n]  # (B, <= block_size)
        else:
            window = seq[:, n - 1:n]  # (B, 1): the cache holds the rest
        logits = _last_logits(packed, window, cache) if fast else model(window)[:, -1, :n_vocab]
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        nxt = _pick(logits, temperature, top_k, top_p, generator)  # (B,)
        seq[:, n] = nxt
        n += 1
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        yield nxt


# --- the fast forward ------------------------------------------------------------------------------------------

def _last_logits(packed: _Packed, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """Logits (B, n_vocab) of the last position of idx (B, T): GPT.forward's arithmetic in eval mode (no
    dropout), on the packed weights."""
    B, T = idx.shape
    past = 0 if cache is None else cache.pos
    if past + T > packed.block_size:
        raise ValueError(f"{past + T} tokens exceed block_size={packed.block_size}")
    x = F.embedding(idx, packed.wte) + packed.wpe[past:past + T]  # (B, T, C), as wte(idx) + wpe(arange)
    x = x.view(B * T, -1)  # (B*T, C): the matmuls take 2-D input
    for i, block in enumerate(packed.blocks):
        x = x + _attention(block, block.ln_1(x), B, T, cache, i)
        x = x + block.mlp_proj(F.gelu(block.c_fc(block.ln_2(x)), approximate=block.gelu))
    if cache is not None:
        cache.advance(T)
    x = packed.ln_f(x.view(B, T, -1)[:, -1])  # (B, C): layer norm is per position, so the last one alone will do
    return packed.head(x)  # (B, n_vocab)


def _attention(block: _Block, x: torch.Tensor, B: int, T: int, cache: KVCache | None, layer: int) -> torch.Tensor:
    C = x.shape[1]
    qkv = block.c_attn(x).view(B, T, 3, block.n_head, C // block.n_head)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, D): the same heads as CausalSelfAttention's
    past = 0
    if cache is not None:
        past = cache.pos
        k, v = cache.update(layer, k, v)  # (B, H, L, D)
    y = CausalSelfAttention._attend(q, k, v, past, 0.0)  # (B, H, T, D)
    return block.c_proj(y.transpose(1, 2).reshape(B * T, C))  # (B*T, C)


class _Linear(NamedTuple):
    wt: torch.Tensor  # (in, out)
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x (N, in) -> (N, out)
        return x @ self.wt if self.bias is None else torch.addmm(self.bias, x, self.wt)


class _Norm(NamedTuple):
    shape: tuple[int, ...]
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)


class _Block(NamedTuple):
    ln_1: _Norm
    c_attn: _Linear
    c_proj: _Linear
    ln_2: _Norm
    c_fc: _Linear
    mlp_proj: _Linear
    n_head: int
    gelu: str  # F.gelu's approximate=


def _norm(ln: nn.LayerNorm) -> _Norm:
    return _Norm(ln.normalized_shape, ln.weight, ln.bias, ln.eps)


# MKL's packed GEMM (what torch.compile's CPU weight prepacking uses): the output head at 8 rows in ~60% of
# x @ W^T's time (bench/generate_throughput.py, 1 thread), the same at 1 row. Private ops, so only where present.
MKL_PACKED = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class _Packed:
    """A model's weights laid out for decoding, made once and reused while its parameters stay the same.

    Gathered into plain tuples, so a step makes no nn.Module calls or attribute look-ups (a third of a tiny
    model's step). Linear layers: W^T (in, out), as x @ W^T reads it; on the CPU a contiguous copy (the point:
    see the module docstring), as much memory again as the layers' matrices; on an accelerator a transposed view.
    The output head: its first n_vocab rows, packed by MKL for the batch size at hand where it can (one batch
    size at a time: packing for another costs one copy of the matrix), else transposed like the layers.
    """

    def __init__(self, model: GPT, key: tuple):
        tr = model.transformer
        self.key, self.block_size = key, model.config.block_size
        self.wte, self.wpe, self.ln_f = tr.wte.weight, tr.wpe.weight, _norm(tr.ln_f)
        self.cpu = self.wte.device.type == "cpu"
        self.mkl = self.cpu and MKL_PACKED and self.wte.dtype == torch.float32
        self.blocks = [_Block(_norm(b.ln_1), self._linear(b.attn.c_attn), self._linear(b.attn.c_proj),
                              _norm(b.ln_2), self._linear(b.mlp.c_fc), self._linear(b.mlp.c_proj), b.attn.n_head,
                              b.mlp.gelu.approximate) for b in tr.h]
        self.head_weight = model.lm_head.weight
        self.head_for: tuple[int, int] | None = None  # (n_vocab, batch) the head is ready for
        self.head_rows = self.head_packed = None

    def _linear(self, layer: nn.Linear) -> _Linear:
        return _Linear(self._t(layer.weight), layer.bias)

    def _t(self, w: torch.Tensor) -> torch.Tensor:
        return w.t().contiguous() if self.cpu else w.t()

    def prepare_head(self, n_vocab: int, batch: int) -> None:
        if self.head_for == (n_vocab, batch) or (not self.mkl and self.head_for and self.head_for[0] == n_vocab):
            return  # only MKL's packing depends on the batch size
        self.head_rows = self.head_weight[:n_vocab]  # (n_vocab, C), contiguous
        if self.mkl:
            self.head_packed = torch.ops.mkl._mkl_reorder_linear_weight(self.head_rows, batch)
        else:
            self.head_packed = self._t(self.head_rows)
        self.head_for = (n_vocab, batch)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_vocab) of x (B, C)."""
        if self.mkl:
            return torch.ops.mkl._mkl_linear(x, self.head_packed, self.head_rows, None, x.shape[0])
        return x @ self.head_packed


# model -> its _Packed; an entry goes with its model
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _packed(model: GPT, n_vocab: int, batch: int) -> _Packed:
    """The model's _Packed, made again once any parameter has been replaced or changed in place (an optimizer
    step bumps the version counter)."""
    key = tuple((p.data_ptr(), p._version) for p in model.parameters())
    packed = _PACKED.get(model)
    if packed is None or packed.key != key:
        packed = _PACKED[model] = _Packed(model, key)
    packed.prepare_head(n_vocab, batch)
    return packed


# --- picking the next token ------------------------------------------------------------------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty, as transformers applies it: the logit of a token already in the row is divided
    by penalty if positive and multiplied by it if negative. logits (B, V) float, seen (B, V) bool."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def _seen(idx: torch.Tensor, n_vocab: int) -> torch.Tensor:
    """(B, n_vocab) bool: which ids occur in each row of idx (B, T)."""
    seen = torch.zeros(idx.shape[0], n_vocab, dtype=torch.bool, device=idx.device)
    return seen.scatter_(1, idx, True)


def _pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """One token per row from (B, V) logits."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits.float() / temperature
    if top_k > 0:
        logits = _keep_top_k(logits, top_k)
    if top_p < 1.0:
        logits = _keep_top_p(logits, top_p)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)


def _keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1) smallest kept logit
    return logits.masked_fill(logits < kth, float("-inf"))


def _keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    # a token is dropped when the tokens ranked above it already reach p; the top one never is
    before = probs.cumsum(dim=-1) - probs  # (B, V) mass strictly above each token
    drop_sorted = before >= p
    drop_sorted[:, 0] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def _cut_at_stop(tokens: list[int], stop_id: int | None) -> list[int]:
    if stop_id is not None and stop_id in tokens:
        return tokens[: tokens.index(stop_id)]
    return tokens


# --- arguments -------------------------------------------------------------------------------------------------

class SamplingArgError(ValueError):
    """A generation argument out of range; `arg` names the parameter, so a caller can name its own option."""

    def __init__(self, arg: str, rule: str, value: object):
        super().__init__(f"{arg} {rule}, got {value}")
        self.arg, self.rule, self.value = arg, rule, value


# Near float32's smallest numbers, logits / temperature overflows to inf and softmax returns NaN; 1e-6 keeps
# far from that and is greedy in effect already (temperature 0 is the way to ask for greedy).
MIN_TEMPERATURE = 1e-6


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                        repetition_penalty: float = 1.0) -> None:
    """Raise SamplingArgError for the first argument generate() would reject.

    Written as `not (valid)` so that NaN, which fails every comparison, is rejected too.
    """
    if not max_new_tokens >= 0:
        raise SamplingArgError("max_new_tokens", "must be 0 or more", max_new_tokens)
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < math.inf):
        raise SamplingArgError("temperature", f"must be 0 (greedy) or a finite number of at least {MIN_TEMPERATURE:g}",
                               temperature)
    if not top_k >= 0:
        raise SamplingArgError("top_k", "must be 0 (off) or positive", top_k)
    if not 0.0 < top_p <= 1.0:
        raise SamplingArgError("top_p", "must lie in (0, 1]", top_p)
    if not 0.0 < repetition_penalty < math.inf:
        raise SamplingArgError("repetition_penalty", "must be a finite number above 0 (1 = off)", repetition_penalty)


def _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, batch_size,
                n_vocab) -> None:
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start it with e.g. <|endoftext|>)")
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    vocab = model.config.vocab_size
    if n_vocab is not None and not 1 <= n_vocab <= vocab:
        raise ValueError(f"n_vocab={n_vocab} must lie in 1..{vocab}, the model's vocabulary")
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:  # the embedding would fail with an IndexError far from the cause
        raise ValueError(f"prompt token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1}); "
                         "the tokenizer does not match the model")
