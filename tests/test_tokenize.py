"""Parallel tokenization of a document stream into shards: identical for any worker count, budgets applied in
stream order, and a killed run never leaves a partial shard folder."""
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from gptlab import fileio
from gptlab.config import GptlabError, TokenizerConfig
from gptlab.data import tokenize
from gptlab.data.shards import HEADER_BYTES, ShardError, read_shard, shard_paths
from gptlab.data.tokenize import Budgets, write_shards
from gptlab.tokenizer import EOT, TokenizerError, load_tokenizer, train_tokenizer

try:
    from gptlab.data.sources import Document
except ImportError:  # written by another change; the same minimal shape
    @dataclass(frozen=True)
    class Document:
        source: int
        split: str
        text: str


WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards",
         "quietly", "hex", "jolly", "boxes"]


def texts(n: int, seed: int = 0) -> list[str]:
    """Documents with the awkward edges: leading/trailing spaces and newlines, digits, non-ASCII, empty."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), int(rng.integers(1, 40)))]
        text = " ".join(words) + f" {i * 37}" + ["", "\n", "\n\n", "  ", " é—ü"][i % 5]
        out.append(["", " ", "\n"][i % 3] + text)
    out[3] = ""
    return out


TRAIN_TEXT = texts(200, seed=1)


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    dirs = {}
    for kind in ("bpe", "char"):
        d = tmp_path_factory.mktemp(kind)
        train_tokenizer(TokenizerConfig(kind=kind, vocab_size=300), TRAIN_TEXT + ["<|>"]).save(d)
        dirs[kind] = d
    return dirs


@pytest.fixture
def small_chunks(monkeypatch):
    """Many small chunks and a short read-ahead, so tiny corpora still exercise the pool and the windows."""
    monkeypatch.setattr(tokenize, "CHUNK_DOCS", 7)
    monkeypatch.setattr(tokenize, "IN_FLIGHT", 3)


def mixed_docs(n: int, n_sources: int = 2, val_every: int = 5, seed: int = 0) -> list[Document]:
    return [Document(i % n_sources, "val" if i % val_every == 0 else "train", t)
            for i, t in enumerate(texts(n, seed))]


def run(docs, tok_dir, out_dir, *, shard_tokens=100, workers=1, budgets=None, stop=None):
    return write_shards(iter(docs), tok_dir, out_dir, shard_tokens=shard_tokens, workers=workers,
                        budgets=budgets or Budgets(), stop=set() if stop is None else stop)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def split_ids(out_dir: Path, split: str, n_vocab: int, shard_tokens: int) -> list[int]:
    """Every shard of the split read back (read_shard checks header, size and ids); all but the last are full."""
    shards = [read_shard(p, n_vocab=n_vocab) for p in shard_paths(out_dir, split)]
    assert [len(s.tokens) for s in shards[:-1]] == [shard_tokens] * (len(shards) - 1)
    assert 0 < len(shards[-1].tokens) <= shard_tokens
    return np.concatenate([s.tokens for s in shards]).tolist()


def expected_ids(tok, docs) -> list[int]:
    return [t for d in docs for t in (*tok.encode(d.text), tok.eot_id)]


def siblings(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}."))


# --- the shards -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_shards_are_identical_for_one_and_two_workers_and_hold_every_document(tmp_path, tok_dirs, small_chunks, kind):
    docs = mixed_docs(120)
    if kind == "bpe":  # text that looks like EOT is plain text; a lone surrogate gets encode_ordinary's fix-up
        docs += [Document(0, "train", f"a {EOT} b"), Document(1, "train", "x\ud800y"), Document(1, "val", EOT)]
    tok = load_tokenizer(tok_dirs[kind])
    one = run(docs, tok_dirs[kind], tmp_path / "one", shard_tokens=97, workers=1)
    two = run(docs, tok_dirs[kind], tmp_path / "two", shard_tokens=97, workers=2)
    assert files(tmp_path / "one") == files(tmp_path / "two") and one == two
    for split in ("train", "val"):
        ids = split_ids(tmp_path / "two", split, tok.n_vocab, 97)
        assert ids == expected_ids(tok, [d for d in docs if d.split == split])
        assert one[split] == {"n_tokens": len(ids), "n_shards": -(-len(ids) // 97),
                              "n_docs": sum(d.split == split for d in docs)}
    assert all(read_shard(p).fingerprint == tok.fingerprint for p in (tmp_path / "one").iterdir())
    assert sorted(p.name for p in (tmp_path / "one").iterdir())[:2] == ["train_000000.bin", "train_000001.bin"]
    assert one["per_source"] == [
        {"train_tokens": sum(len(tok.encode(d.text)) + 1 for d in docs if d.source == s and d.split == "train"),
         "val_tokens": sum(len(tok.encode(d.text)) + 1 for d in docs if d.source == s and d.split == "val"),
         "docs": sum(d.source == s for d in docs)} for s in (0, 1)]
    assert siblings(tmp_path / "one") == []


def test_more_workers_than_documents(tmp_path, tok_dirs):
    docs = [Document(0, "train", "the fox"), Document(0, "val", "a dog")]
    stats = run(docs, tok_dirs["bpe"], tmp_path / "out", workers=4)
    assert stats["train"]["n_docs"] == 1 and stats["val"]["n_docs"] == 1
    tok = load_tokenizer(tok_dirs["bpe"])
    assert split_ids(tmp_path / "out", "val", tok.n_vocab, 100) == expected_ids(tok, docs[1:])


def test_workers_zero_means_one_per_core(tmp_path, tok_dirs):
    docs = mixed_docs(30)
    run(docs, tok_dirs["bpe"], tmp_path / "a", workers=0)
    run(docs, tok_dirs["bpe"], tmp_path / "b", workers=1)
    assert files(tmp_path / "a") == files(tmp_path / "b")


def test_an_empty_split_is_an_error_that_names_the_fix(tmp_path, tok_dirs):
    run(mixed_docs(20), tok_dirs["bpe"], tmp_path / "out")
    before = files(tmp_path / "out")
    with pytest.raises(GptlabError, match=r"no validation documents: set data\.sources\[i\]\.val_share or val_split"):
        run([d for d in mixed_docs(20) if d.split == "train"], tok_dirs["bpe"], tmp_path / "out", workers=2)
    with pytest.raises(GptlabError, match="no training documents"):
        run([d for d in mixed_docs(20) if d.split == "val"], tok_dirs["bpe"], tmp_path / "out")
    assert files(tmp_path / "out") == before and siblings(tmp_path / "out") == []  # the old shards stay


def test_a_tokenizer_error_in_a_worker_stops_the_run_and_keeps_the_old_shards(tmp_path, tok_dirs):
    run(mixed_docs(20), tok_dirs["char"], tmp_path / "out")
    before = files(tmp_path / "out")
    with pytest.raises(TokenizerError, match="never occurs in the text"):
        run(mixed_docs(20) + [Document(0, "train", "Z never seen")], tok_dirs["char"], tmp_path / "out", workers=2)
    assert files(tmp_path / "out") == before and siblings(tmp_path / "out") == []


def test_bad_documents_are_named(tmp_path, tok_dirs):
    with pytest.raises(GptlabError, match="split 'test' is not 'train' or 'val'"):
        run([Document(0, "test", "x")], tok_dirs["bpe"], tmp_path / "out")
    with pytest.raises(GptlabError, match="source 2 has no entry in budgets.per_source"):
        run([Document(2, "train", "x")], tok_dirs["bpe"], tmp_path / "out", budgets=Budgets(per_source=(0, 0)))


def test_shard_paths(tmp_path, tok_dirs):
    with pytest.raises(ShardError, match=rf"{tmp_path / 'nope'}: does not exist; run the tokenize stage"):
        shard_paths(tmp_path / "nope", "train")
    run(mixed_docs(60), tok_dirs["bpe"], tmp_path / "out", shard_tokens=50)
    paths = shard_paths(tmp_path / "out", "train")
    assert len(paths) > 2 and paths == sorted(paths) and paths[0].name == "train_000000.bin"
    with pytest.raises(ShardError, match="holds no test_\\*.bin shards; run the tokenize stage"):
        shard_paths(tmp_path / "out", "test")


# --- budgets ----------------------------------------------------------------------------------------------

def admitted_by_rules(tok, docs, budgets: Budgets, n_sources: int):
    """The budget rules written out plainly, one document at a time: (admitted docs, final stop). When a
    source's train documents stop, its val documents stop too (one stream feeds both splits)."""
    stop, train, total, val, out = set(), [0] * n_sources, 0, 0, []
    for d in docs:
        n = len(tok.encode(d.text)) + 1
        if (d.source, d.split) in stop:
            continue
        if d.split == "val":
            out.append(d)
            val += n
            if budgets.val and val >= budgets.val:
                stop |= {(s, "val") for s in range(n_sources)}
            continue
        out.append(d)
        train[d.source] += n
        total += n
        cap = budgets.per_source[d.source] if budgets.per_source else 0
        if cap and train[d.source] >= cap:  # a source's val documents stop with its train ones
            stop |= {(d.source, "train"), (d.source, "val")}
        if budgets.total and total >= budgets.total:
            stop |= {(s, split) for s in range(n_sources) for split in ("train", "val")}
    return out, stop


