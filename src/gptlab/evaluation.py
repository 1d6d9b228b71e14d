"""Measurements shared by the training stages' evals and the evaluate stage. All run under no_grad.

- shard_loss: mean next-token loss on fixed windows of token shards (val_loss; perplexity = exp).
- examples_loss: mean loss on response tokens of prompt/response examples.
- pair_logps: summed response log-probs of (chosen, rejected) pairs.
- multiple_choice_conventions: HellaSwag-schema multiple choice, lm-evaluation-harness's and llm.c's way.
- greedy_answers: greedy responses to conversations in their template; normalize_answer for exact match.
"""
from __future__ import annotations

import math
import re
import string

import numpy as np
import torch

from gptlab.data.formats import Conversation, Example, collate, encode_segments, segments
from gptlab.data.loader import Windows
from gptlab.losses import IGNORE, sequence_logps, token_loss
from gptlab.sampling import Sampling, generate
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


def greedy_answers(model, tok: Tokenizer, convs: list[Conversation], max_new_tokens: int) -> list[str]:
    """The model's greedy answer to each conversation's last user turn, prompted in the conversation's template
    exactly as fine-tuning rendered it (earlier turns included)."""
    prompts = [encode_segments(tok, segments(c, generating=True)).ids.tolist() for c in convs]
    outs = generate(model, prompts, Sampling(max_new_tokens, stop_id=tok.eot_id), n_vocab=tok.n_vocab)
    return [tok.decode(o) for o in outs]


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles (a, an, the), single spaces; so
    exact match does not hinge on a trailing full stop or capital letter."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


# --- the evaluate stage's measurements -------------------------------------------------------------------

def binomial_stderr(hits: int, n: int) -> float:
    """Standard error of a share of n independent trials, sqrt(p(1-p)/(n-1)) as lm-evaluation-harness
    reports it: a difference of two shares smaller than about 2 * sqrt(se1^2 + se2^2) is noise."""
    if n < 2:
        return float("nan")
    p = hits / n
    return math.sqrt(p * (1 - p) / (n - 1))


def share(hits: int, n: int, name: str) -> dict[str, float]:
    return {name: hits / n, f"{name}_stderr": binomial_stderr(hits, n)}


@torch.no_grad()
def token_metrics(model, windows: Windows, n_batches: int, micro_batch_size: int, token_bytes: np.ndarray) -> dict:
    """On fixed val windows: mean next-token loss and perplexity; bits per byte (nats of the tokens that stand
    for text, over their UTF-8 bytes, in bits: comparable across tokenizers; EOT stands for no text and is
    left out of both sums); top-1 and top-5 next-token accuracy (stderr binomial over tokens, which neighbour
    each other: a lower bound)."""
    starts = windows.fixed(n_batches * micro_batch_size)
    sizes = torch.as_tensor(token_bytes)
    nats = text_nats = 0.0
    n = n_bytes = top1 = top5 = 0
    for i in range(0, len(starts), micro_batch_size):
        idx, targets = windows.batch(starts[i : i + micro_batch_size], device_of(model))
        logits = model(idx).float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").cpu()
        best = logits.topk(5, dim=-1).indices.flatten(0, 1).cpu()  # (N, 5)
        flat = targets.flatten().cpu()
        b = sizes[flat]
        nats += nll.sum().item()
        text_nats += nll[b > 0].sum().item()
        n_bytes += int(b.sum())
        n += flat.numel()
        top1 += int((best[:, 0] == flat).sum())
        top5 += int((best == flat[:, None]).any(-1).sum())
    val_loss = nats / n
    return {"val_loss": val_loss, "perplexity": math.exp(val_loss),
            "bits_per_byte": text_nats / math.log(2) / max(n_bytes, 1),
            **share(top1, n, "top1_acc"), **share(top5, n, "top5_acc")}


