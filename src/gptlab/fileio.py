"""Atomic file writes: write beside the target, then rename, so no reader ever sees half a file.

Renaming also replaces (rather than writes through) files that DVC may have hard-linked read-only from its
cache, so a rerun never corrupts the cache.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from gptlab.config import GptlabError


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside `path`; on success rename it over `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise GptlabError(f"{path}:{n}: not valid JSON ({e}); regenerate it with the tokenize stage") from None
    return rows
