"""Pretraining documents from the configured data.sources, mixed by weight.

A source is the embedded world, a Hugging Face dataset (always streamed, never downloaded whole) or local
files (.txt read directly; .jsonl and .parquet through the same `datasets.load_dataset` streaming path as the
hub, so both kinds exercise one loader). Everything is deterministic in the seed: each source yields its
documents in a fixed order, each document's split is fixed, and the mix draws its picks from a seeded numpy
Generator over all sources with their fixed weights, so the sequence of picks never depends on what the
consumer has stopped or when.

`datasets` is imported only when an hf/.jsonl/.parquet source is read, so the world-only default never pays
for it.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import math
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptlab.config import ConfigError, GptlabError, SourceConfig
from gptlab.data.world import World

VAL, TRAIN = "val", "train"
FILE_BUILDERS = {".txt": None, ".jsonl": "json", ".parquet": "parquet"}  # extension -> datasets builder
PICK_BATCH = 4096  # picks drawn per numpy call; fixed, so the batch boundaries never change the sequence
MIX_KEY = int.from_bytes(b"mix", "big")  # (seed, "mix") as numpy seed entropy: a stream of its own
# The smallest weight a source may have, relative to the sum of the others: once the other sources are read, the
# mix draws about 1/MIN_SHARE picks per document of this one (1e-300 would never be drawn: the mix spun forever).
MIN_SHARE = 1e-6
# Picks in a row that land on no source with documents left before the mix gives up: with every share at least
# MIN_SHARE, the odds of such a run are below e^-60, so it only ends a mix that could never finish.
MAX_IDLE_PICKS = 1 << 26


@dataclass(frozen=True)
class Document:
    source: int  # index into data.sources
    split: str  # "train" or "val"
    text: str


def check_sources(sources: tuple[SourceConfig, ...], root: Path, world: World | None,
                  kinds: tuple[str, ...] = ("world", "hf", "files")) -> list[str]:
    """Cheap checks before any work: open every source of `kinds` and peek at its first document (every
    file's, for kind files; both splits', for hf with val_split). Returns one log line per source; raises
    ConfigError naming data.sources[i] and the fix. For hf, peeking opens the stream, which needs the network
    (the check stage, which runs on every params change, looks at files only). The weights are checked
    whatever `kinds` holds."""
    check_weights(sources)
    return [_check_source(i, cfg, root, world) for i, cfg in enumerate(sources) if cfg.kind in kinds]


def check_weights(sources: tuple[SourceConfig, ...]) -> None:
    """Weights the mix can draw from: finite, summing to a finite number, none a negligible share (see MIN_SHARE).
    config.py checks only that each is positive."""
    weights = [cfg.weight for cfg in sources]
    for i, w in enumerate(weights):
        if not math.isfinite(w):
            raise ConfigError(f"data.sources[{i}].weight: {w} is not a finite number; give a positive number "
                              "(only the ratios between the weights matter)")
    total = sum(weights)  # overflows to inf, as numpy's sum in _pick_batches would
    if not math.isfinite(total):
        raise ConfigError(f"data.sources: the weights sum to {total} (too large for a float); scale them all down "
                          "(only their ratios matter), e.g. to 1.0 for the largest")
    for i, w in enumerate(weights):
        others = total - w
        if others and w < MIN_SHARE * others * (1 - 1e-9):  # the slack: the suggested minimum passes
            raise ConfigError(
                f"data.sources[{i}].weight: {w:g} is {w / total:.2g} of the total weight, so the mix would draw "
                f"this source about once in {total / w:.2g} picks and, once the other sources are read, would run "
                f"(almost) forever; raise it to at least {_at_least(MIN_SHARE * others)} (a millionth of the "
                f"other weights' sum) or remove the source")


def _at_least(x: float) -> str:
    """x rounded up to two significant digits, as text."""
    step = 10.0 ** (math.floor(math.log10(x)) - 1)
    return f"{math.ceil(x / step * (1 - 1e-12)) * step:.2g}"


def documents(index: int, cfg: SourceConfig, seed: int, root: Path, world: World | None) -> Iterator[tuple[str, str]]:
    """(split, text) pairs of one source, in a fixed order (mixed_documents' order with nothing stopped).

    world: all of world.pretrain_docs("val") as "val", then all of world.pretrain_docs("train") as "train".
    hf with val_split: one document of the val_split stream then one of the split stream, alternating, until
    one runs out, then the rest of the other. hf/files otherwise: each document goes to "val" when a seeded
    hash of (seed, index, document number) falls below val_share, else to "train"."""
    reader = _Reader(index, cfg, seed, root, world)
    while not reader.finished(frozenset()):
        yield from reader.pick(frozenset())


def mixed_documents(sources: tuple[SourceConfig, ...], seed: int, root: Path, world: World | None,
                    stop: set[tuple[int, str]]) -> Iterator[Document]:
    """All sources' documents mixed by weight, deterministically from the seed.

    Each draw picks source i with probability weight_i / sum(weights), always over all sources (the picks
    come from numpy's Generator seeded with (seed, "mix") and never depend on `stop`), and yields that
    source's next document. A pick of a source with a separate val stream (hf val_split) yields its next val
    document and its next train document (see documents()), so each stream keeps its own fixed positions.

    `stop` holds (source, split) pairs the consumer no longer wants (a token budget is reached); it may be
    updated from another thread while this runs. A stream all of whose splits are stopped is no longer read,
    and the iteration ends when every source is exhausted or fully stopped. Contract for the consumer: drop
    every document of a (source, split) pair once it is in `stop`. This generator may still yield some (it
    sees the stop late when the consumer runs ahead in another thread), but what it yields of the pairs not
    stopped is the same sequence whatever the timing, so the consumer's output is deterministic. A stream that
    yields both splits (the world, val_share) is read until both are stopped: stop (i, "val") as well when a
    val_share source's train budget is reached, or it is read to its end for the val documents."""
    check_weights(sources)
    readers = [_Reader(i, cfg, seed, root, world) for i, cfg in enumerate(sources)]
    idle = 0  # picks in a row that landed on finished sources only
    for batch in _pick_batches(sources, seed):
        # finished is for good (stop only grows), so a pick of a source finished now would read nothing later
        live = np.array([not r.finished(stop) for r in readers])
        if not live.any():
            return
        hits = batch[live[batch]]
        idle = 0 if hits.size else idle + len(batch)
        if idle >= MAX_IDLE_PICKS:
            raise GptlabError(_undrawable(sources, live))
        for i in hits.tolist():
            if all(r.finished(stop) for r in readers):
                return
            for split, text in readers[i].pick(stop):
                yield Document(i, split, text)


def _undrawable(sources: tuple[SourceConfig, ...], live: np.ndarray) -> str:
    left = [i for i in range(len(sources)) if live[i]]
    names = ", ".join(f"data.sources[{i}] (weight {sources[i].weight:g})" for i in left)
    return (f"{names}: not drawn once in {MAX_IDLE_PICKS} picks of the mix, so the documents left there can never "
            f"be read; raise {'its weight' if len(left) == 1 else 'their weights'}")


def tokenizer_sample(sources: tuple[SourceConfig, ...], seed: int, root: Path, world: World | None,
                     max_chars: int) -> list[str]:
    """Training text for the bpe tokenizer: the "train" documents of mixed_documents, in order, until
    max_chars characters (the last document cut to fit). The world's train documents are always all in (they
    count towards max_chars but are never cut or left out), so a world-only config gives exactly
    world.pretrain_docs("train"), as the tokenizer has always been trained on."""
    stop = {(i, VAL) for i in range(len(sources))}  # val text never trains the tokenizer: read no val stream
    capped = {i for i, cfg in enumerate(sources) if cfg.kind != "world"}
    sample, n_chars = [], 0
    for doc in mixed_documents(sources, seed, root, world, stop):
        if (doc.source, doc.split) in stop:  # the world's val documents, and anything past a budget
            continue
        text = doc.text if doc.source not in capped else doc.text[:max(0, max_chars - n_chars)]
        if text:
            sample.append(text)
            n_chars += len(text)
        if n_chars >= max_chars:
            stop.update((i, TRAIN) for i in capped)
    return sample


def empty_split_problem(split: str, sources: tuple[SourceConfig, ...], per_source: list[dict],
                        stop: set[tuple[int, str]], max_tokens: int) -> str:
    """Why no document of the mix went to `split` ("train" or "val"), source by source, each with its fix.

    `per_source` and `stop` are what write_shards left (admitted documents and tokens per source, and the
    (source, split) pairs a cap stopped); `max_tokens` is data.max_tokens."""
    reason = _no_val_reason if split == VAL else _no_train_reason
    reasons = [reason(i, cfg, per_source[i] if i < len(per_source) else {}, stop, max_tokens)
               for i, cfg in enumerate(sources)]
    what = "validation" if split == VAL else "training"
    return f"no {what} documents: " + "; ".join(r for r in reasons if r)


def _source_name(i: int, cfg: SourceConfig) -> str:
    where = {"world": "", "hf": f" {cfg.path}", "files": f" {' '.join(cfg.paths)}"}[cfg.kind]
    return f"data.sources[{i}] ({cfg.kind}{where})"


def _no_val_reason(i: int, cfg: SourceConfig, stats: dict, stop: set, max_tokens: int) -> str:
    name, docs, key = _source_name(i, cfg), stats.get("docs", 0), f"data.sources[{i}]"
    if cfg.kind != "world" and not cfg.val_share and not cfg.val_split:
        return (f"{name} holds out no documents; set {key}.val_share (e.g. 0.05)"
                + (" or val_split" if cfg.kind == "hf" else ""))
    if (i, TRAIN) in stop:  # a cap stopped the source; its validation documents stop with its training ones
        own_cap = cfg.max_tokens and stats.get("train_tokens", 0) >= cfg.max_tokens
        cap = f"{key}.max_tokens {cfg.max_tokens}" if own_cap else f"data.max_tokens {max_tokens}"
        held = f", none held out by val_share {cfg.val_share:g}" if cfg.val_share else ""
        return (f"{name}: {cap} stopped it after {_documents(docs)}{held}; raise the cap"
                + (f" or {key}.val_share" if cfg.val_share else ""))
    if cfg.val_split:
        return f"{name}: val_split {cfg.val_split!r} gave no documents; set {key}.val_split to a split that holds text"
    if cfg.kind == "world":
        return f"{name} gave no validation documents"
    return (f"{name}: {_documents(docs)}, val_share {cfg.val_share:g} gives 0 validation documents; add documents "
            f"or raise {key}.val_share")


def _documents(n: int) -> str:
    return f"{n} document{'s' * (n != 1)}"


def _no_train_reason(i: int, cfg: SourceConfig, stats: dict, stop: set, max_tokens: int) -> str:
    name, docs, key = _source_name(i, cfg), stats.get("docs", 0), f"data.sources[{i}]"
    if cfg.val_share:
        return (f"{name}: val_share {cfg.val_share:g} sent all {docs} of its documents to validation; lower "
                f"{key}.val_share or add documents")
    if cfg.val_split:
        return f"{name}: split {cfg.split!r} gave no documents; set {key}.split to a split that holds text"
    return f"{name} gave no documents"


# --- one source ---------------------------------------------------------------------------------------

class _Stream:
    """An iterator of (split, text) that is read only while one of its splits is wanted."""

    def __init__(self, splits: tuple[str, ...], pairs: Iterator[tuple[str, str]]):
        self.splits, self.pairs, self.done = splits, pairs, False

    def wanted(self, index: int, stop) -> bool:
        return not self.done and not all((index, split) in stop for split in self.splits)


class _Reader:
    """One source as streams read in turn at each pick: one stream for the world, files and hf with
    val_share; a val stream and a train stream for hf with val_split. Nothing is opened before the first pick."""

    def __init__(self, index: int, cfg: SourceConfig, seed: int, root: Path, world: World | None):
        self.index = index
        if cfg.kind == "world":
            if world is None:
                raise ValueError(f"data.sources[{index}] is kind world: pass the world built from data.world")
            self.streams = [_Stream((VAL, TRAIN), itertools.chain(((VAL, t) for t in world.pretrain_docs(VAL)),
                                                                  ((TRAIN, t) for t in world.pretrain_docs(TRAIN))))]
        elif cfg.kind == "hf" and cfg.val_split:
            self.streams = [_Stream((VAL,), ((VAL, t) for t in _hf_texts(index, cfg, "val_split"))),
                            _Stream((TRAIN,), ((TRAIN, t) for t in _hf_texts(index, cfg, "split")))]
        else:
            texts = _hf_texts(index, cfg, "split") if cfg.kind == "hf" else _files_texts(index, cfg, root)
            splits = (VAL, TRAIN) if cfg.val_share > 0 else (TRAIN,)
            self.streams = [_Stream(splits, _route(texts, index, cfg.val_share, seed))]

    def finished(self, stop) -> bool:
        return not any(s.wanted(self.index, stop) for s in self.streams)

    def pick(self, stop) -> list[tuple[str, str]]:
        """The next document of every stream still wanted (one, unless val and train are separate streams)."""
        out = []
        for stream in self.streams:
            if stream.wanted(self.index, stop):
                pair = next(stream.pairs, None)
                stream.done = pair is None
                out += [pair] if pair else []
        return out


def _pick_batches(sources: tuple[SourceConfig, ...], seed: int) -> Iterator[np.ndarray]:
    """Source indices drawn by weight, PICK_BATCH at a time, forever; the same sequence for the same seed and
    weights (the caller ends the loop: mixed_documents)."""
    weights = np.array([cfg.weight for cfg in sources], dtype=np.float64)
    rng = np.random.default_rng([seed, MIX_KEY])
    while True:
        yield rng.choice(len(sources), size=PICK_BATCH, p=weights / weights.sum())


def _route(texts: Iterable[str], index: int, val_share: float, seed: int) -> Iterator[tuple[str, str]]:
    """Each text's split from a hash of (seed, source, document number): fixed, whatever else is read."""
    for n, text in enumerate(texts):
        yield (VAL if held_out(f"{seed}:{index}:{n}", val_share) else TRAIN), text


def held_out(key: str, share: float) -> bool:
    """Whether the record named by `key` is held out: a seeded hash below `share`, fixed whatever else is read."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


def _check_source(index: int, cfg: SourceConfig, root: Path, world: World | None) -> str:
    where = f"data.sources[{index}]"
    if cfg.kind == "world":
        _Reader(index, cfg, 0, root, world)  # only that the world is there: it is never empty
        return f"sources[{index}] world (embedded; weight {cfg.weight:g})"
    if cfg.kind == "hf":
        for key in ("split", "val_split") if cfg.val_split else ("split",):
            if next(_hf_texts(index, cfg, key), None) is None:
                raise ConfigError(f"{where}.{key}: {getattr(cfg, key)!r} of {cfg.path} has no documents; "
                                  f"name a split that holds text")
        name = f" {cfg.name}" if cfg.name else ""
        pinned = f"@{cfg.revision}" if cfg.revision else ""
        splits = f"split {cfg.split}" + (f", val_split {cfg.val_split}" if cfg.val_split else "")
        unpinned = "" if cfg.revision else f" (revision unpinned: pin {where}.revision for a reproducible run)"
        return f"sources[{index}] hf {cfg.path}{name}{pinned} ({splits}; weight {cfg.weight:g}){unpinned}"
    files = _expand(index, cfg, root)
    # every file's first document: reads each .txt whole, so a non-UTF-8 one fails now; opens each
    # .jsonl/.parquet and checks its first record's text field
    firsts = [next(_file_texts(index, cfg, path), None) for path in files]
    if not any(firsts):
        raise ConfigError(f"{where}.paths: {', '.join(map(repr, cfg.paths))} holds no documents (every file is "
                          f"empty); add text to the files or point the paths at others")
    n_files = f"{len(files)} file{'s' * (len(files) != 1)}"
    return f"sources[{index}] files {' '.join(cfg.paths)} ({n_files}; weight {cfg.weight:g})"


# --- readers ------------------------------------------------------------------------------------------

def _hf_texts(index: int, cfg: SourceConfig, split_key: str) -> Iterator[str]:
    """The texts of one split of a hub dataset, streamed."""
    datasets = quiet_datasets(hub=True)
    split = getattr(cfg, split_key)
    what = f"{cfg.path}{' ' + cfg.name if cfg.name else ''} split {split!r}"
    return _record_texts(
        lambda: datasets.load_dataset(cfg.path, cfg.name or None, split=split, streaming=True,
                                      revision=cfg.revision or None),
        index, cfg.text_field, what, open_key=f"data.sources[{index}].path",
        open_fix=f"check data.sources[{index}].path, name, {split_key} and revision, and that the network is up")


HUB_PROBE_SECONDS = 3.0  # one connection attempt: the hub client's own retries take 25 s to say "no network"


def quiet_datasets(hub: bool = False):
    """datasets, imported only when a source needs it (a second the world-only default does without), and
    quiet: its own log lines about a file it cannot read would precede our one `error:` line.

    hub=True: the load may go to the Hugging Face hub. Unless HF_HUB_OFFLINE is set already, one quick
    connection attempt decides: with no network it runs offline (HF_HUB_OFFLINE=1: the local cache only), so
    the error comes at once as one line instead of after five logged retries."""
    if hub and not os.environ.get("HF_HUB_OFFLINE") and not _hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # read when datasets and huggingface_hub are first imported
    import datasets
    import huggingface_hub

    if os.environ.get("HF_HUB_OFFLINE") == "1":  # and where they were imported before
        huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    huggingface_hub.utils.logging.set_verbosity(huggingface_hub.utils.logging.CRITICAL)
    datasets.disable_progress_bars()
    return datasets


def _hub_reachable() -> bool:
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_PROBE_SECONDS).close()
        return True
    except OSError:
        return False


def _files_texts(index: int, cfg: SourceConfig, root: Path) -> Iterator[str]:
    for path in _expand(index, cfg, root):
        yield from _file_texts(index, cfg, path)


def _expand(index: int, cfg: SourceConfig, root: Path) -> list[Path]:
    """The files of data.sources[index].paths: every glob's matches, sorted, each file once."""
    found = set()
    for pattern in cfg.paths:
        matches = {os.path.normpath(p) for p in glob.glob(str(root / pattern), recursive=True) if os.path.isfile(p)}
        if not matches:
            raise ConfigError(f"data.sources[{index}].paths: {pattern!r} matches no file; "
                              "put files there or fix the glob")
        found |= matches
    for path in sorted(found):
        if Path(path).suffix.lower() not in FILE_BUILDERS:
            raise ConfigError(f"data.sources[{index}].paths: {path} has an unsupported extension; use "
                              f"{', '.join(FILE_BUILDERS)} files, or narrow the glob so it leaves this one out")
    return [Path(p) for p in sorted(found)]


def _file_texts(index: int, cfg: SourceConfig, path: Path) -> Iterator[str]:
    """One file's texts: a .txt as one document or split on the separator; records of .jsonl/.parquet."""
    builder = FILE_BUILDERS[path.suffix.lower()]
    if builder is None:
        return _txt_texts(index, cfg, path)

    def load():
        datasets = quiet_datasets()
        # datasets cannot stream an empty file (jsonl: StopIteration, parquet: "BatchSize must be greater
        # than 0"); an empty file is just one without records
        if path.stat().st_size == 0 or (builder == "parquet" and parquet_rows(path) == 0):
            return []
        return datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True)

    texts = _record_texts(load, index, cfg.text_field, str(path), open_key=f"data.sources[{index}].paths",
                          open_fix="fix or remove the file")
    return _with_line_numbers(texts, index, cfg.text_field, path) if builder == "json" else texts


def _with_line_numbers(texts: Iterator[str], index: int, field: str, path: Path) -> Iterator[str]:
    """datasets counts a .jsonl file's records by its batches, not by line: on a bad record, find the file's
    first bad line ourselves (only then, streaming) so the message names `file:LINE` as an editor shows it."""
    try:
        yield from texts
    except ConfigError:
        located = _first_bad_line(index, field, path)
        if located is None:
            raise
        raise ConfigError(located) from None


def _first_bad_line(index: int, field: str, path: Path) -> str | None:
    key = f"data.sources[{index}]"
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return f"{key}.paths: {path}:{n}: not a JSON object ({one_line(e)}); fix or remove the line"
            if not isinstance(record, dict):
                return f"{key}.paths: {path}:{n}: not a JSON object; fix or remove the line"
            text = record.get(field)
            if not isinstance(text, str):
                got = f"has no field {field!r} (fields: {', '.join(record) or 'none'})" if field not in record else \
                    f"field {field!r} holds {'null' if text is None else type(text).__name__}, not a string"
                return f"{key}.text_field: {path}:{n} {got}; fix the line, or set {key}.text_field to the field " \
                       f"that holds the text"
    return None


def parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _txt_texts(index: int, cfg: SourceConfig, path: Path) -> Iterator[str]:
    from gptlab.fileio import read_text

    try:
        text = read_text(path, fix="convert the file to UTF-8 or leave it out of the paths")
    except GptlabError as e:
        raise ConfigError(f"data.sources[{index}].paths: {e}") from None
    pieces = text.split(cfg.separator) if cfg.separator else [text]
    yield from (piece for piece in pieces if piece.strip())  # blank pieces are no documents


def _record_texts(load: Callable[[], Iterable[dict]], index: int, text_field: str, what: str, open_key: str,
                  open_fix: str) -> Iterator[str]:
    """The text field of every record of a stream; any failure to open or read it is one ConfigError line."""
    try:
        records = iter(load())
    except Exception as e:  # noqa: BLE001 - loaders raise anything (no network, no such dataset, not parquet)
        raise ConfigError(f"{open_key}: cannot open {what} ({one_line(e)}); {open_fix}") from None
    for n in itertools.count(1):
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - a damaged file or a dropped connection, as any type
            raise ConfigError(f"{open_key}: cannot read {what} at record {n} ({one_line(e)}); {open_fix}") from None
        text = _text_of(record, n, index, text_field, what)
        if text:  # an empty text is no document
            yield text


def _text_of(record: dict, n: int, index: int, field: str, what: str) -> str:
    key = f"data.sources[{index}].text_field"
    if field not in record:
        raise ConfigError(f"{key}: {what} record {n} has no field {field!r} (fields: {', '.join(record) or 'none'}); "
                          f"set {key} to the field that holds the text")
    text = record[field]
    if not isinstance(text, str):
        kind = "null" if text is None else type(text).__name__
        raise ConfigError(f"{key}: {what} record {n}: field {field!r} holds {kind}, not a string; "
                          f"set {key} to a field that holds text")
    return text


def one_line(e: Exception) -> str:
    """An exception as one bounded line: loaders raise multi-line and very long messages."""
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__
