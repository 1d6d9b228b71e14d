"""Atomic file writes, and reads of the JSON/JSONL files the pipeline writes back.

Writes go beside the target, then rename, so no reader ever sees half a file. Renaming also replaces (rather
than writes through) files that DVC may have hard-linked read-only from its cache, so a rerun never corrupts
the cache.

Reads turn every way a file can be damaged (missing, not UTF-8, not JSON, wrong shape) into one GptlabError
line that names the file, the line where there is one, and how to fix it.
"""
from __future__ import annotations

import json
import math
import os
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from gptlab.config import GptlabError

# How to fix any file the tokenize stage writes (data/*): every pipeline reader's message ends with it.
REGENERATE = "regenerate it with the tokenize stage (dvc repro tokenize)"


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


# --- folders replaced whole (checkpoints, data/shards, exports) ---------------------------------------------
# A writer builds `.<name>.tmp-<pid>` beside the target and swaps it in, moving the old one aside as
# `.<name>.old-<pid>`; the next writer clears what a killed one left.

def sibling(target: Path, kind: str) -> Path:
    """`.<name>.<kind>-<pid>` beside `target`: this process's temp folder ("tmp") or the old one moved aside ("old")."""
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}")


def leftover_siblings(target: Path) -> list[tuple[Path, str]]:
    """(path, kind) of every `.<name>.tmp-<pid>` / `.<name>.old-<pid>` beside `target` whose writer is gone,
    in name order."""
    prefix = f".{target.name}."
    found = []
    for entry in sorted(target.parent.iterdir()):
        kind, _, pid = entry.name.removeprefix(prefix).partition("-")
        if entry.name.startswith(prefix) and kind in ("tmp", "old") and pid.isdigit() and not writer_alive(int(pid)):
            found.append((entry, kind))
    return found


def writer_alive(pid: int) -> bool:
    """Whether another process has this id. Our own id counts as gone: one writer per folder at a time in a
    process, and a leftover with our id is from an earlier process that had it (a restarted container)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def fsync(path: str | Path) -> None:
    """Flush a file or a folder to disk; a folder's fsync makes the names in it (renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_text(path: str | Path, fix: str = REGENERATE) -> str:
    """The file's text, strictly UTF-8; a missing, unreadable or mis-encoded file is a GptlabError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise GptlabError(f"{path}: not found; {fix}") from None
    except OSError as e:  # a folder, no permission, ...
        raise GptlabError(f"{path}: cannot be read ({e.strerror}); {fix}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise GptlabError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); {fix}") from None


def read_json(path: str | Path, required: dict[str, type] | None = None, fix: str = REGENERATE) -> dict:
    """A JSON object whose `required` keys hold values of the given types (see check_fields)."""
    path = Path(path)
    try:
        obj = json.loads(read_text(path, fix))
    except json.JSONDecodeError as e:
        raise GptlabError(f"{path}:{e.lineno}: not valid JSON at column {e.colno} ({e.msg}); {fix}") from None
    if not isinstance(obj, dict):
        raise GptlabError(f"{path}: expected a JSON object, got {_json_kind(obj)}; {fix}")
    check_fields(obj, required or {}, str(path), fix)
    return obj


def iter_jsonl(path: str | Path, fix: str = REGENERATE) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a file with no objects at all is an error."""
    path = Path(path)
    n_rows = 0
    # split on "\n" only, so line numbers are the ones an editor shows (str.splitlines also splits on \x1c...)
    for n, line in enumerate(read_text(path, fix).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GptlabError(f"{path}:{n}: not valid JSON at column {e.colno} ({e.msg}); {fix}") from None
        if not isinstance(row, dict):
            raise GptlabError(f"{path}:{n}: expected a JSON object, got {_json_kind(row)}; {fix}")
        n_rows += 1
        yield n, row
    if n_rows == 0:
        raise GptlabError(f"{path}: has no records (the file is empty); {fix}")


def read_jsonl(path: str | Path, fix: str = REGENERATE) -> list[dict]:
    """Every object in a JSON-lines file; see iter_jsonl for what is an error."""
    return [row for _, row in iter_jsonl(path, fix)]


def check_fields(obj: dict, fields: dict[str, type], where: str, fix: str = REGENERATE) -> None:
    """Each key of `fields` is in `obj` with a value of its type; `list[str]` checks the items too.

    JSON has one number type, so an int is accepted where a float is wanted (never a bool, never NaN).
    """
    for key, tp in fields.items():
        if key not in obj:
            raise GptlabError(f"{where}: field {key!r} is missing; {fix}")
        if not _is(obj[key], tp):
            raise GptlabError(f"{where}: field {key!r} should be {_type_name(tp)}, got {_short(obj[key])}; {fix}")


def _is(value, tp) -> bool:
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        return isinstance(value, list) and all(_is(v, item_tp) for v in value)
    if isinstance(value, bool):
        return tp is bool
    if tp is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, tp)


def _type_name(tp) -> str:
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    return {str: "a string", int: "an integer", float: "a finite number", bool: "true or false",
            dict: "an object", list: "a list"}.get(tp, tp.__name__)


def _json_kind(value) -> str:
    """How JSON would call a parsed value, for messages."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}[type(value)]


def _short(value, limit: int = 40) -> str:
    """A one-line, bounded rendering of a bad value (a damaged file can hold megabytes on one line)."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= limit else text[:limit] + "..."
