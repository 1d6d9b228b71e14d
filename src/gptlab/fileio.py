"""Atomic file and folder writes, file checksums, and reads of the JSON/JSONL files the pipeline writes back.

Writes go beside the target, then rename, so no reader ever sees half a file or half a folder
(replace_folder: checkpoints, token shards, resume states, exports). Renaming also replaces (rather
than writes through) files that DVC may have hard-linked read-only from its cache, so a rerun never corrupts
the cache.

Reads turn every way a file can be damaged (missing, not UTF-8, not JSON, wrong shape) into one GptlabError
line that names the file, the line where there is one, and how to fix it.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

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


def file_sha256(path: str | Path) -> str:
    """The SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync(path: str | Path) -> None:
    """Flush a file or a folder to disk; a folder's fsync makes the names in it (renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file and folder below `folder`, and `folder` itself."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync(Path(root, name))
        fsync(Path(root))


def write_new(path: str | Path, data: bytes) -> None:
    """A file that must not exist yet, written and fsynced ("x": never write through an existing file,
    which DVC may have hard-linked from its cache); one step() for the FAULT_ENV hook."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    step()


# --- folders replaced whole (checkpoints, data/shards, resume states, exports) -----------------------------
# replace_folder builds the new folder beside the target as `.<name>.tmp-<pid>`, fsyncs all of it, then swaps
# it in with one rename: renameat2(RENAME_EXCHANGE) on Linux, else the old folder -> `.<name>.old-<pid>` and
# the new one -> `<name>`. A folder is deleted by renaming it `.<name>.del-<pid>` first, so an `.old` folder is
# always whole. A kill at any moment thus leaves `<name>` holding the old folder or the new one, whole, or
# (between the two renames) no `<name>` and the old one beside it as `.old`. Only writers clear up: the next
# replace_folder (or recover) of the same target puts the `.old` back, then deletes the rest; readers refuse
# a target that was moved aside (moved_aside). Leftovers are told apart by their writer's pid, so one machine
# writes a given folder at a time.

# Test hook: with GPTLAB_FAULT_AFTER=k set, the process SIGKILLs itself right after its k-th (from 0) write
# step (a folder made, a file written, an fsync, a rename, a deletion: every step() call); with
# GPTLAB_FAULT_AFTER=<name>:k only the steps of writing or recovering a folder named <name> count (e.g.
# step_0000008:2 kills one resume state's write in the middle of a whole `dvc repro`).
FAULT_ENV = "GPTLAB_FAULT_AFTER"
_AT_FDCWD = -100  # from <fcntl.h>: paths relative to the working directory
_RENAME_EXCHANGE = 2  # from <linux/fs.h>
_LEFTOVER = re.compile(r"\.(.+)\.(tmp|old|del)-(\d+)")  # `.<name>.<kind>-<pid>`
_steps_done = 0
_writing: str | None = None  # the name of the folder being written or recovered, for FAULT_ENV's <name>:


@contextmanager
def replace_folder(target: str | Path) -> Iterator[Path]:
    """Yield a new, empty staging folder beside `target`; when the block ends, make it `target` in one atomic
    step (see above), replacing whatever `target` held; if the block raises, delete it and leave `target` as
    it was. What killed writers of `target` left is cleared first (recover). Missing parents are made."""
    target = Path(os.path.abspath(target))  # "." has no name to build the siblings' from
    target.parent.mkdir(parents=True, exist_ok=True)
    with _counting(target):
        recover(target)
        staging = _sibling(target, "tmp")
        staging.mkdir()
        step()
        try:
            yield staging
            fsync_tree(staging)
            step()
            old = _swap_in(staging, target)
            fsync(target.parent)  # the new name is on disk before the old folder goes
            step()
            if old is not None:
                with suppress(OSError):  # the new folder is in place: the next writer deletes what is left
                    remove_folder(old, target)
        finally:
            if os.path.lexists(staging):  # only if the block failed: the half-written folder
                shutil.rmtree(staging, ignore_errors=True)


