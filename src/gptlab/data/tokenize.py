"""Tokenize a stream of documents in parallel into fixed-size token shards, under token budgets.

`write_shards` reads documents (anything with .source, .split and .text, e.g. gptlab.data.sources.Document)
in stream order, packs them into chunks (CHUNK_DOCS documents or CHUNK_CHARS characters, whichever comes
first) and hands the chunks to a pool of worker processes, each of which loaded the tokenizer once. A chunk
travels as one string, its documents joined by the end-of-text text, and comes back as one array of ids
(each document followed by the EOT id) plus the documents' lengths: BPE tokenizers encode it with one call
that splits at the EOT text, which gives exactly the ids of encoding each document on its own.

The results are consumed in order, with at most IN_FLIGHT chunks read ahead of the one being consumed, the
same for every worker count (and for workers == 1, which tokenizes in-process). Budgets are applied by the
consumer, in stream order, one whole document at a time:
- a document whose (source, split) is in `stop` is dropped;
- a train document is admitted while its source's train tokens are below `per_source[source]` and all train
  tokens are below `total`; a val document while all val tokens are below `val` (0 = no cap);
- the moment a cap is reached, its (source, split) pairs go into `stop` (every source's for `total` and
  `val`), so the caller's document generator can stop reading them; a source whose training documents stop
  stops giving validation documents too (one stream feeds both: it must not be read to its end for them).
Token counts include each document's EOT. Whole documents are admitted, so the document that reaches a cap
may overshoot it by up to its own length.

Since the documents read, the chunking and the read-ahead do not depend on the worker count or on timing,
the shards are byte-identical for any `workers`, provided the generator yields the same documents when
`stop` is updated at the same points of the stream.

Each split's tokens go, in stream order, into `{split}_{k:06d}.bin` shards of exactly `shard_tokens` ids (the
last may be shorter; a document may span two shards) in gptlab.data.shards' format. The folder is replaced
as a whole by gptlab.fileio.replace_folder: a kill at any moment leaves `out_dir` holding the old shards or the
new ones, complete (or, between two renames where the file system has no atomic exchange, no `out_dir`: the
next run puts the old one back before it starts), never a partial shard.
"""
from __future__ import annotations

import multiprocessing
import operator
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from gptlab.config import GptlabError
from gptlab.data.shards import HEADER_BYTES, ShardError, shard_dtype, shard_header
from gptlab.fileio import replace_folder, step
from gptlab.launch import die_with_parent
from gptlab.tokenizer import EOT, TiktokenTokenizer, Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from gptlab.data.sources import Document

SPLITS = ("train", "val")
CHUNK_DOCS = 4096  # documents per task, at most
CHUNK_CHARS = 1 << 20  # characters per task, at most (a longer document makes a chunk of its own)
IN_FLIGHT = 32  # chunks read ahead of the one being consumed (independent of the worker count, see above)


@dataclass
class Budgets:
    total: int = 0  # cap on train tokens over all sources (0 = none)
    per_source: tuple[int, ...] = ()  # cap on each source's train tokens (0 = none); give one per source
    val: int = 0  # cap on val tokens over all sources (0 = none)


