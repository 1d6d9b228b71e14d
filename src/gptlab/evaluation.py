"""Measurements shared by the training stages' evals and the evaluate stage. All run under no_grad.

- shard_loss: mean next-token loss on fixed windows of token shards (val_loss; perplexity = exp).
- examples_loss: mean loss on response tokens of prompt/response examples.
- pair_logps: summed response log-probs of (chosen, rejected) pairs.
- multiple_choice: HellaSwag-style acc (highest summed log-prob of the ending) and acc_norm (highest
  log-prob per byte of the ending, HellaSwag's length normalisation).
- greedy_answers: greedy responses to questions in the prompt template.
"""
from __future__ import annotations

import numpy as np
import torch

from gptlab.data.formats import Example, collate, format_prompt
from gptlab.data.loader import Windows
from gptlab.losses import IGNORE, sequence_logps, token_loss
from gptlab.sampling import generate
from gptlab.tokenizer import Tokenizer


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def shard_loss(model, windows: Windows, n_batches: int, micro_batch_size: int) -> float:
    """Mean next-token loss over n_batches*micro_batch_size fixed, evenly spaced windows (see Windows.fixed)."""
    starts = windows.fixed(n_batches * micro_batch_size)
    losses = []
    for i in range(0, len(starts), micro_batch_size):
        idx, targets = windows.batch(starts[i : i + micro_batch_size], device_of(model))
        losses.append(token_loss(model(idx), targets).item())
    return float(np.mean(losses))


@torch.no_grad()
def examples_loss(model, examples: list[Example], micro_batch_size: int, pad_id: int) -> float:
    """Token-weighted mean loss over the response tokens of all examples."""
    total, count = 0.0, 0
    for i in range(0, len(examples), micro_batch_size):
        idx, targets, _ = collate(examples[i : i + micro_batch_size], pad_id)
        idx, targets = idx.to(device_of(model)), targets.to(device_of(model))
        n = int((targets != IGNORE).sum())
        total += token_loss(model(idx), targets).item() * n
        count += n
    return total / max(count, 1)


@torch.no_grad()
def pair_logps(model, pairs: list[tuple[Example, Example]], micro_batch_size: int, pad_id: int):
    """Summed response log-probs: (chosen (N,), rejected (N,)) as float tensors on the CPU."""
    chosen, rejected = [], []
    for i in range(0, len(pairs), micro_batch_size):
        chunk = pairs[i : i + micro_batch_size]
        logps = batch_pair_logps(model, chunk, pad_id)
        chosen.append(logps[0].cpu())
        rejected.append(logps[1].cpu())
    return torch.cat(chosen), torch.cat(rejected)


def batch_pair_logps(model, pairs: list[tuple[Example, Example]], pad_id: int):
    """One forward pass over chosen and rejected stacked (2B rows); returns (chosen (B,), rejected (B,))."""
    idx, targets, _ = collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id)
    idx, targets = idx.to(device_of(model)), targets.to(device_of(model))
    logps = sequence_logps(model(idx), targets)
    return logps[: len(pairs)], logps[len(pairs) :]


@torch.no_grad()
def multiple_choice(model, tok: Tokenizer, items: list[dict], micro_batch_size: int) -> dict[str, float]:
    """Score every ending by its summed log-prob after ctx; acc picks the max, acc_norm the max per byte."""
    examples, byte_lens = [], []
    for item in items:
        ctx = tok.encode(item["ctx"])
        for ending in item["endings"]:
            examples.append(Example.of(ctx, tok.encode(ending)))
            byte_lens.append(len(ending.encode()))
    scores = []
    for i in range(0, len(examples), micro_batch_size):
        idx, targets, _ = collate(examples[i : i + micro_batch_size], tok.eot_id)
        scores.append(sequence_logps(model(idx.to(device_of(model))), targets.to(device_of(model))).cpu())
    logps = torch.cat(scores).numpy()
    hits, hits_norm, k = 0, 0, 0
    for item in items:
        n = len(item["endings"])
        s = logps[k : k + n]
        hits += int(np.argmax(s) == item["label"])
        hits_norm += int(np.argmax(s / np.array(byte_lens[k : k + n])) == item["label"])
        k += n
    return {"acc": hits / len(items), "acc_norm": hits_norm / len(items)}


def greedy_answers(model, tok: Tokenizer, questions: list[str], max_new_tokens: int) -> list[str]:
    prompts = [tok.encode(format_prompt(q)) for q in questions]
    outs = generate(model, prompts, max_new_tokens, temperature=0.0, stop_id=tok.eot_id, n_vocab=tok.n_vocab)
    return [tok.decode(o) for o in outs]
