"""data.sources: each kind's documents, the weighted deterministic mix, the stop set, and every bad source
failing with a ConfigError that names data.sources[i]. All offline: hf is tested through the real
`datasets.load_dataset` call, redirected to a local jsonl."""
import json
from collections import Counter

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptlab.config import ConfigError, SourceConfig, WorldConfig
from gptlab.data import sources as src
from gptlab.data.sources import Document, check_sources, documents, mixed_documents, tokenizer_sample
from gptlab.data.world import build_world

REAL_LOAD = datasets.load_dataset


def files(*paths, **kw) -> SourceConfig:
    return SourceConfig(kind="files", paths=tuple(paths), **kw)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def two_files(tmp_path):
    """A parquet and a jsonl of 300 short documents each, as two files sources weighted 0.7/0.3."""
    pq.write_table(pa.table({"text": [f"parquet doc {n}" for n in range(300)], "id": list(range(300))}),
                   tmp_path / "a.parquet")
    write_jsonl(tmp_path / "b.jsonl", [{"text": f"jsonl doc {n}", "id": n} for n in range(300)])
    return (files("a.parquet", weight=0.7), files("b.jsonl", weight=0.3))


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig(n_people=20, bios_per_person=1, n_arithmetic=5), seed=3)


def test_mix_follows_weights_and_seed(tmp_path, two_files):
    first = [d for _, d in zip(range(200), mixed_documents(two_files, 1, tmp_path, None, set()))]
    share = Counter(d.source for d in first)[0] / len(first)
    assert abs(share - 0.7) < 0.08
    assert first == [d for _, d in zip(range(200), mixed_documents(two_files, 1, tmp_path, None, set()))]
    assert first != [d for _, d in zip(range(200), mixed_documents(two_files, 2, tmp_path, None, set()))]
    # each source's own documents keep their order inside the mix
    assert [d.text for d in first if d.source == 1] == [f"jsonl doc {n}" for n in range(sum(d.source for d in first))]


def test_mix_runs_every_source_to_its_end(tmp_path, two_files):
    docs = list(mixed_documents(two_files, 1, tmp_path, None, set()))
    assert Counter(d.source for d in docs) == {0: 300, 1: 300}
    assert {d.split for d in docs} == {"train"}  # no val_share: every document trains