def recover(target: str | Path) -> None:
    """Clear what killed writers of `target` left beside it: if one died between moving the old folder aside
    and moving its new one in, put the old one back; then delete their other folders. A live writer's folders
    are left alone, and so is one that cannot be deleted (a read-only parent): it harms no reader."""
    target = Path(os.path.abspath(target))
    if not target.parent.is_dir():
        return
    with _counting(target):
        leftovers = [(path, kind) for path, kind, pid in _siblings(target) if not writer_alive(pid)]
        aside = [path for path, kind in leftovers if kind == "old"]
        if aside and not os.path.lexists(target):
            _put_back(aside[0], target)
            leftovers.remove((aside[0], "old"))
        for path, _ in leftovers:
            with suppress(OSError):
                remove_folder(path, target)


def recover_all(parent: str | Path) -> None:
    """recover() every folder in `parent` that a killed writer left something beside."""
    parent = Path(parent)
    if parent.is_dir():
        names = {m.group(1) for m in map(_LEFTOVER.fullmatch, (e.name for e in parent.iterdir())) if m}
        for name in sorted(names):
            recover(parent / name)


def moved_aside(target: str | Path) -> Path | None:
    """Where a replacement moved `target`'s previous version if it stopped (or is now) between its two renames,
    so `target` is missing: readers refuse it (only the writer puts it back). None if `target` exists."""
    target = Path(os.path.abspath(target))
    if os.path.lexists(target) or not target.parent.is_dir():
        return None
    return next((path for path, kind, _ in _siblings(target) if kind == "old"), None)


def remove_folder(path: str | Path, target: str | Path | None = None) -> None:
    """Delete the folder at `path` (or whatever is there): renamed `.<name>.del-<pid>` beside `target` (default
    `path`) first, so a kill midway never leaves a half-deleted folder under a name that stands for a whole one."""
    path = Path(path)
    doomed = _sibling(Path(os.path.abspath(path if target is None else target)), "del")
    if path.is_dir() and not path.is_symlink():
        if path != doomed:
            os.rename(path, doomed)
            step()
        shutil.rmtree(doomed)
    elif os.path.lexists(path):
        path.unlink()
    else:
        return
    step()


def step() -> None:
    """Count one write step for the FAULT_ENV test hook; a no-op unless that variable is set."""
    spec = os.environ.get(FAULT_ENV)
    if spec is None:
        return
    name, _, limit = spec.rpartition(":")
    if name and name != _writing:
        return
    global _steps_done
    if _steps_done >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)
    _steps_done += 1


@contextmanager
def _counting(target: Path) -> Iterator[None]:
    """Steps taken inside count as `target.name`'s for FAULT_ENV."""
    global _writing
    before, _writing = _writing, target.name
    try:
        yield
    finally:
        _writing = before


def _sibling(target: Path, kind: str) -> Path:
    """`.<name>.<kind>-<pid>` beside `target`, for this process: "tmp" (staging), "old" (moved aside), "del"."""
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}")


def _siblings(target: Path) -> list[tuple[Path, str, int]]:
    """(path, kind, writer's pid) of every `.<name>.tmp|old|del-<pid>` beside `target`, in name order."""
    found = []
    for entry in sorted(target.parent.iterdir()):
        m = _LEFTOVER.fullmatch(entry.name)
        if m and m.group(1) == target.name:
            found.append((entry, m.group(2), int(m.group(3))))
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


def _swap_in(staging: Path, target: Path) -> Path | None:
    """Make `staging` the folder at `target` in one step; returns where the old one now is."""
    if not os.path.lexists(target):
        os.rename(staging, target)
        step()
        return None
    if _exchange(staging, target):
        step()
        return staging
    old = _sibling(target, "old")
    os.rename(target, old)
    step()
    try:
        os.rename(staging, target)  # a kill before this leaves no `target`: recover puts `old` back
    except BaseException:
        os.rename(old, target)
        raise
    step()
    return old


def _put_back(old: Path, target: Path) -> None:
    os.rename(old, target)
    step()
    fsync(target.parent)
    step()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2); False where the OS or file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or a file system without it
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """libc's renameat2 (glibc 2.28+), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


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