@pytest.mark.parametrize("budgets", [
    Budgets(per_source=(300, 0, 1000)),
    Budgets(total=900, per_source=(0, 0, 0)),
    Budgets(val=150, per_source=(0, 0, 0)),
    Budgets(total=2000, per_source=(400, 700, 0), val=90),
])
def test_budgets_admit_whole_documents_in_stream_order_and_fill_stop(tmp_path, tok_dirs, small_chunks, budgets):
    docs = mixed_docs(300, n_sources=3)
    tok = load_tokenizer(tok_dirs["bpe"])
    want, want_stop = admitted_by_rules(tok, docs, budgets, 3)
    stop: set = set()
    stats = run(docs, tok_dirs["bpe"], tmp_path / "out", workers=2, budgets=budgets, stop=stop)
    assert stop == want_stop and want_stop
    for split, cap in (("train", budgets.total), ("val", budgets.val)):
        ids = split_ids(tmp_path / "out", split, tok.n_vocab, 100)
        assert ids == expected_ids(tok, [d for d in want if d.split == split])
        if cap:  # the last document admitted may overshoot, by less than its own length
            assert cap <= len(ids) < cap + max(len(tok.encode(d.text)) + 1 for d in docs)
    for s, cap in enumerate(budgets.per_source):
        assert stats["per_source"][s]["train_tokens"] == sum(len(tok.encode(d.text)) + 1 for d in want
                                                            if d.source == s and d.split == "train")
        if cap:
            assert stats["per_source"][s]["train_tokens"] >= cap