def write_shards(docs: Iterable[Document], tokenizer_dir: Path, out_dir: Path, *, shard_tokens: int, workers: int,
                 budgets: Budgets, stop: set[tuple[int, str]]) -> dict:
    """Tokenize `docs` into the shards of `out_dir` (replaced as a whole), adding to `stop` the (source, split)
    pairs whose budget is spent. Returns {"train": {"n_tokens", "n_shards", "n_docs"}, "val": {...},
    "per_source": [{"train_tokens", "val_tokens", "docs"}, ...]} (admitted documents and tokens, EOTs included).

    `budgets.per_source` should have one entry per source (0 = no cap), so that when the total or val cap is
    reached `stop` names every source, also those not seen yet. Raises EmptySplit (a GptlabError) if a split
    ends up empty.
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be at least 1, got {shard_tokens}")
    if workers < 0:
        raise ValueError(f"workers must be 0 (one per core) or more, got {workers}")
    if min((budgets.total, budgets.val, *budgets.per_source)) < 0:
        raise ValueError(f"budgets must be 0 (no cap) or positive, got {budgets}")
    if not workers:  # one per core this process may run on (os.cpu_count() counts cores it may not use)
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with replace_folder(out_dir) as staging:
        pool = None
        try:
            if workers > 1:
                # Only the workers load the tokenizer, while this process reads ahead; it needs (n_vocab,
                # fingerprint) for the shard headers, which the first worker free sends back (or the error that
                # loading raised).
                pool = multiprocessing.get_context().Pool(
                    workers, initializer=_init_worker, initargs=(str(tokenizer_dir), os.getpid()))
                info, encode = pool.apply_async(_worker_info).get, None
            else:
                encoder = _ChunkEncoder(load_tokenizer(tokenizer_dir))
                info, encode = (lambda: encoder.info), encoder
            writers = {split: _SplitWriter(staging, split, shard_tokens, info) for split in SPLITS}
            consumer = _Consumer(budgets, stop, writers)
            _run(docs, stop, consumer, pool, encode)
            info()  # raises the tokenizer's error if no document was ever tokenized
            if pool is not None:
                pool.close()
                pool.join()
                pool = None
            for writer in writers.values():
                writer.close()
            _check_not_empty(writers, out_dir, consumer)
        finally:
            if pool is not None:
                pool.terminate()
    return consumer.stats()


# --- reading, tokenizing and consuming in order -------------------------------------------------------------

@dataclass
class _Chunk:
    sources: np.ndarray  # (n,) int64: each document's source
    is_val: np.ndarray  # (n,) bool
    payload: str | list[str]  # the texts joined as "t1<EOT>t2<EOT>...tn<EOT>", or a list if a text holds EOT
    n_chars: int


def _run(docs: Iterable, stop: set, consumer: _Consumer, pool, encode) -> None:
    chunks = _chunks(docs, stop)
    pending: deque = deque()  # (chunk, async result) in stream order

    def read_ahead() -> None:
        while len(pending) < IN_FLIGHT:
            chunk = next(chunks, None)
            if chunk is None:
                return
            result = pool.apply_async(_encode_in_worker, (chunk.payload,)) if pool is not None else None
            pending.append((chunk, result))

    bar = tqdm(desc="tokenize", unit="doc", unit_scale=True, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    start, n_chars = time.perf_counter(), 0
    try:
        read_ahead()
        while pending:
            chunk, result = pending.popleft()
            ids, lens = result.get() if result is not None else encode(chunk.payload)
            if len(lens) != len(chunk.sources):  # cannot happen unless a tokenizer emits EOT for text
                raise ShardError(f"a chunk of {len(chunk.sources)} documents came back as {len(lens)}")
            consumer.consume(chunk, ids, lens)
            read_ahead()  # after consuming: the documents read next see the `stop` this chunk left
            n_chars += chunk.n_chars
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.update(len(lens))
            bar.set_postfix_str(f"{tqdm.format_sizeof(consumer.n_tokens_seen / elapsed)}tok/s "
                                f"{n_chars / elapsed / 1e6:.1f}MB/s", refresh=False)
    finally:
        bar.close()


def _chunks(docs: Iterable, stop: set) -> Iterator[_Chunk]:
    """The documents not already stopped when read, packed into chunks in stream order (this loop runs once
    per document in the main process, so it does the least it can; _pack checks the chunk as a whole)."""
    chunk: list = []
    n_chars = 0
    for doc in docs:
        if stop and (doc.source, doc.split) in stop:
            continue
        chunk.append(doc)
        n_chars += len(doc.text)
        if n_chars >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCS:
            yield _pack(chunk, n_chars)
            chunk, n_chars = [], 0
    if chunk:
        yield _pack(chunk, n_chars)


_key = operator.attrgetter("source", "split")
_text = operator.attrgetter("text")


def _pack(docs: list, n_chars: int) -> _Chunk:
    keys = list(map(_key, docs))
    texts = list(map(_text, docs))
    sources, splits = zip(*keys)
    is_val = np.fromiter(map("val".__eq__, splits), dtype=bool, count=len(splits))
    if int(is_val.sum()) + splits.count("train") != len(splits):
        bad = next(k for k in keys if k[1] not in SPLITS)
        raise GptlabError(f"document of source {bad[0]}: split {bad[1]!r} is not 'train' or 'val'")
    source_ids = np.array(sources)
    if source_ids.dtype.kind not in "iu" or int(source_ids.min()) < 0:
        bad = next(s for s in sources if not isinstance(s, int) or isinstance(s, bool) or s < 0)
        raise GptlabError(f"document source {bad!r} is not an index into data.sources")
    texts.append("")
    try:
        joined = EOT.join(texts)  # one string pickles and encodes far faster than thousands
    except TypeError:
        bad = next(i for i, t in enumerate(texts) if not isinstance(t, str))
        raise GptlabError(f"document of source {sources[bad]}: text is {type(texts[bad]).__name__}, "
                          "not a string") from None
    texts.pop()
    payload = joined if joined.count(EOT) == len(texts) else texts  # else a text holds the EOT text itself
    return _Chunk(source_ids.astype(np.int64, copy=False), is_val, payload, n_chars)


class _ChunkEncoder:
    """payload -> (ids in the shard dtype, each document followed by EOT; each document's length incl. EOT)."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.eot, self.n_vocab = tok, tok.eot_id, tok.n_vocab
        self.info = (tok.n_vocab, tok.fingerprint)  # what the shard headers record
        self.dtype = shard_dtype(tok.n_vocab)
        self.encoding = tok.encoding if isinstance(tok, TiktokenTokenizer) else None

    def __call__(self, payload: str | list[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(payload, str) and self.encoding is not None:
            ids = self._encode_joined(payload)
            ends = np.flatnonzero(ids == self.eot)
            lens = np.diff(ends, prepend=-1)
        else:
            texts = payload.split(EOT)[:-1] if isinstance(payload, str) else payload
            pieces = [self.tok.encode(t) for t in texts]
            lens = np.fromiter((len(p) + 1 for p in pieces), dtype=np.int64, count=len(pieces))
            flat: list[int] = []
            for p in pieces:
                flat += p
                flat.append(self.eot)
            ids = np.array(flat, dtype=np.int64)
        if ids.size and int(ids.max()) >= self.n_vocab:
            raise ShardError(f"the tokenizer produced id {int(ids.max())}, not below its {self.n_vocab} ids")
        return ids.astype(self.dtype, copy=False), lens.astype(np.int64, copy=False)

    def _encode_joined(self, text: str) -> np.ndarray:
        """Encoding at the EOT text gives each document's encode_ordinary ids, each followed by EOT."""
        try:
            return self.encoding.encode_to_numpy(text, allowed_special={EOT})
        except UnicodeEncodeError:  # lone surrogates: the same fix-up tiktoken's encode_ordinary makes
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self.encoding.encode_to_numpy(text, allowed_special={EOT})


_encoder: _ChunkEncoder | None = None  # a worker's, loaded once by _init_worker
_load_error: BaseException | None = None


def _init_worker(tokenizer_dir: str, parent: int) -> None:
    _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it terminates the pool
    global _encoder, _load_error
    try:
        _encoder = _ChunkEncoder(load_tokenizer(tokenizer_dir))
    except Exception as e:  # noqa: BLE001 - raised by every task instead: Pool restarts a worker whose
        _load_error = e  # initializer fails, forever, and the run would hang


def _worker_encoder() -> _ChunkEncoder:
    if _encoder is None:
        raise _load_error
    return _encoder


def _worker_info() -> tuple[int, str]:
    return _worker_encoder().info


def _encode_in_worker(payload: str | list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _worker_encoder()(payload)


def _die_with(parent: int) -> None:
    """Have Linux SIGKILL this worker when its parent dies (a killed run must not leave workers behind)."""
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


class _Consumer:
    """Applies the budgets in stream order and sends each admitted document's ids to its split's writer."""

    def __init__(self, budgets: Budgets, stop: set, writers: dict[str, _SplitWriter]):
        self.budgets, self.stop, self.writers = budgets, stop, writers
        self.caps = np.array(budgets.per_source, dtype=np.int64)
        self.n_sources = len(self.caps)
        size = max(self.n_sources, 1)
        self.train = np.zeros(size, dtype=np.int64)  # admitted tokens per source
        self.val = np.zeros(size, dtype=np.int64)
        self.docs = np.zeros(size, dtype=np.int64)
        self.n_docs = {"train": 0, "val": 0}
        self.n_tokens_seen = 0

    def consume(self, chunk: _Chunk, ids: np.ndarray, lens: np.ndarray) -> None:
        self.n_tokens_seen += int(lens.sum())
        sources, is_val = chunk.sources, chunk.is_val
        top = int(sources.max())
        if self.caps.size and top >= self.caps.size:
            raise GptlabError(f"document source {top} has no entry in budgets.per_source "
                              f"({self.caps.size} entries): give one per source")
        if top >= self.train.size:
            pad = top + 1 - self.train.size
            self.train, self.val, self.docs = (np.pad(a, (0, pad)) for a in (self.train, self.val, self.docs))
        admitted = self._alive(sources, is_val)
        if self._may_reach_a_cap(sources, is_val, lens, admitted):
            admitted = self._admit_one_by_one(sources, is_val, lens, admitted)
        self.n_sources = max(self.n_sources, top + 1)
        train, val = admitted & ~is_val, admitted & is_val
        self.train += np.bincount(sources[train], weights=lens[train], minlength=self.train.size).astype(np.int64)
        self.val += np.bincount(sources[val], weights=lens[val], minlength=self.val.size).astype(np.int64)
        self.docs += np.bincount(sources[admitted], minlength=self.docs.size)
        self.n_docs["train"] += int(train.sum())
        self.n_docs["val"] += int(val.sum())
        for split, mask in (("train", train), ("val", val)):
            if mask.all():
                self.writers[split].write(ids)
            elif mask.any():
                self.writers[split].write(ids[np.repeat(mask, lens)])

    def _alive(self, sources: np.ndarray, is_val: np.ndarray) -> np.ndarray:
        """Documents whose (source, split) is not in `stop` (it may have grown since they were read)."""
        codes = sources * 2 + is_val
        dead = [c for c in np.unique(codes).tolist() if (c // 2, SPLITS[c % 2]) in self.stop]
        return ~np.isin(codes, dead) if dead else np.ones(len(codes), dtype=bool)

    def _may_reach_a_cap(self, sources, is_val, lens, alive) -> bool:
        b = self.budgets
        train, val = alive & ~is_val, alive & is_val
        train_sum = int(lens[train].sum())
        if b.total and train_sum and int(self.train.sum()) + train_sum >= b.total:
            return True
        if b.val and val.any() and int(self.val.sum()) + int(lens[val].sum()) >= b.val:
            return True
        if self.caps.size and train_sum:
            per = np.bincount(sources[train], weights=lens[train], minlength=self.caps.size).astype(np.int64)
            capped = self.caps > 0
            return bool(np.any(capped & (per > 0) & (self.train[:self.caps.size] + per >= self.caps)))
        return False

    def _admit_one_by_one(self, sources, is_val, lens, alive) -> np.ndarray:
        """The budget rules, document by document (only for the chunks where a cap may be reached)."""
        b, stop = self.budgets, self.stop
        train = self.train.tolist()
        total, val_total = sum(train), int(self.val.sum())
        caps = self.caps.tolist()
        n_sources = self.n_sources  # the sources known so far: per_source's, or those seen up to this document
        admitted = np.zeros(len(sources), dtype=bool)
        for i, (source, val, n, ok) in enumerate(zip(sources.tolist(), is_val.tolist(), lens.tolist(), alive.tolist())):
            n_sources = max(n_sources, source + 1)
            split = "val" if val else "train"
            if not ok or (source, split) in stop:
                continue
            if val:
                if b.val and val_total >= b.val:
                    stop.update((s, "val") for s in range(n_sources))
                    continue
                admitted[i] = True
                val_total += n
                if b.val and val_total >= b.val:
                    stop.update((s, "val") for s in range(n_sources))
                continue
            cap = caps[source] if caps else 0
            # a source's validation documents stop with its training ones: one stream feeds both, and it must
            # not be read to its end (a whole hub dataset) for a few more validation documents
            if (cap and train[source] >= cap) or (b.total and total >= b.total):  # a late source, after the total
                stop.update({(source, "train"), (source, "val")})
                continue
            admitted[i] = True
            train[source] += n
            total += n
            if cap and train[source] >= cap:
                stop.update({(source, "train"), (source, "val")})
            if b.total and total >= b.total:
                stop.update((s, split) for s in range(n_sources) for split in SPLITS)
        return admitted

    def stats(self) -> dict:
        out = {split: {"n_tokens": w.n_tokens, "n_shards": w.n_shards, "n_docs": self.n_docs[split]}
               for split, w in self.writers.items()}
        out["per_source"] = [{"train_tokens": int(self.train[s]), "val_tokens": int(self.val[s]),
                              "docs": int(self.docs[s])} for s in range(self.n_sources)]
        return out


# --- shard files --------------------------------------------------------------------------------------------

class _SplitWriter:
    """Streams one split's ids into shards of exactly `shard_tokens` ids; the header is written last."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, info: Callable[[], tuple[int, str]]):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.info = info  # the tokenizer's (n_vocab, fingerprint)
        self.n_shards = self.n_tokens = 0
        self.file = None
        self.path: Path | None = None
        self.in_shard = 0

    def write(self, ids: np.ndarray) -> None:
        pos = 0
        while pos < len(ids):
            if self.file is None:
                self.path = self.folder / f"{self.split}_{self.n_shards:06d}.bin"
                self.file = open(self.path, "xb")  # noqa: SIM115 - stays open across write() calls
                self.file.write(b"\0" * HEADER_BYTES)  # placeholder: no magic until the shard is complete
                self.in_shard = 0
            take = min(len(ids) - pos, self.shard_tokens - self.in_shard)
            self.file.write(memoryview(np.ascontiguousarray(ids[pos:pos + take])).cast("B"))
            self.in_shard += take
            self.n_tokens += take
            pos += take
            if self.in_shard == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        """Write the real header over the placeholder, so an unfinished file never reads as a shard."""
        f, self.file = self.file, None
        try:
            f.seek(0)
            f.write(shard_header(self.path, self.in_shard, *self.info()))
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()
        self.n_shards += 1
        step()

    def close(self) -> None:
        if self.file is not None:
            self._finish()


class EmptySplit(GptlabError):
    """A split that no document went to; `stats` is what write_shards would have returned, so a caller that knows
    the sources' settings can say which of them left it empty (gptlab.data.sources.empty_split_problem)."""

    def __init__(self, message: str, split: str, stats: dict):
        super().__init__(message)
        self.split, self.stats = split, stats


def _check_not_empty(writers: dict[str, _SplitWriter], out_dir: Path, consumer: _Consumer) -> None:
    if not writers["train"].n_tokens:
        raise EmptySplit(f"{out_dir}: no training documents: every document read was validation or over "
                         "budget; check data.sources (their val_share / val_split) and data.max_tokens",
                         "train", consumer.stats())
    if not writers["val"].n_tokens:
        raise EmptySplit(f"{out_dir}: no validation documents: set data.sources[i].val_share or val_split "
                         "for at least one source", "val", consumer.stats())
