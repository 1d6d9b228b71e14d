"""Failures through the real launchers: `dvc repro`, `gptlab run` (accelerate launch) with one and two ranks,
Ctrl-C, a killed dvc process, and a second run of a stage that is still running."""
from __future__ import annotations

import hashlib
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
from conftest import merge, project_env, sh, tokenized_copy

from gptlab import paths

pytestmark = pytest.mark.slow
OUTPUTS = ("data", "checkpoints", "metrics")


def digest(project: Path) -> dict[str, str]:
    return {str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest()
            for top in OUTPUTS for p in sorted((project / top).rglob("*")) if p.is_file()}


def edit_params(project: Path, change: dict) -> str:
    """Merge `change` into params.yaml; returns the old text so the caller can put it back."""
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(yaml.safe_dump(merge(yaml.safe_load(text), change), sort_keys=False))
    return text


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("change,needle", [
    ({"sft": {"lr": "2e-4"}}, "sft.lr"),  # YAML's string: caught by check before sft's outputs are deleted
    ({"model": {"block_size": 16}}, "model.block_size"),  # against the current data: before pretrain's
])
def test_a_rejected_params_change_loses_nothing_and_recomputes_nothing(tiny_project, change, needle):
    p = tiny_project
    before = digest(p)
    old = edit_params(p, change)
    try:
        out = sh("dvc repro", p, check=False)
    finally:
        (p / "params.yaml").write_text(old)
    log = out.stdout + out.stderr
    assert out.returncode != 0
    assert len(error_lines(log)) == 1 and needle in error_lines(log)[0], log
    assert "Traceback" not in log
    assert {k: v for k, v in digest(p).items() if k in before} == before  # every output still there, unchanged
    again = sh("dvc repro", p)
    log = again.stdout + again.stderr
    for stage in ("tokenize", "pretrain", "sft", "dpo", "evaluate"):
        assert f"Running stage '{stage}'" not in log, log
    assert digest(p) == before


def bad_corpus_record(p: Path) -> dict:
    """A jsonl corpus whose third record has no text: only tokenize, reading every record, finds it."""
    rows = [{"text": f"document {i}"} for i in range(6)]
    rows[2] = {"body": "no text field"}
    (p / "corpus" / "extra.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"data": {"sources": [{"kind": "world", "weight": 0.9},
                                 {"kind": "files", "paths": ["corpus/extra.jsonl"], "weight": 0.1}]}}


def damaged_init_weights(p: Path) -> dict:
    """sft.init names a copy of the pretrain checkpoint whose weights were damaged: its JSON is fine (what check
    reads), its SHA-256 is not (what sft's load checks)."""
    shutil.copytree(p / "checkpoints" / "pretrain", p / "models" / "damaged")
    weights = p / "models" / "damaged" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.unlink()
    weights.write_bytes(bytes(data))
    return {"sft": {"init": "models/damaged"}}