def test_the_total_cap_stops_sources_not_seen_yet(tmp_path, tok_dirs):
    docs = [Document(0, "val", "a dog")] + [Document(0, "train", "the quick fox " * 20)] * 5
    late = [Document(2, "train", "jumps over"), Document(2, "val", "jumps over")]
    stop: set = set()
    stats = run(docs + late, tok_dirs["bpe"], tmp_path / "out", budgets=Budgets(total=50, per_source=(0, 0, 0)),
                stop=stop)
    assert stop == {(s, split) for s in (0, 1, 2) for split in ("train", "val")}
    assert stats["train"]["n_docs"] == 1 and stats["val"]["n_docs"] == 1
    assert stats["per_source"][2] == {"train_tokens": 0, "val_tokens": 0, "docs": 0}
    # without per_source the sources are unknown until seen: a late one is dropped when it shows up
    stop = set()
    stats = run(docs + late, tok_dirs["bpe"], tmp_path / "out", budgets=Budgets(total=50), stop=stop)
    assert stop == {(0, "train"), (0, "val"), (2, "train"), (2, "val")}
    assert stats["val"]["n_docs"] == 1


def test_documents_of_stopped_pairs_are_dropped(tmp_path, tok_dirs):
    docs = mixed_docs(40)
    stats = run(docs, tok_dirs["bpe"], tmp_path / "out", stop={(1, "train")})
    tok = load_tokenizer(tok_dirs["bpe"])
    kept = [d for d in docs if d.split == "train" and d.source == 0]
    assert split_ids(tmp_path / "out", "train", tok.n_vocab, 100) == expected_ids(tok, kept)
    assert stats["per_source"][1]["train_tokens"] == 0


