"""Token shards: a 256-byte header (magic + JSON: dtype, token count, tokenizer fingerprint), then the ids.

Documents are concatenated with the tokenizer's end-of-text id between them. Readers memory-map the ids, so
a shard of any size costs no RAM and several processes share the page cache.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptlab.config import GptlabError
from gptlab.fileio import atomic_path

MAGIC = b"GPTLABTK"
HEADER_BYTES = 256


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
    dtype = shard_dtype(n_vocab)
    ids = np.fromiter((t for doc in docs for t in (*doc, eot_id)), dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= n_vocab):
        raise ShardError(f"{path}: token id out of range [0, {n_vocab}); the tokenizer and n_vocab disagree")
    header = json.dumps({"dtype": dtype.name, "n_tokens": int(ids.size), "fingerprint": fingerprint}).encode()
    if len(header) > HEADER_BYTES - len(MAGIC):
        raise ShardError(f"{path}: header too long")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + header.ljust(HEADER_BYTES - len(MAGIC), b" "))
        f.write(ids.astype(dtype).tobytes())
    return int(ids.size)


def read_shard(path: str | Path) -> Shard:
    path = Path(path)
    if not path.exists():
        raise ShardError(f"{path}: not found; run the tokenize stage (dvc repro tokenize) first")
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if not head.startswith(MAGIC):
        raise ShardError(f"{path}: not a gptlab token shard (bad magic); regenerate it with the tokenize stage")
    meta = json.loads(head[len(MAGIC):].decode())
    tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r", offset=HEADER_BYTES, shape=(meta["n_tokens"],))
    return Shard(path, tokens, meta["fingerprint"])
