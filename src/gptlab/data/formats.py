"""Prompt format and loss masks for instruction (SFT) and preference (DPO) data.

The template, shared by sft, dpo, evaluation and `gptlab generate --question`:

    Question: {question}
    Answer:{response}<|endoftext|>

Responses start with a space (" Lisbon.") so they tokenize as they would mid-sentence. Loss is taken on the
response tokens and the closing end-of-text only: the model learns to answer, and to stop.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from gptlab.config import GptlabError
from gptlab.fileio import REGENERATE
from gptlab.losses import IGNORE
from gptlab.tokenizer import Tokenizer, TokenizerError

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


def format_prompt(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question)


@dataclass(frozen=True)
class Example:
    """One tokenized prompt+response: ids = prompt + response + EOT; loss on response + EOT."""

    ids: list[int]
    n_prompt: int


def encode_example(tok: Tokenizer, question: str, response: str) -> Example:
    prompt = tok.encode(format_prompt(question))
    return Example(prompt + tok.encode(response) + [tok.eot_id], len(prompt))


def encode_examples(tok: Tokenizer, rows: list[dict], block_size: int, where: str) -> list[Example]:
    """Encode SFT rows (question, response); no rows, or rows longer than block_size+1 tokens, are an error."""
    _require_rows(rows, where)
    with _naming(where):
        examples = [encode_example(tok, r["question"], r["response"]) for r in rows]
    check_fits(examples, block_size, where)
    return examples


def encode_pairs(tok: Tokenizer, rows: list[dict], block_size: int, where: str) -> list[tuple[Example, Example]]:
    """Encode preference rows (question, chosen, rejected) into (chosen, rejected) example pairs."""
    _require_rows(rows, where)
    with _naming(where):
        pairs = [(encode_example(tok, r["question"], r["chosen"]), encode_example(tok, r["question"], r["rejected"])) for r in rows]
    check_fits([e for p in pairs for e in p], block_size, where)
    return pairs


@contextmanager
def _naming(where: str):
    """Prefix a tokenizer error (a char tokenizer meeting an unseen character) with the file it came from."""
    try:
        yield
    except TokenizerError as e:
        raise TokenizerError(f"{where}: {e}") from None


def _require_rows(rows: list, where: str) -> None:
    # training on nothing would divide by zero (epochs) or sample from an empty range later, far from the cause
    if not rows:
        raise GptlabError(f"{where}: no examples; {REGENERATE}")


def check_fits(examples: list[Example], block_size: int, where: str) -> None:
    longest = max((len(e.ids) for e in examples), default=0)
    if longest > block_size + 1:
        raise GptlabError(
            f"{where}: the longest example has {longest} tokens but model.block_size={block_size} fits "
            f"{block_size + 1}; raise model.block_size (before pretraining) or shorten the data"
        )


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: idx (B, T) and targets (B, T) with IGNORE outside the response."""
    T = max((len(e.ids) for e in examples), default=1) - 1  # no examples: (0, 0) tensors
    idx = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        ids = torch.tensor(e.ids, dtype=torch.long)
        n = len(e.ids) - 1
        idx[row, :n] = ids[:-1]
        targets[row, e.n_prompt - 1 : n] = ids[e.n_prompt :]  # position t predicts token t+1
    return idx, targets
