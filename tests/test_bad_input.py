"""The bad-input matrix: each case breaks one thing the way a user, a full disk or a crash would, then runs
the real entry point that reads it (a stage's main under `gptlab.stage.run`, or `gptlab generate`).

Every case must: exit non-zero, print exactly one line, `error: ...`, that names the key, file or folder,
print no traceback, and leave every file already written (data/, checkpoints/, metrics/) as it was, except
the one the case damaged. The stages run in-process for speed; tests/test_failures.py runs the same kinds of
failure through `gptlab run`, `accelerate launch` and `dvc repro`.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml
from conftest import ROOT

from gptlab import stage
from gptlab.checkpoint import save_checkpoint
from gptlab.cli import main as cli_main
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow  # needs the tiny pipeline's outputs (one `dvc repro`, shared by the session)
OUTPUT_DIRS = ("data", "checkpoints", "metrics", "src")  # src: a folder of the user's
TRAIN, VAL = "data/shards/train_000000.bin", "data/shards/val_000000.bin"


@dataclass(frozen=True)
class Case:
    name: str
    damage: Callable[[Path], None]  # breaks one thing in the project copy
    run: str  # a stage name (and its argv), or a `gptlab` command of CLI_COMMANDS and its arguments
    needles: tuple[str, ...]  # what the error line must name
    rewrites: tuple[str, ...] = ()  # outputs the run may legitimately replace before failing
    progress: bool = False  # the problem shows only once the input is read: a progress bar comes first


# --- helpers that damage a project copy ---------------------------------------------------------------

def set_param(dotted: str, value):
    def damage(p: Path) -> None:
        params = yaml.safe_load((p / "params.yaml").read_text())
        *parents, key = dotted.split(".")
        node = params
        for k in parents:
            node = node[k]
        node[key] = value
        (p / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return damage


def rename_section(old: str, new: str):
    def damage(p: Path) -> None:
        params = yaml.safe_load((p / "params.yaml").read_text())
        params[new] = params.pop(old)
        (p / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return damage


def write_text(rel: str, text: str):
    return lambda p: _replace(p / rel, text.encode())


def write_bytes(rel: str, data: bytes):
    return lambda p: _replace(p / rel, data)


def _replace(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)  # never write through a file DVC may have linked from its cache
    path.write_bytes(data)


def remove(rel: str):
    def damage(p: Path) -> None:
        target = p / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return damage


def truncate(rel: str, keep: float = 0.5):
    def damage(p: Path) -> None:
        data = (p / rel).read_bytes()
        _replace(p / rel, data[: int(len(data) * keep)])
    return damage


def edit_json(rel: str, change: Callable[[dict], None]):
    def damage(p: Path) -> None:
        obj = json.loads((p / rel).read_text())
        change(obj)
        _replace(p / rel, json.dumps(obj).encode())
    return damage


def edit_jsonl(rel: str, change: Callable[[list], list]):
    def damage(p: Path) -> None:
        rows = [json.loads(line) for line in (p / rel).read_text().splitlines()]
        _replace(p / rel, "".join(json.dumps(r) + "\n" for r in change(rows)).encode())
    return damage


def shard_header(rel: str, change: Callable[[dict], None]):
    """Rewrite a shard's JSON header in place of the original (same 256 bytes)."""
    def damage(p: Path) -> None:
        data = (p / rel).read_bytes()
        head = json.loads(data[8:256].decode())
        change(head)
        _replace(p / rel, data[:8] + json.dumps(head).encode().ljust(248) + data[256:])
    return damage


def shard_id(rel: str, value: int):
    """Overwrite the last token id of a uint16 shard."""
    def damage(p: Path) -> None:
        data = bytearray((p / rel).read_bytes())
        data[-2:] = struct.pack("<H", value)
        _replace(p / rel, bytes(data))
    return damage


def nan_checkpoint(stage_name: str):
    """A complete, consistent checkpoint whose weights are all NaN (it would generate blanks)."""
    def damage(p: Path) -> None:
        folder = p / "checkpoints" / stage_name
        meta = json.loads((folder / "meta.json").read_text())
        model = GPT(GPTConfig(**{k: meta["model"][k] for k in GPTConfig.__dataclass_fields__}))
        for param in model.parameters():
            param.data.fill_(float("nan"))
        tok = load_tokenizer(folder / "tokenizer")
        save_checkpoint(folder, model, {k: v for k, v in meta.items() if k not in ("model", "tokenizer")}, tok)
    return damage


