"""Robustness of the data path and the launcher: no weights make the mix spin forever, a dead dvc always ends
the stage, a killed rank is named, fine-tuning records with an empty response are dropped and counted, caps and
repeats are reported, and an empty split says which setting emptied it.

The stages run in-process (as tests/test_bad_input.py's run_case does) on a tiny project copy; anything that
could loop runs under `deadline`, which fails the test instead of hanging it."""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, copy_project, merge, project_env

from gptlab import stage
from gptlab.config import ConfigError, GptlabError, SFTData, SourceConfig, WorldConfig
from gptlab.data import sources as src
from gptlab.data.finetune import hub_mc_items, sft_sets
from gptlab.data.sources import check_weights, mixed_documents, tokenizer_sample
from gptlab.data.world import build_world

pytestmark = pytest.mark.slow  # the stage tests share one tiny project, tokenized and trained in-process


# --- helpers ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (not hang) when the body runs past `seconds`: SIGALRM interrupts even a loop that yields nothing."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s: a loop that never ends")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_stage(project: Path, name: str, seconds: int = 300) -> tuple[int, str, str]:
    """One stage's main under gptlab.stage.run, in-process in `project`: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(project)
    try:
        with deadline(seconds), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module = importlib.import_module(f"stages.{name}")
            try:
                stage.run(module.main)
                code = 0
            except SystemExit as e:
                code = e.code
    finally:
        os.chdir(cwd)
    return code, out.getvalue(), err.getvalue()


def set_params(project: Path, change: dict) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(merge(params, change), sort_keys=False))


def replace_sources(project: Path, sources: list[dict], **data) -> None:
    """data.sources replaced whole (merge would keep the world's entry), plus other data keys."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["sources"] = sources
    params["data"].update(data)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def write_lines(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_docs(project: Path, n: int, folder: str = "corpus/small") -> str:
    """n one-line .txt documents; returns their glob."""
    (project / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (project / folder / f"doc{i}.txt").write_text(f"Document number {i} tells a short story about a cat.\n")
    return f"{folder}/*.txt"


def digest(project: Path) -> dict[str, str]:
    return {str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest()
            for top in ("data", "checkpoints") for p in sorted((project / top).rglob("*")) if p.is_file()}


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def one_error(code: int, err: str) -> str:
    """The one `error:` line of a run that rejected its input (exit 2, no traceback)."""
    assert code == 2, err
    assert "Traceback" not in err and len(error_lines(err)) == 1, err
    return error_lines(err)[0]


def stage_line(out: str, name: str) -> str:
    """The stage's announcement: the line that begins `[name]` and says what it runs on."""
    lines = [line for line in out.splitlines() if line.startswith(f"[{name}] ") and " | " in line]
    assert lines, out
    return lines[0]


@pytest.fixture(autouse=True, scope="module")
def stages_importable():
    sys.path.insert(0, str(ROOT))
    yield
    sys.path.remove(str(ROOT))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """The tiny project, nothing run; one tokenizer process (the shards are the same for any count)."""
    project = copy_project(tmp_path_factory.mktemp("robust") / "fresh")
    set_params(project, {"data": {"workers": 1}})
    return project


@pytest.fixture(scope="module")
def tokenized_base(fresh, tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("robust") / "tokenized"
    shutil.copytree(fresh, project)
    code, _, err = run_stage(project, "tokenize")
    assert code == 0, err
    return project


@pytest.fixture(scope="module")
def trained_base(tokenized_base, tmp_path_factory) -> Path:
    """tokenize, pretrain and sft done (their tiny params), so sft and dpo can start."""
    project = tmp_path_factory.mktemp("robust") / "trained"
    shutil.copytree(tokenized_base, project)
    for name in ("pretrain", "sft"):
        code, _, err = run_stage(project, name)
        assert code == 0, err
    return project


def copy_of(base: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "p"))


# --- 1. the mix ends, whatever the weights ------------------------------------------------------------------

@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig(n_people=20, bios_per_person=1, n_arithmetic=5), seed=3)


def test_a_negligible_weight_is_refused_by_check_and_tokenize_before_any_work(fresh, tmp_path):
    """data.sources [world 1.0, files 1e-300] used to make `dvc repro tokenize` spin forever, printing nothing."""
    p = copy_of(fresh, tmp_path)
    glob = write_docs(p, 3)
    replace_sources(p, [{"kind": "world", "weight": 1.0}, {"kind": "files", "paths": [glob], "weight": 1e-300}])
    for name in ("check", "tokenize"):
        line = one_error(*run_stage(p, name, seconds=60)[::2])
        assert line.startswith("error: data.sources[1].weight: 1e-300 is 1e-300 of the total weight"), line
        assert "raise it to at least 1e-06" in line and "or remove the source" in line, line
    assert not (p / "data" / "shards").exists()  # refused before any work


def test_the_suggested_minimum_weight_is_accepted(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.sources\[2\]\.weight: 1e-07 .* at least 1\.5e-06"):
        check_weights((SourceConfig(kind="world", weight=1.0), SourceConfig(kind="world", weight=0.5),
                       SourceConfig(kind="world", weight=1e-7)))
    check_weights((SourceConfig(kind="world", weight=1.0), SourceConfig(kind="world", weight=0.5),
                   SourceConfig(kind="world", weight=1.5e-6)))


@pytest.mark.parametrize("weights, match", [
    ((float("inf"), 1.0), r"data\.sources\[0\]\.weight: inf is not a finite number"),
    ((1e308, 1e308), r"data\.sources: the weights sum to inf .* scale them all down"),
])
def test_weights_the_mix_cannot_normalise_are_refused(weights, match):
    with pytest.raises(ConfigError, match=match):
        check_weights(tuple(SourceConfig(kind="world", weight=w) for w in weights))


def test_a_rare_source_is_read_to_its_end_once_the_others_are_done(tmp_path, world):
    """Weight 1e-5 is allowed: after the world runs out, each of its documents takes ~1e5 picks, skipped in bulk."""
    for i in range(3):
        (tmp_path / f"d{i}.txt").write_text(f"rare document {i}")
    sources = (SourceConfig(kind="world", weight=1.0), SourceConfig(kind="files", paths=("d*.txt",), weight=1e-5))
    with deadline(60):
        docs = list(mixed_documents(sources, 1, tmp_path, world, set()))
        sample = tokenizer_sample(sources, 1, tmp_path, world, max_chars=10**9)
    assert [d.text for d in docs if d.source == 1] == [f"rare document {i}" for i in range(3)]
    n_world = len(world.pretrain_docs("train")) + len(world.pretrain_docs("val"))
    assert sum(d.source == 0 for d in docs) == n_world
    assert sample[-3:] == [f"rare document {i}" for i in range(3)]  # read last, after the whole world


def test_a_source_the_mix_can_never_draw_ends_it_with_an_error(tmp_path, world, monkeypatch):
    """The loop's own bound, with the weight check out of the way: a run of MAX_IDLE_PICKS picks that land on
    finished sources only ends the mix with one line, never an endless loop."""
    monkeypatch.setattr(src, "MIN_SHARE", 0.0)  # what a caller that skips check_weights would pass
    (tmp_path / "d.txt").write_text("never drawn")
    sources = (SourceConfig(kind="world", weight=1.0), SourceConfig(kind="files", paths=("d.txt",), weight=1e-300))
    with deadline(60), pytest.raises(GptlabError, match=r"data\.sources\[1\] \(weight 1e-300\): not drawn once in "
                                                        r"67108864 picks .* raise its weight"):
        list(mixed_documents(sources, 1, tmp_path, world, set()))


def test_a_corpus_that_is_all_validation_or_capped_to_nothing_ends(tmp_path, world):
    """Loops that could spin on small inputs: a val_share that leaves no training document, a stop set naming
    every stream before the first pick, a tokenizer sample with nothing to learn from; each ends. (A cap reached
    at the first document: test_an_empty_split_names_the_source_and_what_emptied_it[capped-first].)"""
    for i in range(3):
        (tmp_path / f"d{i}.txt").write_text(f"doc {i}")
    held = (SourceConfig(kind="files", paths=("d*.txt",), val_share=0.95),)
    with deadline(30):
        assert {d.split for d in mixed_documents(held, 1337, tmp_path, None, set())} == {"val"}
        everything = {(0, "train"), (0, "val"), (1, "train"), (1, "val")}
        both = (SourceConfig(kind="world", weight=1.0), SourceConfig(kind="files", paths=("d*.txt",), weight=1.0))
        assert list(mixed_documents(both, 1, tmp_path, world, everything)) == []
        assert tokenizer_sample(held, 1337, tmp_path, None, max_chars=1) == []  # val only: nothing to learn from


# --- 2. the watcher always exits ----------------------------------------------------------------------------

WATCH = """
import subprocess, sys, threading, time
from gptlab import launch
dvc = subprocess.Popen(["sleep", "0.5"])  # stands in for dvc: it dies, a zombie nobody reaps
anchor = (dvc.pid, launch._proc_stat(dvc.pid)[2])
threading.Thread(target=launch._watch, args=(anchor, "pretrain"), daemon=True).start()
time.sleep(60)  # the stage, training on
"""


@pytest.mark.parametrize("closed", ["pipe", "stream"])
def test_the_watcher_exits_when_dvc_is_gone_even_if_it_cannot_print(tmp_path, closed):
    """dvc's end of the pipe closed (BrokenPipeError), or stderr closed in the process (ValueError): the print
    fails, the exit must still happen, or the stage trains on as an orphan."""
    script = WATCH if closed == "pipe" else "import sys; sys.stderr.close()\n" + WATCH
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    if closed == "pipe":
        proc.stderr.close()  # the reader is gone: the watcher's print raises BrokenPipeError
    try:
        code = proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert code == 1


# --- 3. a rank killed by a signal is named --------------------------------------------------------------------

def wait_for_lock(project: Path, name: str, timeout: float = 120) -> int:
    """The pid holding the stage's lock once the stage has started (see gptlab.stage.hold_lock)."""
    lock = project / ".dvc" / "tmp" / "gptlab-locks" / f"{name}.lock"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if lock.exists() and lock.read_text().strip():
            time.sleep(2)  # into the training loop
            return int(lock.read_text())
        time.sleep(0.2)
    raise AssertionError("the stage never started")


def test_a_rank_killed_by_sigkill_is_one_line_and_exit_137(tokenized_base, tmp_path):
    """What the OOM killer does: the rank dies without a word; `gptlab run` says so and exits 128 + 9 (not 247)."""
    p = copy_of(tokenized_base, tmp_path)
    set_params(p, {"pretrain": {"max_steps": 100000, "eval_interval": 100000, "log_interval": 1000}})
    proc = subprocess.Popen(["gptlab", "run", "pretrain"], cwd=p, env=project_env(p), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        os.kill(wait_for_lock(p, "pretrain"), signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 137, (out, err)
    assert error_lines(err) == [error_lines(err)[0]] and "Traceback" not in err, err
    assert error_lines(err)[0].startswith("error: [pretrain] killed by signal KILL (out of memory?"), err
    assert error_lines(err)[0].endswith("run it again to resume (a training stage continues from its last saved "
                                        "state, the others start over)"), err


# --- 4. empty responses, caps and repeats ----------------------------------------------------------------------

def alpaca(n: int, empty: dict[int, str]) -> list[dict]:
    return [{"instruction": f"Say the number {i}.", "input": "", "output": empty.get(i, f"The number is {i}.")}
            for i in range(n)]


def test_sft_drops_empty_responses_counts_them_and_names_many_epochs(trained_base, tmp_path):
    """14 alpaca records, 3 with an empty output (two training, one held out): they are dropped and the
    announcement says so; 10 steps of 8 rows over the 6 left is 13 epochs, which it says plainly."""
    p = copy_of(trained_base, tmp_path)
    write_lines(p / "finetune" / "alpaca.jsonl", alpaca(14, {0: "", 3: "   ", 6: ""}))
    set_params(p, {"sft": {"max_steps": 10, "eval_interval": 10, "save_interval": 0,
                           "data": {"format": "alpaca", "paths": ["finetune/alpaca.jsonl"], "val_share": 0.3}}})
    code, out, err = run_stage(p, "sft")
    assert code == 0, err
    line = stage_line(out, "sft")
    assert "| dropped 3 records with an empty response |" in line, line
    assert "| examples 6 |" in line, line
    assert "| 13 epochs over 6 records (sft.max_steps 10 x 8 records per step; add records or lower" in line, line


def test_an_ordinary_epoch_count_stays_a_number(trained_base, tmp_path):
    p = copy_of(trained_base, tmp_path)
    write_lines(p / "finetune" / "alpaca.jsonl", alpaca(40, {}))
    set_params(p, {"sft": {"max_steps": 2, "eval_interval": 2, "save_interval": 0,
                           "data": {"format": "alpaca", "paths": ["finetune/alpaca.jsonl"], "val_share": 0.3}}})
    code, out, err = run_stage(p, "sft")
    assert code == 0, err
    line = stage_line(out, "sft")
    assert "| epochs 0.6" in line and "dropped" not in line and "epochs over" not in line, line


def test_sft_with_every_response_empty_is_one_line_naming_the_file_and_field(trained_base, tmp_path):
    p = copy_of(trained_base, tmp_path)
    write_lines(p / "finetune" / "alpaca.jsonl", alpaca(5, {i: "" for i in range(5)}))
    set_params(p, {"sft": {"data": {"format": "alpaca", "paths": ["finetune/alpaca.jsonl"], "val_share": 0.3}}})
    before = digest(p)
    line = one_error(*run_stage(p, "sft")[::2])
    assert line == ("error: sft.data: alpaca from finetune/alpaca.jsonl: 5 of the 5 records read have an empty "
                    "response (field output), leaving none to train on; fill in the responses or point sft.data "
                    "at other data"), line
    assert digest(p) == before


def test_chat_records_with_an_empty_assistant_turn_are_dropped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                          {"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]}
            for i in range(8)]
    rows[1]["messages"][1]["content"] = ""  # an empty earlier turn: trains end-of-text alone there
    rows[4]["messages"][3]["content"] = "\n"
    write_lines(tmp_path / "finetune" / "chat.jsonl", rows)
    sets = sft_sets(SFTData(format="messages", paths=("finetune/chat.jsonl",), val_share=0.3), seed=1337)
    assert sets.empty == 2 and len(sets.train) + len(sets.heldout) == 6
    assert all(m.content.strip() for c in sets.train + sets.heldout for m in c.messages)


def prefs(n: int) -> list[dict]:
    return [{"prompt": f"Pick a number {i}.", "chosen": f"{i}.", "rejected": f"I will not say {i}."}
            for i in range(n)]


def test_dpo_drops_pairs_with_an_empty_chosen_or_rejected_and_says_so(trained_base, tmp_path):
    p = copy_of(trained_base, tmp_path)
    rows = prefs(12)
    rows[1]["chosen"], rows[5]["rejected"] = "", " "
    write_lines(p / "finetune" / "prefs.jsonl", rows)
    set_params(p, {"dpo": {"data": {"format": "preference", "paths": ["finetune/prefs.jsonl"], "val_share": 0.3}}})
    code, out, err = run_stage(p, "ref_logps")
    assert code == 0, err
    code, out, err = run_stage(p, "dpo")
    assert code == 0, err
    line = stage_line(out, "dpo")
    assert "| dropped 2 records with an empty response |" in line and "| pairs 8" in line, line


def test_a_cap_that_whole_documents_overshoot_is_reported_with_the_count(fresh, tmp_path):
    p = copy_of(fresh, tmp_path)
    set_params(p, {"data": {"max_tokens": 5}})
    code, out, err = run_stage(p, "tokenize")
    assert code == 0, err
    n = json.loads((p / "data" / "info.json").read_text())["n_tokens"]["train"]
    assert n > 5
    assert (f"| caps data.max_tokens 5 took {n} train tokens (whole documents are taken: the one that reaches a "
            "cap is kept whole, EOT included)") in stage_line(out, "tokenize")


# --- 5. an empty split says which setting emptied it ---------------------------------------------------------

@pytest.mark.parametrize("n_docs, source, data, message", [
    (3, {"val_share": 0.2}, {}, "no validation documents: data.sources[0] (files corpus/small/*.txt): 3 documents, "
                                "val_share 0.2 gives 0 validation documents; add documents or raise "
                                "data.sources[0].val_share"),
    (3, {"val_share": 0.95}, {}, "no training documents: data.sources[0] (files corpus/small/*.txt): val_share 0.95 "
                                 "sent all 3 of its documents to validation; lower data.sources[0].val_share or add "
                                 "documents"),
    (10, {"val_share": 0.2}, {"max_tokens": 5}, "no validation documents: data.sources[0] (files corpus/small/*.txt): "
                                                "data.max_tokens 5 stopped it after 1 document, none held out by "
                                                "val_share 0.2; raise the cap or data.sources[0].val_share"),
    (3, {}, {}, "no validation documents: data.sources[0] (files corpus/small/*.txt) holds out no documents; set "
                "data.sources[0].val_share (e.g. 0.05)"),
], ids=["too-few-for-val", "all-val", "capped-first", "no-val-share"])
def test_an_empty_split_names_the_source_and_what_emptied_it(tokenized_base, tmp_path, n_docs, source, data, message):
    p = copy_of(tokenized_base, tmp_path)
    glob = write_docs(p, n_docs)
    replace_sources(p, [{"kind": "files", "paths": [glob], **source}], **data)
    before = digest(p)
    line = one_error(*run_stage(p, "tokenize", seconds=120)[::2])
    assert line == f"error: [tokenize] {message}", line
    assert digest(p) == before  # the old data/ is all still there


@pytest.mark.parametrize("n, share, message", [
    (2, 0.2, "sft.data: alpaca from finetune/a.jsonl: 2 records, val_share 0.2 held out none of them; raise "
             "sft.data.val_share or add records"),
    (3, 0.9, "sft.data: alpaca from finetune/a.jsonl: 3 records, val_share 0.9 held out all of them; lower "
             "sft.data.val_share or add records"),
])
def test_a_fine_tuning_split_left_empty_says_how_many_records_and_the_share(tmp_path, monkeypatch, n, share, message):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "finetune" / "a.jsonl", alpaca(n, {}))
    with pytest.raises(GptlabError) as e:
        sft_sets(SFTData(format="alpaca", paths=("finetune/a.jsonl",), val_share=share), seed=1337)
    assert str(e.value) == message


def test_an_unlabelled_item_blames_the_split_only_when_it_is_not_the_validation_split(tmp_path):
    repo = tmp_path / "mc"
    repo.mkdir()
    item = {"ctx": "A cat", "endings": [" sat.", " flew."], "label": ""}
    for split in ("validation", "test"):
        write_lines(repo / f"{split}.jsonl", [item])
    with pytest.raises(GptlabError) as e:
        hub_mc_items(str(repo), "", "validation", "")
    assert "use the validation split" not in str(e.value) and str(e.value).endswith("fix the item or leave it out")
    with pytest.raises(GptlabError, match=r"use the validation split \(evaluate\.mc_split\)"):
        hub_mc_items(str(repo), "", "test", "")


def test_a_hub_load_without_network_fails_at_once_in_one_line(tmp_path):
    """The hub client retries five times (25 s of "Retrying in Ns" lines) before saying there is no network;
    one quick connection attempt first makes it fail offline, at once, quietly."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # nothing listens on port 9
    code = ("from gptlab.data.finetune import hub_mc_items\n"
            "from gptlab.config import GptlabError\n"
            "try:\n    hub_mc_items('Rowan/hellaswag', '', 'validation', '')\n"
            "except GptlabError as e:\n    print(e)\n")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - t0 < 15
    assert out.stdout.startswith("evaluate.mc_path: cannot open Rowan/hellaswag") and "Offline" in out.stdout, out
    assert "Retrying" not in out.stderr and out.stderr.strip() == "", out.stderr
