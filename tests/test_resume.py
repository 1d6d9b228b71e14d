"""Resume states: a stopped run continues bitwise where it stopped, refuses what it cannot continue, and a
state that is damaged or half-written is never loaded. In-process tests drive train() directly; the slow
ones kill a real `dvc repro` and compare with a run that was never interrupted."""
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from conftest import project_env, sh, tokenized_copy

from gptlab import fileio, paths, resume
from gptlab.config import GptlabError, TokenizerConfig, TrainConfig
from gptlab.losses import token_loss
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import train_tokenizer
from gptlab.train import Stopped, Task, train

CFG = TrainConfig(max_steps=12, micro_batch_size=4, tokens_per_step=64, lr=1.0e-2, min_lr=1.0e-3, warmup_steps=2,
                  eval_interval=4, log_interval=1, save_interval=3, keep_saves=2)
PARAMS = {"seed": 0, "pretrain": {"lr": CFG.lr, "save_interval": 3}}


class Killed(Exception):
    pass


def run(cfg=CFG, kill_at=None, inputs=None, params=PARAMS, dropout=0.1):
    """A tiny run of train() in the current folder; kill_at=k raises (like a kill) when step k starts.
    Dropout on, so the RNG state matters too."""
    torch.manual_seed(0)
    tok = train_tokenizer(TokenizerConfig(kind="char"), ["abcdefgh"])
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=16, dropout=dropout))
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, 8, (64, 9), generator=gen)

    def next_batch(step, micro):
        if step == kill_at:
            raise Killed
        rows = data[(step * 7 + micro * 4) % 60:][:4]
        return rows[:, :-1], rows[:, 1:]

    def loss(m, batch):
        return token_loss(m(batch[0]), batch[1]), {}, batch[0].numel()

    task = Task(next_batch, loss, lambda m: {"val_loss": token_loss(m(data[:8, :-1]), data[:8, 1:]).item()})
    meta = {"stage": "pretrain", "params": json.loads(json.dumps(params))}
    train(model, task, cfg, 2, Accelerator(cpu=True), "pretrain", meta, tok, inputs or {"data": "abc"})
    return (paths.checkpoint_dir("pretrain") / "model.safetensors").read_bytes()