def swap_weights(into: str, source: str):
    """Weights from one checkpoint beside another's meta.json: a kill-mid-write kind of mix-up."""
    def damage(p: Path) -> None:
        _replace(p / "checkpoints" / into / "model.safetensors", (p / "checkpoints" / source / "model.safetensors").read_bytes())
    return damage


def files_source(globs: list[str], files: dict[str, str | bytes] | None = None):
    """A second source, of kind files, beside the world; `files` are written first (text or raw bytes)."""
    def damage(p: Path) -> None:
        for rel, content in (files or {}).items():
            (p / rel).parent.mkdir(parents=True, exist_ok=True)
            (p / rel).write_bytes(content if isinstance(content, bytes) else content.encode())
        set_param("data.sources", [{"kind": "world", "weight": 1.0}, {"kind": "files", "paths": globs, "weight": 1.0}])(p)
    return damage


def finetune_data(key: str, fmt: str, rows: list[dict]):
    """`key` (sft.data or dpo.data) read from finetune/bad.jsonl holding `rows`."""
    def damage(p: Path) -> None:
        (p / "finetune" / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        set_param(key, {"format": fmt, "paths": ["finetune/bad.jsonl"], "val_share": 0.2})(p)
    return damage


def jsonl_line_7_broken(p: Path) -> None:
    good = json.dumps({"text": "a document"})
    files_source(["corpus/x.jsonl"], {"corpus/x.jsonl": "\n".join([good] * 3 + [""] + [good] * 2 + ['{"text": 1'])})(p)


def same_pairs(rows: list) -> list:
    return [{**r, "rejected": r["chosen"]} for r in rows]


def relabel(rows: list) -> list:
    return [{**rows[0], "label": 7}, *rows[1:]]


CASES = [
    # params.yaml: caught by the check stage, before any stage whose outputs DVC would delete
    Case("lr-as-string", set_param("pretrain.lr", "2e-4"), "check", ("pretrain.lr", "2.0e-4")),
    Case("misspelt-section", rename_section("pretrain", "pretrian"), "check", ("pretrian", "did you mean 'pretrain'")),
    Case("float-steps", set_param("sft.max_steps", 1.5), "check", ("sft.max_steps", "integer")),
    Case("embd-vs-heads", set_param("model.n_embd", 33), "check", ("model.n_embd", "model.n_head")),
    Case("beta-zero", set_param("dpo.beta", 0.0), "check", ("dpo.beta",)),
    Case("tokenizer-kind", set_param("tokenizer.kind", "wordpiece"), "check", ("tokenizer.kind", "char")),
    Case("bias-yes", set_param("model.bias", "yes"), "check", ("model.bias", "true or false")),
    Case("negative-seed", set_param("seed", -1), "check", ("seed",)),
    Case("too-many-wordings", set_param("data.world.wordings", 99), "check", ("data.world.wordings", "at most")),
    Case("heldout-frac", set_param("data.world.heldout_frac", 1.5), "check", ("data.world.heldout_frac",)),
    Case("temperature-text", set_param("evaluate.temperature", "hot"), "check", ("evaluate.temperature",)),
    Case("section-not-mapping", set_param("model", "big"), "check", ("model", "mapping")),
    Case("tokens-per-step", set_param("sft.tokens_per_step", 1000), "check", ("sft.tokens_per_step", "multiple")),
    Case("block-size-vs-data", set_param("model.block_size", 16), "check", ("model.block_size", "longest")),
    Case("yaml-syntax", write_text("params.yaml", "seed: [1,\n"), "check", ("params.yaml", "YAML", "line 2")),
    Case("params-missing", remove("params.yaml"), "check", ("params.yaml", "not found")),
    # data.sources: config-level and local-file problems, also caught by check
    Case("source-kind", set_param("data.sources", [{"kind": "ftp", "weight": 1.0}]), "check",
         ("data.sources[0].kind", "world")),
    Case("source-weight-zero", set_param("data.sources", [{"kind": "world", "weight": 0.0}]), "check",
         ("data.sources[0].weight",)),
    Case("source-no-kind", set_param("data.sources", [{"weight": 1.0}]), "check", ("data.sources[0].kind", "missing")),
    Case("source-key-of-other-kind", set_param("data.sources", [{"kind": "world", "paths": ["x.txt"]}]), "check",
         ("data.sources[0].paths", "only for kind files")),
    Case("source-glob-matches-nothing", files_source(["corpus/*.txt"]), "check",
         ("data.sources[1].paths", "corpus/*.txt", "matches no file")),
    Case("source-unsupported-file", files_source(["corpus/a.csv"], {"corpus/a.csv": "x,y\n"}), "check",
         ("data.sources[1].paths", "a.csv")),
    Case("source-empty-files", files_source(["corpus/*.txt"], {"corpus/a.txt": "", "corpus/b.txt": " \n"}), "check",
         ("data.sources[1].paths", "no documents")),
    Case("source-missing-text-field", files_source(["corpus/d.jsonl"], {"corpus/d.jsonl": '{"body": "hi"}\n'}), "check",
         ("data.sources[1].text_field", "'text'", "body")),
    Case("source-not-utf8", files_source(["corpus/*.txt"], {"corpus/a.txt": b"caf\xe9"}), "check",
         ("data.sources[1].paths", "a.txt", "UTF-8")),
    # token shards
    Case("shards-missing", remove("data/shards"), "pretrain", ("data/shards",)),
    Case("shard-truncated", truncate(TRAIN), "pretrain", (TRAIN,)),
    Case("shard-dtype-edited", shard_header(TRAIN, lambda h: h.update(dtype="uint32")), "pretrain", (TRAIN,)),
    Case("shard-bad-magic", write_bytes(VAL, b"NOTASHARD" * 40), "pretrain", (VAL,)),
    Case("shard-header-json", write_bytes(TRAIN, b"GPTLABTK" + b"{not json" + b" " * 300), "pretrain", (TRAIN,)),
    Case("shard-id-out-of-vocab", shard_id(TRAIN, 65535), "pretrain", (TRAIN,)),
    Case("val-shard-damaged-for-evaluate", truncate(VAL, 0.9), "evaluate pretrain", (VAL,)),
    # tokenizer and info.json
    Case("tokenizer-json", write_text("data/tokenizer/tokenizer.json", "{oops"), "pretrain",
         ("data/tokenizer/tokenizer.json",)),
    Case("tokenizer-regex", edit_json("data/tokenizer/tokenizer.json", lambda t: t.update(pattern="(a+)+$")),
         "pretrain", ("data/tokenizer/tokenizer.json", "pattern")),
    Case("bpe-ranks-line", write_text("data/tokenizer/bpe.tiktoken", "not-a-rank-line\n"), "pretrain",
         ("data/tokenizer/bpe.tiktoken",)),
    Case("info-json", write_text("data/info.json", "{"), "pretrain", ("data/info.json",)),
    Case("info-missing-key", edit_json("data/info.json", lambda i: i.pop("longest_example")), "pretrain",
         ("data/info.json", "longest_example")),
    # jsonl sets
    Case("sft-bad-json-line", write_text("data/sft_train.jsonl", '{"question": "q", "response": " r"}\n{oops\n'),
         "sft", ("data/sft_train.jsonl:2",)),
    Case("sft-missing-field", edit_jsonl("data/sft_train.jsonl", lambda rows: [{"question": "q"}, *rows]), "sft",
         ("data/sft_train.jsonl:1", "response")),
    Case("sft-not-object", write_text("data/sft_train.jsonl", "[1, 2]\n"), "sft", ("data/sft_train.jsonl:1",)),
    Case("sft-not-utf8", write_bytes("data/sft_train.jsonl", b'{"question": "\xff\xfe", "response": "x"}\n'), "sft",
         ("data/sft_train.jsonl",)),
    Case("sft-empty", write_text("data/sft_train.jsonl", ""), "sft", ("data/sft_train.jsonl",)),
    Case("sft-heldout-empty", write_text("data/sft_heldout.jsonl", ""), "sft", ("data/sft_heldout.jsonl",)),
    Case("prefs-chosen-is-rejected", edit_jsonl("data/prefs_train.jsonl", same_pairs), "dpo",
         ("data/prefs_train.jsonl", "chosen")),
    Case("prefs-heldout-empty", write_text("data/prefs_heldout.jsonl", ""), "dpo", ("data/prefs_heldout.jsonl",)),
    Case("mc-label-out-of-range", edit_jsonl("data/mc_eval.jsonl", relabel), "evaluate sft",
         ("data/mc_eval.jsonl:1", "label")),
    Case("mc-endings-not-list", edit_jsonl("data/mc_eval.jsonl", lambda rows: [{**rows[0], "endings": "x"}]),
         "evaluate sft", ("data/mc_eval.jsonl:1", "endings")),
    # checkpoints, read by the next stage
    Case("ckpt-missing", remove("checkpoints/pretrain"), "sft", ("checkpoints/pretrain",)),
    Case("ckpt-weights-truncated", truncate("checkpoints/pretrain/model.safetensors"), "sft",
         ("checkpoints/pretrain",)),
    Case("ckpt-meta-json", write_text("checkpoints/pretrain/meta.json", "{"), "sft", ("checkpoints/pretrain",)),
    Case("ckpt-unknown-model-key", edit_json("checkpoints/pretrain/meta.json", lambda m: m["model"].update(foo=1)),
         "sft", ("checkpoints/pretrain", "foo")),
    Case("ckpt-absurd-size", edit_json("checkpoints/sft/meta.json", lambda m: m["model"].update(n_embd=2**30)),
         "dpo", ("checkpoints/sft",)),
    Case("ckpt-nan-weights", nan_checkpoint("sft"), "dpo", ("checkpoints/sft", "NaN")),
    Case("ckpt-weights-from-elsewhere", swap_weights("pretrain", "dpo"), "sft", ("checkpoints/pretrain",)),
    Case("ckpt-dpo-damaged-for-evaluate", truncate("checkpoints/dpo/model.safetensors", 0.9), "evaluate dpo",
         ("checkpoints/dpo",)),
    Case("evaluate-unknown-model", lambda p: None, "evaluate nope", ("evaluate.models", "nope", "pretrain, sft, dpo")),
    Case("evaluate-model-folder-missing", set_param("evaluate.models", {"gpt2": "models/gpt2"}), "check",
         ("evaluate.models.gpt2", "models/gpt2", "not found")),
    Case("evaluate-model-folder-outside", set_param("evaluate.models", {"x": "/tmp/x"}), "check",
         ("evaluate.models.x", "/tmp/x")),
    Case("evaluate-model-folder-not-a-model", set_param("evaluate.models", {"t": "models/README.md"}), "check",
         ("evaluate.models.t", "models/README.md", "holds neither")),
    Case("evaluate-ref-logps-stale", write_text("data/ref_logps/meta.json", '{"init_sha256": "ab", "pairs": {}}'),
         "evaluate dpo", ("data/ref_logps", "rerun the ref_logps stage")),
    # gptlab generate
    Case("generate-truncated", truncate("checkpoints/dpo/model.safetensors"), "generate checkpoints/dpo --prompt x",
         ("checkpoints/dpo",)),
    Case("generate-not-a-checkpoint", lambda p: None, "generate data --prompt x", ("data",)),
    Case("generate-missing-folder", lambda p: None, "generate checkpoints/nope --prompt x", ("checkpoints/nope",)),
    Case("generate-temperature-nan", lambda p: None, "generate checkpoints/dpo --prompt x --temperature nan",
         ("--temperature",)),
    Case("generate-top-p", lambda p: None, "generate checkpoints/dpo --prompt x --top_p 1.5", ("--top_p",)),
    Case("generate-no-tokenizer", remove("checkpoints/sft/tokenizer"), "generate checkpoints/sft --prompt x",
         ("checkpoints/sft",)),
    Case("generate-nan-weights", nan_checkpoint("pretrain"), "generate checkpoints/pretrain --prompt x",
         ("checkpoints/pretrain", "NaN")),
    # found by probing as a user would (issue 17): each was a hang, a traceback, a wrong hint or silent
    Case("source-weight-negligible", set_param("data.sources", [{"kind": "world", "weight": 1.0},
                                                                {"kind": "files", "paths": ["corpus/*.txt"], "weight": 1e-300}]),
         "check", ("data.sources[1].weight", "raise it")),
    Case("source-jsonl-line-7", jsonl_line_7_broken, "tokenize", ("corpus/x.jsonl:7", "not a JSON object")),
    Case("source-too-few-validation-documents",
         lambda p: (files_source(["corpus/tiny.txt"], {"corpus/tiny.txt": "one\n\ntwo\n\nthree"})(p),
                    set_param("data.sources", [{"kind": "files", "paths": ["corpus/tiny.txt"], "separator": "\n\n",
                                                "val_share": 0.2, "weight": 1.0}])(p)),
         "tokenize", ("data.sources[0]", "3 documents", "0 validation documents"), progress=True),
    Case("params-quoted-number", set_param("pretrain.lr", "1.0"), "check", ("pretrain.lr", "quotes")),
    Case("sft-every-response-empty", finetune_data("sft.data", "alpaca", [{"instruction": f"say {i}", "output": ""}
                                                                         for i in range(10)]),
         "sft", ("sft.data", "finetune/bad.jsonl", "empty response")),
    Case("evaluate-mc-path-outside-finetune", lambda p: ((p / "mc").mkdir(), (p / "mc" / "validation.jsonl").write_text(
        json.dumps({"ctx": "c", "endings": ["a", "b"], "label": 0}) + "\n"), set_param("evaluate.mc_path", "mc")(p)),
         "check", ("evaluate.mc_path", "mc/validation.jsonl", "outside finetune/")),
    Case("generate-max-tokens-huge", lambda p: None, "generate checkpoints/dpo --prompt x --max_tokens 1000000000000",
         ("--max_tokens", "at most")),
    Case("generate-missing-folder-not-a-stage", lambda p: None, "generate checkpoints/nope --prompt x",
         ("checkpoints/nope", "not found", "checkpoints/pretrain")),
    # gptlab export-hf
    Case("export-overwrite-a-users-folder", lambda p: None, "export-hf checkpoints/pretrain src --overwrite",
         ("src", "not an earlier export", "--overwrite will not replace it")),
    # faults during training
    # (its metrics folder holds the failed run's curve up to the bad step: what a user needs to see why)
    Case("loss-goes-nan", set_param("pretrain.lr", 1.0e30), "pretrain", ("pretrain", "loss is"), ("metrics/pretrain", "metrics/timing")),
]


CLI_COMMANDS = ("generate", "export-hf", "info", "show-example")


# --- running a case ---------------------------------------------------------------------------------

def snapshot(project: Path) -> dict[str, str]:
    out = {}
    for top in OUTPUT_DIRS:
        for path in sorted((project / top).rglob("*")):
            if path.is_file():
                out[str(path.relative_to(project))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def outside(files: dict[str, str], rewrites: tuple[str, ...]) -> dict[str, str]:
    return {k: v for k, v in files.items() if not any(k.startswith(r) for r in rewrites)}


def run_case(project: Path, command: str) -> tuple[int, str]:
    """Run one entry point in-process in `project`; returns (exit code, everything it printed to stderr)."""
    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(project)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if command.split()[0] in CLI_COMMANDS:
                code = cli_main(command.split())
            else:
                name, *args = command.split()  # e.g. "evaluate dpo": the stage module and its argv
                module = importlib.import_module(f"stages.{name}")
                argv, sys.argv = sys.argv, [name, *args]
                try:
                    stage.run(module.main)
                    code = 0
                except SystemExit as e:
                    code = e.code
                finally:
                    sys.argv = argv
    finally:
        os.chdir(cwd)
    return code, err.getvalue()


@pytest.fixture(scope="module")
def pristine(tiny_project, tmp_path_factory) -> Path:
    """The tiny project after `dvc repro`, without DVC's cache and git (the cases only read outputs)."""
    dest = tmp_path_factory.mktemp("matrix") / "base"
    shutil.copytree(tiny_project, dest, ignore=shutil.ignore_patterns(".git", "cache", "tmp"))
    return dest


@pytest.fixture(autouse=True, scope="module")
def stages_importable():
    sys.path.insert(0, str(ROOT))
    yield
    sys.path.remove(str(ROOT))


def test_the_matrix_has_at_least_40_cases():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_line_and_loses_nothing(case, pristine, tmp_path):
    project = tmp_path / "p"
    shutil.copytree(pristine, project)
    case.damage(project)
    before = snapshot(project)
    code, err = run_case(project, case.run)
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert case.rewrites or case.progress or lines == errors, err  # only a run that had started printed progress
    for needle in case.needles:
        assert needle in errors[0], (needle, errors[0])
    # nothing already written was changed or lost, and no half-written file was added
    assert outside(snapshot(project), case.rewrites) == outside(before, case.rewrites)


def test_tokenize_that_cannot_encode_its_sets_fails_before_writing_anything(pristine, tmp_path, monkeypatch):
    """Everything is encoded before the first file is written: a failure leaves data/ as it was."""
    from gptlab.data.world import World

    project = tmp_path / "p"
    shutil.copytree(pristine, project)
    set_param("tokenizer.kind", "char")(project)
    items = World.mc_items  # every item with a character the world's text never has: none can be encoded
    monkeypatch.setattr(World, "mc_items", lambda self: [{**item, "ctx": "price in €"} for item in items(self)])
    before = snapshot(project)
    code, err = run_case(project, "tokenize")
    error = err.strip().splitlines()[-1]
    assert code == 2 and error.startswith("error: ") and "mc_eval" in error and "Traceback" not in err, err
    assert snapshot(project) == before