def test_txt_one_document_per_file_in_sorted_glob_order(tmp_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    for name, text in [("b.txt", "bee"), ("a.txt", "ay\n"), ("sub/c.txt", "sea"), ("empty.txt", " \n")]:
        (tmp_path / "corpus" / name).write_text(text)
    cfg = files("corpus/*.txt", "corpus/**/*.txt", "corpus/a.txt")  # overlapping globs: each file once
    assert [t for _, t in documents(0, cfg, 0, tmp_path, None)] == ["ay\n", "bee", "sea"]


def test_txt_separator_drops_empty_pieces(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n\n\n\nthree\n")
    cfg = files("a.txt", separator="\n\n")
    assert [t for _, t in documents(0, cfg, 0, tmp_path, None)] == ["one", "two", "three\n"]


def test_val_share_routing_is_seeded_and_close_to_share(tmp_path):
    (tmp_path / "a.txt").write_text("|".join(f"doc {n}" for n in range(2000)))
    cfg = files("a.txt", separator="|", val_share=0.1)
    splits = [s for s, _ in documents(0, cfg, 5, tmp_path, None)]
    assert splits == [s for s, _ in documents(0, cfg, 5, tmp_path, None)]
    assert splits != [s for s, _ in documents(0, cfg, 6, tmp_path, None)]
    assert abs(splits.count("val") / len(splits) - 0.1) < 0.02


def test_world_alone_is_val_then_train_in_world_order(world, tmp_path):
    cfg = (SourceConfig(kind="world"),)
    docs = list(mixed_documents(cfg, 1337, tmp_path, world, set()))
    assert docs == [Document(0, "val", t) for t in world.pretrain_docs("val")] + \
                   [Document(0, "train", t) for t in world.pretrain_docs("train")]
    assert tokenizer_sample(cfg, 1337, tmp_path, world, max_chars=10) == world.pretrain_docs("train")
    assert check_sources(cfg, tmp_path, world) == ["sources[0] world (embedded; weight 1)"]


def test_tokenizer_sample_cuts_the_last_document_to_fit(tmp_path):
    (tmp_path / "a.txt").write_text("|".join("0123456789" for _ in range(100)))
    cfg = (files("a.txt", separator="|", val_share=0.5),)
    sample = tokenizer_sample(cfg, 0, tmp_path, None, max_chars=95)
    assert sample == ["0123456789"] * 9 + ["01234"]
    train = [d.text for d in mixed_documents(cfg, 0, tmp_path, None, set()) if d.split == "train"]
    assert sample == train[:9] + ["01234"]


def test_tokenizer_sample_keeps_all_of_the_world(world, tmp_path):
    (tmp_path / "a.txt").write_text("|".join("x" * 10 for _ in range(1000)))
    cfg = (SourceConfig(kind="world"), files("a.txt", separator="|"))
    sample = tokenizer_sample(cfg, 0, tmp_path, world, max_chars=3000)
    assert [t for t in sample if not t.startswith("x")] == world.pretrain_docs("train")
    # the other source fills the sample up to max_chars (world text included) and no further
    last = max(n for n, t in enumerate(sample) if t.startswith("x"))
    assert 2900 < sum(map(len, sample[:last + 1])) <= 3000 <= sum(map(len, sample[:last + 2]))


def test_stop_reads_no_more_of_a_stopped_source(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("|".join(f"a{n}" for n in range(500)))
    (tmp_path / "b.txt").write_text("|".join(f"b{n}" for n in range(500)))
    reads = Counter()
    real = src._txt_texts

    def counted(index, cfg, path):
        for text in real(index, cfg, path):
            reads[index] += 1
            yield text

    monkeypatch.setattr(src, "_txt_texts", counted)
    stop = set()
    out = []
    for doc in mixed_documents((files("a.txt", separator="|"), files("b.txt", separator="|")), 0, tmp_path, None, stop):
        out.append(doc)
        if len(out) == 50:
            stop.add((0, "train"))
            read_at_stop = reads[0]
    assert reads[0] == read_at_stop < 500  # source 0 was never read again
    assert reads[1] == 500 and not [d for d in out[50:] if d.source == 0]


def test_val_share_source_stops_only_when_both_splits_stop(tmp_path):
    (tmp_path / "a.txt").write_text("|".join(f"a{n}" for n in range(400)))
    stop = {(0, "train")}
    docs = list(mixed_documents((files("a.txt", separator="|", val_share=0.2),), 0, tmp_path, None, stop))
    assert len(docs) == 400  # the val documents are still wanted, so the stream is read to its end
    assert list(mixed_documents((files("a.txt", separator="|", val_share=0.2),), 0, tmp_path, None,
                                {(0, "train"), (0, "val")})) == []


@pytest.fixture
def hf_calls(tmp_path, monkeypatch):
    """datasets.load_dataset redirected to local jsonl files named <split>.jsonl; records every call."""
    calls = []
    write_jsonl(tmp_path / "train.jsonl", [{"content": f"train {n}"} for n in range(50)])
    write_jsonl(tmp_path / "validation.jsonl", [{"content": f"val {n}"} for n in range(5)])

    def fake(path, name=None, **kw):
        calls.append(dict(path=path, name=name, **kw))
        return REAL_LOAD("json", data_files=[str(tmp_path / f"{kw['split']}.jsonl")], split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    return calls


def hf(**kw) -> SourceConfig:
    return SourceConfig(kind="hf", path="org/corpus", text_field="content", **kw)


def test_hf_streams_pinned_revision(tmp_path, hf_calls):
    cfg = hf(name="sample", revision="abc123")
    [line] = check_sources((cfg,), tmp_path, None)
    assert line == "sources[0] hf org/corpus sample@abc123 (split train; weight 1)"
    assert [t for _, t in documents(0, cfg, 0, tmp_path, None)] == [f"train {n}" for n in range(50)]
    assert hf_calls[-1] == {"path": "org/corpus", "name": "sample", "split": "train",
                             "streaming": True, "revision": "abc123"}


def test_hf_unpinned_revision_is_logged(tmp_path, hf_calls):
    [line] = check_sources((hf(),), tmp_path, None)
    assert "revision unpinned: pin data.sources[0].revision" in line
    assert hf_calls[-1] == {"path": "org/corpus", "name": None, "split": "train",
                             "streaming": True, "revision": None}


def test_hf_val_split_alternates_with_train_until_stopped(tmp_path, hf_calls):
    cfg = hf(val_split="validation")
    check_sources((cfg,), tmp_path, None)
    assert {c["split"] for c in hf_calls} == {"train", "validation"}
    docs = list(documents(0, cfg, 0, tmp_path, None))
    assert docs[:4] == [("val", "val 0"), ("train", "train 0"), ("val", "val 1"), ("train", "train 1")]
    assert Counter(s for s, _ in docs) == {"val": 5, "train": 50}
    # val stopped before the start: the train documents keep their positions, no val document is read
    stopped = list(mixed_documents((cfg,), 0, tmp_path, None, {(0, "val")}))
    assert [d.text for d in stopped] == [f"train {n}" for n in range(50)]


def test_hf_load_failure_is_one_line_naming_the_path(tmp_path, monkeypatch):
    def fail(*args, **kw):
        raise ConnectionError("Couldn't reach 'org/corpus' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(ConfigError, match=r"^data\.sources\[0\]\.path: cannot open org/corpus .*ConnectionError") as e:
        check_sources((hf(),), tmp_path, None)
    assert "\n" not in str(e.value)


def bad(tmp_path, cfg, *, name, content):
    """check_sources' message for one bad source, second in the list (so the index is checked too)."""
    (tmp_path / "ok.txt").write_text("fine")
    if name:
        (tmp_path / name).write_bytes(content) if isinstance(content, bytes) else (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError) as e:
        check_sources((files("ok.txt"), cfg), tmp_path, None)
    assert str(e.value).startswith("data.sources[1]")
    return str(e.value)


def test_glob_matching_nothing(tmp_path):
    msg = bad(tmp_path, files("corpus/*.txt"), name=None, content=None)
    assert msg == "data.sources[1].paths: 'corpus/*.txt' matches no file; put files there or fix the glob"


def test_unsupported_extension(tmp_path):
    assert "unsupported extension" in bad(tmp_path, files("*.csv"), name="a.csv", content="text\nhi\n")


def test_empty_sources(tmp_path):
    assert "holds no documents" in bad(tmp_path, files("e.txt"), name="e.txt", content="")
    assert "holds no documents" in bad(tmp_path, files("e.jsonl"), name="e.jsonl", content="")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    assert "holds no documents" in bad(tmp_path, files("e.parquet"), name=None, content=None)


def test_missing_text_field_names_the_fields_there(tmp_path):
    msg = bad(tmp_path, files("a.jsonl"), name="a.jsonl", content='{"body": "hi", "id": 1}\n')
    assert msg.startswith("data.sources[1].text_field: ") and "no field 'text' (fields: body, id)" in msg


def test_text_field_not_a_string(tmp_path):
    assert "field 'text' holds int, not a string" in bad(tmp_path, files("a.jsonl"), name="a.jsonl",
                                                          content='{"text": 7}\n')


def test_unreadable_file(tmp_path):
    msg = bad(tmp_path, files("a.jsonl"), name="a.jsonl", content="not json\n")
    assert msg.startswith("data.sources[1].paths: ") and "a.jsonl:1: not a JSON object" in msg and "\n" not in msg


def test_non_utf8_txt_names_the_file(tmp_path):
    msg = bad(tmp_path, files("a.txt"), name="a.txt", content=b"ok\n\xff\xfe")
    assert "a.txt:2: not UTF-8 text (byte 0xff)" in msg
