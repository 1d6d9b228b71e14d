"""Token shards: a 256-byte header (magic + JSON: dtype, token count, tokenizer fingerprint and vocabulary
size), then the ids.

Documents are concatenated with the tokenizer's end-of-text id between them. Readers memory-map the ids, so
a shard of any size costs no RAM and several processes share the page cache. Before mapping, the header is
checked against the file's size, so a truncated shard or an edited dtype is an error, not garbage ids.

shard_header is the one writer of the format (write_shard, write_shard_array and gptlab.data.tokenize's
streaming writer use it); a split's shards in a folder are `{split}_{k:06d}.bin`, listed by shard_paths.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptlab.config import GptlabError
from gptlab.fileio import REGENERATE, atomic_path

MAGIC = b"GPTLABTK"
HEADER_BYTES = 256
DTYPES = ("uint16", "uint32")
MAX_CHECKED_IDS = 1 << 20  # read_shard(n_vocab=...) checks at most this many evenly spaced ids


class ShardError(GptlabError):
    pass


@dataclass(frozen=True)
class Shard:
    path: Path
    tokens: np.ndarray  # (N,) memory-mapped ids
    fingerprint: str  # of the tokenizer that wrote it


def shard_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if n_vocab <= 2**16 else np.dtype(np.uint32)


def write_shard(path: str | Path, docs: list[list[int]], eot_id: int, n_vocab: int, fingerprint: str) -> int:
    """Write `docs` joined by EOT (one EOT after each doc); returns the token count."""
    ids = np.fromiter((t for doc in docs for t in (*doc, eot_id)), dtype=np.int64)
    return write_shard_array(path, ids, n_vocab, fingerprint)


def write_shard_array(path: str | Path, ids: np.ndarray, n_vocab: int, fingerprint: str) -> int:
    """Write the ids of a 1-D integer array as one shard (atomically); returns the token count."""
    dtype = shard_dtype(n_vocab)
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise ShardError(f"{path}: expected a 1-D array of integer ids, got {ids.dtype} of shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= n_vocab):
        raise ShardError(f"{path}: token id out of range [0, {n_vocab}); the tokenizer and n_vocab disagree")
    header = shard_header(path, int(ids.size), n_vocab, fingerprint)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        f.write(ids.astype(dtype, copy=False).tobytes())
    return int(ids.size)


def shard_header(path: str | Path, n_tokens: int, n_vocab: int, fingerprint: str) -> bytes:
    """The HEADER_BYTES that open a shard of `n_tokens` ids (the one place the format is written)."""
    meta = {"dtype": shard_dtype(n_vocab).name, "n_tokens": n_tokens, "fingerprint": fingerprint, "n_vocab": n_vocab}
    header = json.dumps(meta).encode()
    if len(header) > HEADER_BYTES - len(MAGIC):
        raise ShardError(f"{path}: header too long")
    return MAGIC + header.ljust(HEADER_BYTES - len(MAGIC), b" ")


def shard_paths(directory: str | Path, split: str) -> list[Path]:
    """The `{split}_{k:06d}.bin` shards in `directory`, in order; none at all is a ShardError."""
    directory = Path(directory)
    paths = sorted(p for p in directory.glob(f"{split}_*.bin") if p.stem.removeprefix(f"{split}_").isdigit())
    if not paths:
        what = "does not exist" if not directory.is_dir() else f"holds no {split}_*.bin shards"
        raise ShardError(f"{directory}: {what}; run the tokenize stage (dvc repro tokenize) first")
    return paths


def read_shard(path: str | Path, n_vocab: int | None = None) -> Shard:
    """Map a shard whose header and size agree; with `n_vocab`, also check a sample of ids is below it."""
    path = Path(path)
    meta = _read_header(path)
    dtype = np.dtype(meta["dtype"])
    expected = HEADER_BYTES + meta["n_tokens"] * dtype.itemsize
    size = os.stat(path).st_size
    if size != expected:
        raise ShardError(
            f"{path}: is {size} bytes but its header promises {expected} ({meta['n_tokens']} {dtype.name} ids); "
            f"the shard is truncated or its header was edited: {REGENERATE}"
        )
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(meta["n_tokens"],))
    if n_vocab is not None:
        _check_vocab(path, meta, tokens, n_vocab)
    return Shard(path, tokens, meta["fingerprint"])


def _read_header(path: Path) -> dict:
    """The header's JSON, with every field read_shard relies on checked."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise ShardError(f"{path}: not found; run the tokenize stage (dvc repro tokenize) first") from None
    except OSError as e:
        raise ShardError(f"{path}: cannot be read ({e.strerror}); {REGENERATE}") from None
    if not head.startswith(MAGIC):
        raise ShardError(f"{path}: not a gptlab token shard (bad magic); {REGENERATE}")
    if len(head) < HEADER_BYTES:
        raise ShardError(f"{path}: header truncated ({len(head)} of {HEADER_BYTES} bytes); {REGENERATE}")
    try:
        meta = json.loads(head[len(MAGIC):].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ShardError(f"{path}: header is not valid JSON; {REGENERATE}") from None
    if not isinstance(meta, dict):
        raise ShardError(f"{path}: header is not a JSON object; {REGENERATE}")
    if meta.get("dtype") not in DTYPES:
        raise ShardError(f"{path}: header dtype {meta.get('dtype')!r} is not one of {', '.join(DTYPES)}; {REGENERATE}")
    for key in ("n_tokens", "n_vocab"):
        if key == "n_vocab" and key not in meta:
            continue  # headers written before n_vocab was recorded
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ShardError(f"{path}: header {key} {value!r} is not a non-negative integer; {REGENERATE}")
    if meta["n_tokens"] == 0:
        raise ShardError(f"{path}: holds no tokens; {REGENERATE}")
    if not isinstance(meta.get("fingerprint"), str) or not meta["fingerprint"]:
        raise ShardError(f"{path}: header has no tokenizer fingerprint; {REGENERATE}")
    if "n_vocab" in meta and shard_dtype(meta["n_vocab"]).name != meta["dtype"]:
        raise ShardError(f"{path}: header dtype {meta['dtype']} does not fit n_vocab {meta['n_vocab']}; {REGENERATE}")
    return meta


def _check_vocab(path: Path, meta: dict, tokens: np.ndarray, n_vocab: int) -> None:
    """Ids at or above n_vocab would index past the embedding; a bounded sample keeps this cheap on any size."""
    if meta.get("n_vocab", n_vocab) != n_vocab:
        raise ShardError(
            f"{path}: written for a tokenizer with {meta['n_vocab']} ids but this one has {n_vocab}; {REGENERATE}"
        )
    if n_vocab >= np.iinfo(tokens.dtype).max + 1:
        return  # every id the dtype can hold is in range
    n = len(tokens)
    at = np.linspace(0, n - 1, min(n, MAX_CHECKED_IDS)).astype(np.int64)  # includes the first and last id
    bad = np.flatnonzero(tokens[at] >= n_vocab)
    if bad.size:
        pos = int(at[bad[0]])
        raise ShardError(
            f"{path}: token id {int(tokens[pos])} at position {pos} is not below the tokenizer's {n_vocab} ids; "
            f"the shard and tokenizer do not belong together: {REGENERATE}"
        )