def logged_steps(name="loss"):
    rows = (paths.metrics_dir("pretrain") / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()[1:]
    return [int(r.split("\t")[0]) for r in rows]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_killed_run_resumes_to_the_same_bytes_and_logs_each_step_once(workdir):
    reference = run()
    assert logged_steps() == list(range(1, 13))
    assert not paths.resume_dir("pretrain").exists()  # a finished run leaves no resume state
    for kill_at in (5, 7, 10):  # after the state of step 3 (between saves), right after step 6's, after 9's
        with pytest.raises(Killed):
            run(kill_at=kill_at)
        saved = resume.states(paths.resume_dir("pretrain"))
        assert [int(p.name[5:]) for p in saved] == [s for s in (9, 6, 3) if s < kill_at][:2]  # keep_saves=2
        assert run() == reference, f"killed at step {kill_at}"
        assert logged_steps() == list(range(1, 13)) and logged_steps("val_loss") == [4, 8, 12]


def test_a_changed_param_input_or_geometry_refuses_to_resume_and_says_what_differs(workdir):
    with pytest.raises(Killed):
        run(kill_at=5)
    root = paths.resume_dir("pretrain")
    cases = [
        (dict(params={**PARAMS, "pretrain": {"lr": 0.5, "save_interval": 3}}), "pretrain.lr: 0.01 then, 0.5 now"),
        (dict(inputs={"data": "xyz"}), 'data: "abc" then, "xyz" now'),
        (dict(cfg=TrainConfig(**{**CFG.__dict__, "micro_batch_size": 2})), "micro_batch_size: 4 then, 2 now"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(GptlabError) as e:
            run(**kwargs)
        assert needle in str(e.value) and f"rm -r {root}" in str(e.value), str(e.value)
    # changing how often states are saved changes nothing a run computes: it still resumes
    other = {**PARAMS, "pretrain": {"lr": CFG.lr, "save_interval": 5}}
    assert run(params=other) and not root.exists()


def test_a_damaged_state_is_named_and_never_loaded(workdir):
    with pytest.raises(Killed):
        run(kill_at=5)
    folder = resume.states(paths.resume_dir("pretrain"))[0]
    weights = folder / resume.MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(GptlabError, match=f"{weights}: does not match its SHA-256"):
        run()
    (folder / resume.STATE_FILE).write_text("{not json")
    with pytest.raises(GptlabError, match=f"{folder / resume.STATE_FILE}"):
        run()


def test_a_half_written_state_is_ignored_and_cleared(workdir):
    with pytest.raises(Killed):
        run(kill_at=8)
    root = paths.resume_dir("pretrain")
    half = root / ".step_0000009.tmp-999999999"  # what a killed write of step 9's state leaves (a gone pid)
    half.mkdir()
    (half / resume.MODEL_FILE).write_bytes(b"partial")
    reference_steps = [int(p.name[5:]) for p in resume.states(root)]
    assert reference_steps == [6, 3]
    with pytest.raises(Killed):
        run(kill_at=8)  # resumed from 6 (the half-written folder never counts) and cleared it
    assert not half.exists()


def test_sigterm_saves_a_state_then_stops(workdir):
    """The first SIGTERM/SIGINT finishes the step, saves, and stops with Stopped (exit 128+signal)."""
    def run_with_signal(step_to_signal):
        torch.manual_seed(0)
        tok = train_tokenizer(TokenizerConfig(kind="char"), ["abcdefgh"])
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=16))
        data = torch.randint(0, 8, (4, 9), generator=torch.Generator().manual_seed(1))

        def next_batch(step, micro):
            if step == step_to_signal and micro == 0:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)  # a second one (a launcher's follow-up) is ignored
            return data[:, :-1], data[:, 1:]

        task = Task(next_batch, lambda m, b: (token_loss(m(b[0]), b[1]), {}, b[0].numel()), lambda m: {"val_loss": 0.0})
        cfg = TrainConfig(**{**CFG.__dict__, "save_interval": 0})
        train(model, task, cfg, 2, Accelerator(cpu=True), "pretrain", {"stage": "pretrain", "params": PARAMS}, tok, {})

    with pytest.raises(Stopped) as e:
        run_with_signal(5)
    assert e.value.signum == signal.SIGTERM and "after step 5" in str(e.value)
    assert [p.name for p in resume.states(paths.resume_dir("pretrain"))] == ["step_0000005"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


# --- the real pipeline ------------------------------------------------------------------------------------

RESUMABLE = {"pretrain": {"max_steps": 24, "save_interval": 4, "log_interval": 1, "eval_interval": 6}}


def resumable_project(tokenized: Path, path: Path) -> Path:
    project = tokenized_copy(tokenized, path)
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in RESUMABLE.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git commit -qam resumable", project)
    return project


def training_pids(project: Path, stage: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"-m stages.{stage}"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if Path(f"/proc/{p}/cwd").resolve() == project.resolve()]


def steps_logged(project: Path) -> list[int]:
    rows = (project / "metrics/pretrain/plots/metrics/loss.tsv").read_text().splitlines()[1:]
    return [int(r.split("\t")[0]) for r in rows]


@pytest.fixture(scope="module")
def reference(tokenized, tmp_path_factory) -> bytes:
    """pretrain's weights from a run that was never interrupted."""
    project = resumable_project(tokenized, tmp_path_factory.mktemp("ref") / "proj")
    sh("dvc repro pretrain", project)
    return (project / "checkpoints/pretrain/model.safetensors").read_bytes()


@pytest.mark.slow
def test_sigkill_of_dvc_repro_at_a_random_moment_then_rerun_gives_the_same_bytes(tokenized, tmp_path, reference):
    project = resumable_project(tokenized, tmp_path / "proj")
    env = project_env(project)
    proc = subprocess.Popen("dvc repro pretrain", shell=True, cwd=project, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    root = project / paths.resume_dir("pretrain")
    deadline = time.monotonic() + 300
    while not resume.states(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert resume.states(root), "no resume state was saved"
    delay = random.Random().uniform(0.0, 2.0)  # somewhere after the first state, maybe during the next save
    time.sleep(delay)
    pids = training_pids(project, "pretrain")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=120)
    rerun = sh("dvc repro pretrain", project)
    if pids and proc.returncode != 0:  # it was killed mid-run (not already finished): it resumed
        assert "resuming after step" in rerun.stdout, (delay, rerun.stdout[-2000:])
    assert (project / "checkpoints/pretrain/model.safetensors").read_bytes() == reference, f"killed after {delay:.2f}s"
    assert steps_logged(project) == list(range(1, 25))
    assert not root.exists()


@pytest.mark.slow
def test_a_kill_while_writing_a_state_leaves_the_previous_one_loadable(tokenized, tmp_path, reference):
    project = resumable_project(tokenized, tmp_path / "proj")
    # killed half-way through step 8's state: its staging folder made, the RNG and model files written
    env = {**project_env(project), fileio.FAULT_ENV: "step_0000008:2"}
    first = sh("dvc repro pretrain", project, env=env, check=False)
    assert first.returncode != 0
    root = project / paths.resume_dir("pretrain")
    assert [p.name for p in resume.states(root)] == ["step_0000004"]
    assert [p.is_dir() for p in root.glob(".step_0000008.tmp-*")] == [True]
    rerun = sh("dvc repro pretrain", project)
    assert "resuming after step 4" in rerun.stdout
    assert (project / "checkpoints/pretrain/model.safetensors").read_bytes() == reference
    assert steps_logged(project) == list(range(1, 25))


@pytest.mark.slow
def test_ctrl_c_saves_a_state_and_the_next_run_continues_it(tokenized, tmp_path, reference):
    """A terminal's Ctrl-C reaches the launcher and the rank: the rank finishes its step and saves, the
    launcher waits for it, one `error:` line, exit 130; the next run resumes to the same bytes."""
    project = resumable_project(tokenized, tmp_path / "proj")
    sh("dvc repro tokenize", project)
    proc = subprocess.Popen(["gptlab", "run", "pretrain"], cwd=project, env=project_env(project),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = project / "metrics/pretrain/plots/metrics/loss.tsv"
    deadline = time.monotonic() + 300
    while not (log.exists() and len(log.read_text().splitlines()) > 6) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "interrupted" in errors[0], err
    stopped = [line for line in (out + err).splitlines() if "stopped by SIGINT after step" in line]
    assert len(stopped) == 1, out + err
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert resume.states(project / paths.resume_dir("pretrain"))[0].name == f"step_{step:07d}"
    again = sh("gptlab run pretrain", project)
    assert f"resuming after step {step}" in again.stdout
    assert (project / "checkpoints/pretrain/model.safetensors").read_bytes() == reference
    assert steps_logged(project) == list(range(1, 25))
