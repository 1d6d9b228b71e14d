"""Typed readers for the sets the tokenize stage writes: every row is checked for the fields its readers use.

A damaged row fails here, naming `file:line` and the field, instead of as a KeyError mid-training or, worse,
as a wrong metric (an out-of-range label scores 0.0, an empty answer matches every response).
"""
from __future__ import annotations

from pathlib import Path

from gptlab.config import GptlabError
from gptlab.fileio import REGENERATE, check_fields, iter_jsonl

# data/info.json, read with fileio.read_json(paths.DATA_INFO, INFO_FIELDS)
# (entropy_floor, a float, is there only when the world is the one pretraining source)
INFO_FIELDS = {"longest_example": int, "n_tokens": dict, "tokenizer": dict}
SFT_FIELDS = {"question": str, "response": str}  # sft_train.jsonl, sft_heldout.jsonl
QUESTION_FIELDS = {"question": str, "answer": str, "candidates": list[str]}  # sft_heldout.jsonl, for scoring
PREF_FIELDS = {"question": str, "chosen": str, "rejected": str}  # prefs_train.jsonl, prefs_heldout.jsonl
MC_FIELDS = {"ctx": str, "endings": list[str], "label": int}  # mc_eval.jsonl (HellaSwag schema)


def read_rows(path: str | Path, fields: dict[str, type]) -> list[tuple[int, dict]]:
    """(line number, row) for every row of a jsonl file, each checked against `fields`."""
    rows = list(iter_jsonl(path))
    for n, row in rows:
        check_fields(row, fields, f"{path}:{n}")
    return rows


def read_sft(path: str | Path) -> list[dict]:
    """Instruction rows: question and response."""
    return [row for _, row in read_rows(path, SFT_FIELDS)]


def read_questions(path: str | Path) -> list[dict]:
    """Held-out questions with the gold answer and the candidate values that scoring must tell apart."""
    rows = read_rows(path, QUESTION_FIELDS)
    for n, row in rows:
        if not row["answer"].strip():  # an empty answer is "mentioned" by every response: exact match 1.0
            raise GptlabError(f"{path}:{n}: field 'answer' is empty; {REGENERATE}")
    return [row for _, row in rows]


def read_prefs(path: str | Path) -> tuple[list[dict], int]:
    """Preference pairs, and how many were dropped because chosen == rejected (they teach DPO nothing)."""
    rows = [row for _, row in read_rows(path, PREF_FIELDS)]
    kept = [row for row in rows if row["chosen"] != row["rejected"]]
    if not kept:
        raise GptlabError(f"{path}: every pair has chosen == rejected, so none can be learned from; {REGENERATE}")
    return kept, len(rows) - len(kept)


def read_mc(path: str | Path) -> list[dict]:
    """Multiple-choice items: ctx, at least two endings, and the index of the true one."""
    rows = read_rows(path, MC_FIELDS)
    for n, row in rows:
        n_endings = len(row["endings"])
        if n_endings < 2:
            raise GptlabError(f"{path}:{n}: field 'endings' has {n_endings} item(s), needs at least 2; {REGENERATE}")
        if not 0 <= row["label"] < n_endings:  # out of range, no ending could ever be scored right
            label = row["label"]
            raise GptlabError(f"{path}:{n}: field 'label' is {label}, not an index into its {n_endings} endings; {REGENERATE}")
    return [row for _, row in rows]