# Multiple choice in HellaSwag's schema (ctx_a, ctx_b, ctx, activity_label, endings, label), two conventions:
# - lmeval (lm-evaluation-harness's hellaswag task): context = preprocess(activity_label + ": " + ctx_a + " " +
#   ctx_b.capitalize()), each choice preprocess(ending) preceded by a space; acc = highest summed log-likelihood,
#   acc_norm = highest summed log-likelihood / characters of the choice. GPT-2 124M: acc_norm 31.14 on val.
# - llmc (nanoGPT / llm.c's hellaswag.py): context = ctx as given, each ending preceded by a space;
#   acc = lowest summed loss, acc_norm = lowest mean per-token loss of the ending. GPT-2 124M: acc_norm 29.55.
# Items without ctx_a/ctx_b/activity_label (the embedded world's) use ctx alone in both conventions.
MC_CONVENTIONS = ("lmeval", "llmc")


def lmeval_preprocess(text: str) -> str:
    """lm-evaluation-harness's hellaswag preprocessing: WikiHow's [title] markers and other brackets out."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def mc_requests(item: dict, convention: str) -> tuple[str, list[str], list[int]]:
    """(context, continuations, normaliser lengths in characters) of one item under a convention."""
    endings = [e.lstrip(" ") for e in item["endings"]]  # the world's endings carry their space already
    if convention == "lmeval":
        ctx = item["ctx_a"] + " " + item["ctx_b"].capitalize() if "ctx_a" in item and "ctx_b" in item else item["ctx"]
        query = lmeval_preprocess(f"{item['activity_label']}: {ctx}" if "ctx_a" in item else ctx)
        choices = [lmeval_preprocess(e) for e in endings]
        return query, [" " + c for c in choices], [len(c) for c in choices]
    return item["ctx"], [" " + e for e in endings], [len(e) for e in endings]


def _continuation(tok: Tokenizer, context: str, continuation: str) -> Example:
    """lm-evaluation-harness's split: encode context + continuation whole and take the tokens after the
    context's own encoding, so a merge across the boundary is tokenized as in running text."""
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    if whole[: len(ctx)] != ctx:  # the boundary merged: fall back to separate encodings
        return Example.of(ctx, tok.encode(continuation))
    return Example.of(ctx, whole[len(ctx):])


@torch.no_grad()
def multiple_choice_conventions(model, tok: Tokenizer, items: list[dict], micro_batch_size: int,
                                conventions: tuple[str, ...] = MC_CONVENTIONS) -> dict:
    """{"mc_lmeval": {acc, acc_stderr, acc_norm, acc_norm_stderr}, "mc_llmc": {...}} over the items."""
    out = {}
    for convention in conventions:
        examples, norms, spans = [], [], []
        for item in items:
            context, continuations, lengths = mc_requests(item, convention)
            spans.append((len(examples), len(continuations)))
            examples += [_continuation(tok, context, c) for c in continuations]
            norms += lengths
        sums, counts = [], []
        for i in range(0, len(examples), micro_batch_size):
            chunk = examples[i : i + micro_batch_size]
            idx, targets, _ = collate(chunk, tok.eot_id)
            sums.append(sequence_logps(model(idx.to(device_of(model))), targets.to(device_of(model))).cpu())
            counts += [e.n_loss for e in chunk]
        logp, n_tok, chars = torch.cat(sums).numpy(), np.array(counts), np.array(norms, dtype=np.float64)
        hits = hits_norm = 0
        for item, (k, n) in zip(items, spans):
            s = logp[k : k + n]
            norm = s / np.maximum(chars[k : k + n], 1) if convention == "lmeval" else s / n_tok[k : k + n]
            hits += int(np.argmax(s) == int(item["label"]))
            hits_norm += int(np.argmax(norm) == int(item["label"]))
        out[f"mc_{convention}"] = {**share(hits, len(items), "acc"), **share(hits_norm, len(items), "acc_norm")}
    return out
