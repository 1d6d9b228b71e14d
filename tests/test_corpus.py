"""Real corpora end to end: a `files` source through the real DAG, tokenize's dependency on corpus/, and
shards from a parquet + jsonl mix read through `datasets` that come out byte-identical twice."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import copy_project, sh
from test_failures import edit_params

pytestmark = pytest.mark.slow
# every letter and the punctuation of the world's questions and answers, so the char vocabulary covers them
VERSE = ("ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and Juliet is the sun!\n"
         "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG.\n")


def write_corpus(project: Path) -> None:
    corpus = project / "corpus"
    for k in range(3):
        (corpus / f"play{k}.txt").write_text("\n\n".join(f"{VERSE}Scene {k}.{n}." for n in range(40)))


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_a_world_and_files_mix_with_the_char_tokenizer_runs_the_dag_and_reruns_tokenize_when_a_file_changes(tmp_path):
    """`tokenizer.kind: char` over the world and a files source: every stage runs (it once failed in tokenize,
    on the world's fine-tuning rows), generation decodes, and an edited corpus file reruns tokenize."""
    project = copy_project(tmp_path / "files")
    write_corpus(project)
    edit_params(project, {
        "data": {"sources": [{"kind": "world", "weight": 0.5},
                             {"kind": "files", "paths": ["corpus/*.txt"], "separator": "\n\n", "val_share": 0.2,
                              "weight": 0.5}]},
        # a character per token: the longest question + padded answer (~150 characters) needs a longer context
        "tokenizer": {"kind": "char"}, "model": {"block_size": 256},
    })
    sh("git add -A && git commit -qm corpus", project)
    out = sh("dvc repro", project)
    assert "sources[1] files corpus/*.txt (3 files" in out.stdout + out.stderr
    assert "Running stage 'evaluate@dpo'" in out.stdout
    info = json.loads((project / "data" / "info.json").read_text())
    assert info["tokenizer"]["kind"] == "char" and info["tokenizer"]["n_vocab"] < 100
    assert "entropy_floor" not in info
    assert info["n_tokens"]["train"] > info["n_tokens"]["val"] > 0
    for model in ("pretrain", "sft", "dpo"):  # the world's sets still fine-tune and evaluate
        assert "exact_match" in json.loads((project / "metrics" / "evaluate" / model / "metrics.json").read_text())
    gen = sh("gptlab generate checkpoints/dpo --chat --prompt 'Where was Q born?' --max_tokens 5", project)
    assert gen.stdout.startswith("Question: Where was Q born?\nAnswer:")
    assert "up to date" in sh("dvc status", project).stdout
    with open(project / "corpus" / "play1.txt", "a") as f:
        f.write("\n\nJULIET:\nO Romeo, Romeo!\n")
    status = sh("dvc status tokenize", project).stdout
    assert "tokenize" in status and "corpus" in status and "modified" in status


def test_a_parquet_and_jsonl_mix_gives_byte_identical_shards_twice(tmp_path):
    project = copy_project(tmp_path / "mix")
    corpus = project / "corpus"
    pq.write_table(pa.table({"text": [f"parquet document {i} about apples." for i in range(600)]}),
                   corpus / "a.parquet")
    (corpus / "b.jsonl").write_text("".join(json.dumps({"text": f"jsonl document {i} about pears."}) + "\n"
                                            for i in range(600)))
    edit_params(project, {"data": {"sources": [
        {"kind": "files", "paths": ["corpus/a.parquet"], "val_share": 0.3, "weight": 0.7},
        {"kind": "files", "paths": ["corpus/b.jsonl"], "val_share": 0.3, "weight": 0.3}],
        "max_tokens": 3000, "workers": 2},  # the budget ends the mix early: the weights show in what it took
        "model": {"block_size": 256}})  # a bpe learnt on these documents alone spells the world's answers out
    env_run = "gptlab run check && gptlab run tokenize"
    sh(env_run, project)
    first = digest(project / "data" / "shards")
    per_source = json.loads((project / "data" / "info.json").read_text())["sources"]
    share = per_source[0]["docs"] / (per_source[0]["docs"] + per_source[1]["docs"])
    assert 0.6 < share < 0.8, per_source
    os.rename(project / "data" / "shards", project / "first")
    sh(env_run, project)
    assert digest(project / "data" / "shards") == first