def bad_mc_item(p: Path) -> dict:
    """evaluate.mc_path: a local HellaSwag-schema folder whose fourth item's label is out of range."""
    items = [{"ctx": f"Item {i} says", "endings": [" a", " b"], "label": 0} for i in range(6)]
    items[3]["label"] = 7
    (p / "finetune" / "mc").mkdir()
    (p / "finetune" / "mc" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return {"evaluate": {"mc_path": "finetune/mc"}}


@pytest.mark.parametrize("make,stage,needle", [
    (bad_corpus_record, "tokenize", "extra.jsonl"),
    (damaged_init_weights, "sft", "models/damaged"),
    (bad_mc_item, "evaluate@pretrain", "label"),
], ids=["tokenize-record-3", "sft-init-weights", "evaluate-mc-item-4"])
def test_a_stage_that_finds_its_input_bad_keeps_every_output(tiny_project, make, stage, needle):
    """What only the stage can find (check reads params and first records only): DVC would have deleted the
    stage's outputs before running it (metrics are git-tracked: no cache brings them back); `persist: true`
    keeps them, and the stage replaces them only once it has succeeded."""
    p = tiny_project
    before = digest(p)
    old = edit_params(p, make(p))
    try:
        out = sh("dvc repro", p, check=False)
    finally:
        (p / "params.yaml").write_text(old)
        for extra in ("corpus/extra.jsonl", "models/damaged", "finetune/mc"):
            target = p / extra
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    log = out.stdout + out.stderr
    assert out.returncode != 0 and f"Running stage '{stage}'" in log, log
    assert len(error_lines(log)) == 1 and needle in error_lines(log)[0] and "Traceback" not in log, log
    # every output of every stage still there, unchanged; but check's list of the files each stage reads,
    # which check (it passed) wrote for the new params
    listed = str(paths.INPUTS)
    assert {k: v for k, v in digest(p).items() if not k.startswith(listed)} == \
        {k: v for k, v in before.items() if not k.startswith(listed)}
    again = sh("dvc repro", p).stdout
    for name in ("tokenize", "pretrain", "sft", "dpo", "evaluate"):  # check reran: its params are back
        assert f"Running stage '{name}" not in again, again


def test_a_misspelt_top_level_section_stops_dvc_repro(tiny_project):
    p = tiny_project
    text = (p / "params.yaml").read_text()
    (p / "params.yaml").write_text(text + "pretrian:\n  lr: 1.0e-3\n")
    try:
        out = sh("dvc repro", p, check=False)
    finally:
        (p / "params.yaml").write_text(text)
    assert out.returncode != 0
    assert "error: params.yaml: pretrian: unknown key" in out.stderr and "Traceback" not in out.stderr + out.stdout
    sh("dvc repro", p)  # back in sync for the other tests


def test_dvc_exp_run_with_a_bad_value_prints_one_line(tiny_project):
    p = tiny_project
    text = (p / "params.yaml").read_text()
    try:
        out = sh("dvc exp run -S sft.lr=fast", p, check=False)
    finally:
        (p / "params.yaml").write_text(text)
    log = out.stdout + out.stderr
    assert out.returncode != 0
    assert len(error_lines(log)) == 1 and "sft.lr" in error_lines(log)[0] and "Traceback" not in log, log
    sh("dvc repro", p)  # check's output back in place


def test_two_ranks_report_a_bad_input_once_with_no_launcher_report(tiny_project, tmp_path):
    p = tiny_project
    env = project_env(p)
    env.update(ACCELERATE_USE_CPU="1", TMPDIR=str(tmp_path))  # where the launcher's report marker goes
    old = edit_params(p, {"pretrain": {"lr": "2e-4"}})
    try:
        out = sh("gptlab run pretrain --multi_gpu --num_processes 2", p, env=env, check=False)
    finally:
        (p / "params.yaml").write_text(old)
    text = out.stdout + out.stderr
    assert out.returncode == 2
    assert error_lines(text) == [error_lines(text)[0]] and "pretrain.lr" in error_lines(text)[0], text
    assert "Traceback" not in text and "ChildFailedError" not in text and "exitcode" not in text, text
    assert not list(tmp_path.glob("gptlab-error-*"))  # the launcher removed its report marker


@pytest.fixture
def long_run(tokenized, tmp_path) -> Path:
    """A copy of the tiny project whose tokenize is done and whose pretrain would run for minutes."""
    project = tokenized_copy(tokenized, tmp_path / "long")
    edit_params(project, {"pretrain": {"max_steps": 100000, "eval_interval": 100000, "log_interval": 1000}})
    return project


def wait_for_training(project: Path, stage: str = "pretrain", timeout: float = 60) -> int:
    """The pid of the process holding the stage's lock once it has started (see gptlab.stage.hold_lock)."""
    lock = project / ".dvc" / "tmp" / "gptlab-locks" / f"{stage}.lock"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.exists() and lock.read_text().strip():
            time.sleep(2)  # into the training loop
            return int(lock.read_text())
        time.sleep(0.2)
    raise AssertionError("the stage never started")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_ctrl_c_under_dvc_repro_stops_within_seconds_with_one_line(long_run):
    proc = subprocess.Popen(["dvc", "repro", "pretrain"], cwd=long_run, env=project_env(long_run),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    trainer = wait_for_training(long_run)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    out, _ = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 15
    assert proc.returncode != 0 and not alive(trainer)
    assert len(error_lines(out)) == 1 and "interrupted" in error_lines(out)[0], out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out


def test_killing_dvc_stops_the_stage_and_a_second_run_never_shares_its_folders(long_run):
    proc = subprocess.Popen(["dvc", "repro", "pretrain"], cwd=long_run, env=project_env(long_run),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    trainer = wait_for_training(long_run)
    proc.kill()  # kill -9 of dvc alone: its children are not signalled
    proc.wait()
    deadline = time.monotonic() + 10
    while alive(trainer) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(trainer), "the training process outlived the dvc that started it"


def test_a_second_run_of_a_running_stage_is_refused(long_run):
    """Two runs never write one output folder: the second waits for the lock, then stops with one line."""
    first = subprocess.Popen(["gptlab", "run", "pretrain"], cwd=long_run, env=project_env(long_run),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        holder = wait_for_training(long_run)
        env = project_env(long_run)
        env["GPTLAB_LOCK_WAIT_SECONDS"] = "1"
        out = sh("gptlab run pretrain", long_run, env=env, check=False)
        assert out.returncode == 2
        assert error_lines(out.stderr) == [error_lines(out.stderr)[0]] and f"pid {holder}" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