def test_a_generator_that_honours_stop_ends_an_endless_stream(tmp_path, tok_dirs, small_chunks):
    read = []

    def endless(stop):
        i = 0
        while (0, "train") not in stop or (0, "val") not in stop:
            split = "val" if i % 4 == 0 else "train"
            if (0, split) not in stop:
                read.append(i)
                yield Document(0, split, f"document number {i} about a fox")
            i += 1

    stop: set = set()
    stats = write_shards(endless(stop), tok_dirs["bpe"], tmp_path / "out", shard_tokens=100, workers=2,
                         budgets=Budgets(per_source=(500,), val=100), stop=stop)
    assert stop == {(0, "train"), (0, "val")}
    assert 500 <= stats["train"]["n_tokens"] < 540 and 100 <= stats["val"]["n_tokens"] < 140  # docs of < 40 tokens
    # read-ahead is bounded: past each of the two caps, at most IN_FLIGHT chunks of documents were read
    assert len(read) <= stats["train"]["n_docs"] + stats["val"]["n_docs"] + 2 * 3 * 7


# --- a killed run -----------------------------------------------------------------------------------------

def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _slow_run(tok_dir, out_dir, docs, marker):
    """In a forked child: tokenize, and hang once most documents are read, with shards already written."""
    tokenize.CHUNK_DOCS, tokenize.IN_FLIGHT = 5, 2

    def gen():
        for i, d in enumerate(docs):
            if i == len(docs) * 3 // 4:
                pids = [p.pid for p in multiprocessing.active_children()]
                marker.write_text(" ".join(map(str, pids)))
                time.sleep(600)
            yield d

    write_shards(gen(), tok_dir, out_dir, shard_tokens=50, workers=2, budgets=Budgets(), stop=set())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child to kill")
