"""Batched generation with a KV cache.

Prompts of equal length are decoded together, so every row of a batch shares one position and
the cache needs no padding. Once a sequence would outgrow block_size, decoding falls back to a
full forward pass over the last block_size tokens at every step (correct, slower).
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from gptlab.model import GPT


def generate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_id: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    n_vocab: int | None = None,
) -> list[list[int]]:
    """New tokens for each prompt, in input order, cut before the first stop_id.

    temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off. batch_size caps
    how many rows (and KV caches) are decoded at once. n_vocab, the tokenizer's id count, keeps the
    model's vocabulary padding (ids that decode to nothing) from ever being picked.
    """
    _check_args(prompts, max_new_tokens, temperature, top_k, top_p, batch_size)
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return out
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for rows in by_len.values():
                for start in range(0, len(rows), batch_size):
                    chunk = rows[start:start + batch_size]
                    new = _generate_group(
                        model, [prompts[i] for i in chunk], max_new_tokens,
                        temperature, top_k, top_p, stop_id, generator, n_vocab,
                    )
                    for i, toks in zip(chunk, new):
                        out[i] = _cut_at_stop(toks, stop_id)
    finally:
        model.train(was_training)
    return out


def _check_args(prompts, max_new_tokens, temperature, top_k, top_p, batch_size) -> None:
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start it with e.g. <|endoftext|>)")
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


class SamplingArgError(ValueError):
    """A generation argument out of range; `arg` names the parameter, so a caller can name its own option."""

    def __init__(self, arg: str, rule: str, value: object):
        super().__init__(f"{arg} {rule}, got {value}")
        self.arg, self.rule, self.value = arg, rule, value


# Near float32's smallest numbers, logits / temperature overflows to inf and softmax returns NaN; 1e-6 keeps
# far from that and is greedy in effect already (temperature 0 is the way to ask for greedy).
MIN_TEMPERATURE = 1e-6


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
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


def _generate_group(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_id, generator, n_vocab):
    """Decode prompts that all have the same length; returns (B, max_new_tokens-or-fewer) lists."""
    block_size = model.config.block_size
    device = next(model.parameters()).device
    idx = torch.tensor(prompts, dtype=torch.long, device=device)  # (B, T0)
    B, T0 = idx.shape
    cache = None
    if T0 < block_size:
        # room for the prompt plus everything generated, up to the model's limit
        cache = model.new_cache(T0 + max_new_tokens)
        logits = model(idx, cache)[:, -1]  # (B, V)
    else:
        logits = model(idx[:, -block_size:])[:, -1]  # (B, V)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    new = []
    for step in range(max_new_tokens):
        nxt = _pick(logits[:, :n_vocab], temperature, top_k, top_p, generator)  # (B,)
        new.append(nxt)
        idx = torch.cat([idx, nxt[:, None]], dim=1)  # (B, T+1)
        if stop_id is not None:
            done |= nxt == stop_id
            if bool(done.all()):
                break
        if step == max_new_tokens - 1:
            break
        if cache is not None and cache.pos < cache.max_len:
            logits = model(nxt[:, None], cache)[:, -1]  # (B, V), one new position
        else:
            cache = None  # full: recompute over the window of the last block_size tokens
            logits = model(idx[:, -block_size:])[:, -1]  # (B, V)
    return torch.stack(new, dim=1).tolist()  # (B, steps)


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
