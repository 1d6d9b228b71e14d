"""Batched generation with a KV cache, through GPT.forward.

What to generate is one frozen `Sampling` (how many tokens, temperature, top_k, top_p, repetition penalty, stop
id), checked once when it is made; `generate` and `stream` take it.

Prompts of equal length are decoded together, so every row of a batch shares one position and the cache needs
no padding. A prompt longer than block_size keeps its last block_size tokens. Once a sequence outgrows
block_size, every step conditions on its last block_size tokens: positions are learned and absolute, so as the
window slides every cached key changes, and each such step recomputes the whole window (correct, slower). With
or without the cache, the tokens are the same.

Each step is one call of the model's forward with last_only=True: the new token goes in with the KV cache, and
only the last position goes through the output head. The KV cache is allocated for the whole generation up front
and the tokens so far live in one preallocated row; the next token is picked on the model's device, and nothing
waits on the device between steps except the stop_id check (every STOP_CHECK_EVERY steps off the CPU).

Before any of that is allocated, check_size refuses a generation that cannot fit: more than MAX_TOKENS tokens
a row, or more memory than the device has free (a mistyped max_new_tokens would otherwise ask for terabytes).
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gptlab.model import GPT, GPTConfig

STOP_CHECK_EVERY = 16  # steps between stop_id checks on an accelerator (each check waits for the device)

# Near float32's smallest numbers, logits / temperature overflows to inf and softmax returns NaN; 1e-6 keeps
# far from that and is greedy in effect already (temperature 0 is the way to ask for greedy).
MIN_TEMPERATURE = 1e-6

# Prompt + new tokens of one row: far beyond any model's context (a row past block_size conditions on its last
# block_size tokens only), far below what a mistyped count would allocate.
MAX_TOKENS = 2**20
GIB = 2**30


class SamplingArgError(ValueError):
    """A sampling setting out of range; `arg` names the field, so a caller can name its own option."""

    def __init__(self, arg: str, rule: str, value: object):
        super().__init__(f"{arg} {rule}, got {value}")
        self.arg, self.rule, self.value = arg, rule, value


@dataclass(frozen=True)
class Sampling:
    """How new tokens are picked. Making one checks it: SamplingArgError names the first field out of range.

    temperature 0 is greedy; top_k 0, top_p 1.0 and repetition_penalty 1.0 switch those off (the penalty is
    CTRL's, as transformers applies it: see apply_repetition_penalty). A row ends at stop_id, which is not kept.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_id: int | None = None

    def __post_init__(self) -> None:
        # written as `not (valid)` so that NaN, which fails every comparison, is rejected too
        if not self.max_new_tokens >= 0:
            raise SamplingArgError("max_new_tokens", "must be 0 or more", self.max_new_tokens)
        if self.max_new_tokens > MAX_TOKENS:
            raise SamplingArgError("max_new_tokens", f"must be at most {MAX_TOKENS}", self.max_new_tokens)
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < math.inf):
            raise SamplingArgError("temperature", "must be 0 (greedy) or a finite number of at least "
                                   f"{MIN_TEMPERATURE:g}", self.temperature)
        if not self.top_k >= 0:
            raise SamplingArgError("top_k", "must be 0 (off) or positive", self.top_k)
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingArgError("top_p", "must lie in (0, 1]", self.top_p)
        if not 0.0 < self.repetition_penalty < math.inf:
            raise SamplingArgError("repetition_penalty", "must be a finite number above 0 (1 = off)",
                                   self.repetition_penalty)