def test_a_run_killed_mid_way_leaves_the_old_shards_and_a_rerun_cleans_up(tmp_path, tok_dirs):
    out, ref = tmp_path / "out", tmp_path / "ref"
    old_docs, new_docs = mixed_docs(40, seed=1), mixed_docs(200, seed=2)
    run(old_docs, tok_dirs["bpe"], out, shard_tokens=50)
    old = files(out)
    marker = tmp_path / "marker"
    child = multiprocessing.get_context("fork").Process(target=_slow_run,
                                                        args=(tok_dirs["bpe"], out, new_docs, marker))
    child.start()
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline and child.is_alive():
        time.sleep(0.01)
    staging = tmp_path / f".out.tmp-{child.pid}"
    assert marker.exists() and list(staging.glob("train_*.bin")), "the child wrote no shard before hanging"
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    workers = [int(p) for p in marker.read_text().split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 10
    while not all(map(_gone, workers)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(map(_gone, workers)), "pool workers outlived their killed parent"
    assert files(out) == old and siblings(out) == [staging.name]  # the killed run's half-written folder
    run(new_docs, tok_dirs["bpe"], out, shard_tokens=50, workers=2)
    run(new_docs, tok_dirs["bpe"], ref, shard_tokens=50)
    assert files(out) == files(ref) != old and siblings(out) == []


def _faulty_run(tok_dir, out_dir, docs, step):
    os.environ[fileio.FAULT_ENV] = str(step)
    fileio._steps_done = 0
    write_shards(iter(docs), tok_dir, out_dir, shard_tokens=250, workers=1, budgets=Budgets(), stop=set())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child to kill")
@pytest.mark.parametrize("swap", ["exchange", "renames"])
def test_a_kill_at_any_step_leaves_old_or_new_shards_whole(tmp_path, tok_dirs, monkeypatch, swap):
    """Both ways the folder is swapped in: renameat2's exchange, and the two renames used without it (between
    which there is no `out`, until the next run puts the old one back)."""
    if swap == "renames":
        monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)  # the forked children inherit it
    elif fileio._renameat2() is None:
        pytest.skip("no renameat2 here")
    out, ref = tmp_path / "out", tmp_path / "ref"
    old_docs, new_docs = mixed_docs(30, seed=1), mixed_docs(40, seed=2)
    run(old_docs, tok_dirs["bpe"], out, shard_tokens=250)
    run(new_docs, tok_dirs["bpe"], ref, shard_tokens=250)
    old, new = files(out), files(ref)
    seen = set()
    for step in range(100):
        child = multiprocessing.get_context("fork").Process(target=_faulty_run,
                                                            args=(tok_dirs["bpe"], out, new_docs, step))
        child.start()
        child.join()
        if child.exitcode == 0:
            break
        assert child.exitcode == -signal.SIGKILL
        state = "missing" if not out.exists() else "old" if files(out) == old else "new" if files(out) == new else "?"
        assert state != "?", f"killed after step {step}: {sorted(files(out))}"
        seen.add(state)
        # the next run (here the next child) first puts back or clears what this one left
    else:
        pytest.fail("the run never finished")
    assert step > 5 and seen == ({"old", "new"} if swap == "exchange" else {"old", "missing", "new"})
    assert files(out) == new and siblings(out) == []
    run(old_docs, tok_dirs["bpe"], out, shard_tokens=250)  # and a plain rerun restores the old content exactly
    assert files(out) == old and siblings(out) == []


def test_a_killed_run_between_the_renames_is_put_back_by_the_next(tmp_path, tok_dirs):
    out = tmp_path / "out"
    run(mixed_docs(30), tok_dirs["bpe"], out, shard_tokens=250)
    before = files(out)
    dead = tmp_path / ".out.old-999999999"  # a pid no process has
    out.rename(dead)
    (tmp_path / ".out.tmp-999999998").mkdir()
    (tmp_path / ".out.tmp-999999998" / "train_000000.bin").write_bytes(b"\0" * HEADER_BYTES)
    fileio.recover(out)  # what the next run starts with
    assert files(out) == before and siblings(out) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_tokenizer_folder_is_an_error_not_a_hang(tmp_path, tok_dirs, workers):
    bad = tmp_path / "tok"
    bad.mkdir()
    (bad / "tokenizer.json").write_text((tok_dirs["bpe"] / "tokenizer.json").read_text().replace('"fingerprint": "', '"fingerprint": "x'))
    (bad / "bpe.tiktoken").write_text((tok_dirs["bpe"] / "bpe.tiktoken").read_text())
    for docs in (mixed_docs(20), []):  # also when no document is ever tokenized
        with pytest.raises(TokenizerError, match="does not match the saved"):
            run(docs, bad, tmp_path / "out", workers=workers)
    assert not (tmp_path / "out").exists() and siblings(tmp_path / "out") == []


@pytest.mark.parametrize("doc, match", [
    (Document(0, "test", "x"), "split 'test' is not 'train' or 'val'"),
    (Document(-1, "train", "x"), "source -1 is not an index"),
    (Document("a", "train", "x"), "source 'a' is not an index"),
    (Document(0, "train", b"x"), "text is bytes, not a string"),
])
def test_malformed_documents_are_named(tmp_path, tok_dirs, doc, match):
    with pytest.raises(GptlabError, match=match):
        run(mixed_docs(10) + [doc], tok_dirs["bpe"], tmp_path / "out", workers=2)
    assert siblings(tmp_path / "out") == []