def generate(
    model: GPT,
    prompts: list[list[int]],
    sampling: Sampling,
    *,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    n_vocab: int | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """New tokens for each prompt, in input order, cut before the first sampling.stop_id.

    batch_size caps how many rows (and KV caches) are decoded at once. n_vocab, the tokenizer's id count, keeps
    the model's vocabulary padding (ids that decode to nothing) from ever being picked. use_cache=False runs the
    whole window through the model at every step (slow; the same tokens).
    """
    _check_args(model, prompts, sampling, batch_size, n_vocab)
    out: list[list[int]] = [[] for _ in prompts]
    if sampling.max_new_tokens == 0:
        return out
    for rows in _groups(prompts, batch_size):
        steps = stream(model, [prompts[i] for i in rows], sampling, generator=generator, n_vocab=n_vocab,
                       use_cache=use_cache)
        new = torch.stack(list(steps), dim=1)  # (B, steps)
        for i, toks in zip(rows, new.tolist()):
            out[i] = _cut_at_stop(toks, sampling.stop_id)
    return out


def _groups(prompts: list[list[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices of prompts of one length, at most batch_size at a time."""
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    for rows in by_len.values():
        for start in range(0, len(rows), batch_size):
            yield rows[start:start + batch_size]


@torch.inference_mode()
def stream(
    model: GPT,
    prompts: list[list[int]],
    sampling: Sampling,
    *,
    generator: torch.Generator | None = None,
    n_vocab: int | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """The next token of every row, (B,) on the model's device, one step at a time, for prompts of one length.

    Ends after sampling.max_new_tokens steps, or once every row has made sampling.stop_id (the tokens after a
    row's stop_id are not cut here: generate does that). Stop whenever you like (break out of the loop); no step
    is computed before it is asked for. Arguments as for generate. (torch's inference_mode decorator holds for
    each step, not between them.) A generation too long or too big for the free memory is refused when the
    first step is asked for, before anything is allocated (SamplingArgError; see check_size).
    """
    _check_args(model, prompts, sampling, 1, n_vocab)
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("stream() decodes prompts of one length together; generate() groups them")
    check_size(model.config, len(prompts), len(prompts[0]), sampling.max_new_tokens, _device(model))
    was_training = model.training
    model.eval()
    try:
        yield from _decode(model, prompts, sampling, generator, n_vocab or model.config.vocab_size, use_cache)
    finally:
        model.train(was_training)


def _decode(model: GPT, prompts: list[list[int]], s: Sampling, generator: torch.Generator | None, n_vocab: int,
            use_cache: bool) -> Iterator[torch.Tensor]:
    block_size = model.config.block_size
    device = _device(model)
    B, T0 = len(prompts), len(prompts[0])
    seq = torch.empty(B, T0 + s.max_new_tokens, dtype=torch.long, device=device)  # every token so far
    seq[:, :T0] = torch.tensor(prompts, dtype=torch.long)
    seen = _seen(seq[:, :T0], n_vocab) if s.repetition_penalty != 1.0 else None
    cache = model.new_cache(T0 + s.max_new_tokens) if use_cache and T0 < block_size else None
    done = None  # (B,) bool: which rows have made stop_id
    for step in range(s.max_new_tokens):
        n = T0 + step  # tokens in seq
        if step == 0 or cache is None or cache.pos == cache.max_len:  # prefill, or a window to recompute
            cache = cache if step == 0 else None
            window = seq[:, max(0, n - block_size):n]  # (B, <= block_size)
        else:
            window = seq[:, n - 1:n]  # (B, 1): the cache holds the rest
        logits = model(window, cache, last_only=True)[:, -1, :n_vocab]  # (B, n_vocab)
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, s.repetition_penalty)
        nxt = _pick(logits, s, generator)  # (B,)
        seq[:, n] = nxt
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        yield nxt
        if s.stop_id is not None:
            done = (nxt == s.stop_id) if done is None else done | (nxt == s.stop_id)
            # on the CPU a check costs nothing; on an accelerator it waits for the step to finish
            if (device.type == "cpu" or step % STOP_CHECK_EVERY == STOP_CHECK_EVERY - 1) and bool(done.all()):
                return


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


def _pick(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from (B, V) logits."""
    if s.temperature == 0.0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits.float() / s.temperature
    if s.top_k > 0:
        logits = _keep_top_k(logits, s.top_k)
    if s.top_p < 1.0:
        logits = _keep_top_p(logits, s.top_p)
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


# --- size ------------------------------------------------------------------------------------------------------

def check_size(config: GPTConfig, rows: int, prompt_len: int, max_new_tokens: int,
               device: torch.device | None = None) -> None:
    """Refuse, before anything is allocated, a generation of rows rows of prompt_len + max_new_tokens tokens
    that exceeds MAX_TOKENS a row or the memory free on device (None: only MAX_TOKENS). SamplingArgError names
    "max_new_tokens" or, where one row would fit, "rows" (how many are decoded together)."""
    tokens = prompt_len + max_new_tokens
    if tokens > MAX_TOKENS:
        raise SamplingArgError("max_new_tokens", f"must keep prompt + new tokens within {MAX_TOKENS} (the "
                               f"prompt has {prompt_len})", max_new_tokens)
    free = None if device is None else available_bytes(device)
    need = generation_bytes(config, rows, tokens)
    if free is None or need <= free:
        return
    one_fits = generation_bytes(config, 1, tokens) <= free
    arg, value = ("rows", rows) if one_fits else ("max_new_tokens", max_new_tokens)
    raise SamplingArgError(arg, f"decoding {rows} sequence(s) of {tokens} tokens needs about "
                           f"{need / GIB:.1f} GiB, but {device.type} has {free / GIB:.1f} GiB free; lower it", value)


def generation_bytes(config: GPTConfig, rows: int, tokens: int) -> int:
    """About what _decode keeps for the whole generation: the token rows (int64), the KV cache (keys and
    values of every layer for at most block_size positions, counted in bf16, the narrowest a cache holds),
    the seen-token mask and a few float32 (rows, vocab) logit tensors. The forward's passing activations are
    left out, so what it refuses surely cannot run."""
    window = min(tokens, config.block_size)
    cache = 2 * config.n_layer * window * config.n_embd * 2
    logits = config.vocab_size * (1 + 4 * 4)  # seen mask; logits, probabilities, sorted copy and its order
    return rows * (tokens * 8 + cache + logits)


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation on device can still get; None where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # blocks torch's allocator holds but does not use are free to it too
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    found = [n for n in (_meminfo_available(), _cgroup_room()) if n is not None]
    return min(found, default=None)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            line = next((line for line in f if line.startswith("MemAvailable:")), None)
        return None if line is None else int(line.split()[1]) * 1024
    except (OSError, ValueError):  # no /proc (macOS, Windows): physical memory, if the OS tells it
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return None


def _cgroup_room() -> int | None:
    """A container's memory limit less its use (cgroup v2, then v1): /proc/meminfo shows the host's."""
    for limit, usage in (("memory.max", "memory.current"),
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            with open(f"/sys/fs/cgroup/{limit}") as f, open(f"/sys/fs/cgroup/{usage}") as g:
                return int(f.read()) - int(g.read())
        except (OSError, ValueError):  # absent, or "max" (no limit)
            continue
    return None


def _device(model: GPT) -> torch.device:
    return next(model.parameters()).device


# --- arguments -------------------------------------------------------------------------------------------------

def _check_args(model: GPT, prompts: list[list[int]], sampling: Sampling, batch_size: int,
                n_vocab: int | None) -> None:
    if not isinstance(sampling, Sampling):
        raise TypeError(f"expected a Sampling (e.g. Sampling(max_new_tokens=20)), got {sampling!r}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start it with e.g. <|endoftext|>)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    vocab = model.config.vocab_size
    if n_vocab is not None and not 1 <= n_vocab <= vocab:
        raise ValueError(f"n_vocab={n_vocab} must lie in 1..{vocab}, the model's vocabulary")
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:  # the embedding would fail with an IndexError far from the cause
        raise ValueError(f"prompt token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1}); "
                         "the tokenizer does not match the model")
