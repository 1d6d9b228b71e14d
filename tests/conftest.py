import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Small enough that the whole DAG runs in about a minute on 2 cores, large enough to exercise every path
# (grad accumulation, several evals, held-out people, multiple-choice, sampling).
TINY = {
    "data": {"world": {"n_people": 40, "bios_per_person": 2, "n_arithmetic": 20}},
    "tokenizer": {"vocab_size": 400},
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 128},
    "pretrain": {"max_steps": 4, "micro_batch_size": 4, "tokens_per_step": 1024, "warmup_steps": 1,
                 "eval_interval": 2, "eval_batches": 1, "log_interval": 1},
    "sft": {"max_steps": 4, "micro_batch_size": 4, "tokens_per_step": 1024, "warmup_steps": 1,
            "eval_interval": 2, "eval_batches": 1, "log_interval": 1},
    "dpo": {"max_steps": 4, "micro_batch_size": 2, "tokens_per_step": 1024, "warmup_steps": 1,
            "eval_interval": 2, "eval_batches": 1, "log_interval": 1},
    "evaluate": {"max_questions": 8, "max_mc_items": 8, "val_batches": 1, "micro_batch_size": 8,
                 "n_samples": 2, "max_new_tokens": 8},
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) else v
    return out


def project_env(project: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(project / "src")  # the copy's code, not the installed one
    env.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def sh(cmd: str, cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, shell=True, cwd=cwd, env=env or project_env(cwd), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"`{cmd}` failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def copy_project(dest: Path) -> Path:
    """The project's tracked and new (not ignored) files, in a fresh git repo with one commit."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file() and not rel.startswith(("data/", "checkpoints/", "metrics/")) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(merge(params, TINY), sort_keys=False))
    # a repo-local identity, so commits (ours and dvc exp's) work on machines without a global one
    sh("git init -q -b main && git config user.name gptlab-test && git config user.email test@gptlab.invalid"
       " && git add -A && git commit -qm init", dest)
    return dest


@pytest.fixture(scope="session")
def tokenized(tmp_path_factory) -> Path:
    """The tiny project after `dvc repro tokenize`, made once per session: copy it with `tokenized_copy`."""
    project = copy_project(tmp_path_factory.mktemp("tokenized") / "proj")
    sh("dvc repro tokenize", project)
    return project


def tokenized_copy(tokenized: Path, dest: Path) -> Path:
    """A project of its own whose tokenize stage is done and up to date (git history and DVC cache included),
    so a test starts at pretrain without tokenizing the same tiny world again. DVC's state database holds
    absolute paths and inodes: it is left behind and rebuilt."""
    shutil.copytree(tokenized, dest, symlinks=True, ignore=shutil.ignore_patterns("tmp"))
    return dest


@pytest.fixture(scope="session")
def tiny_project(tokenized, tmp_path_factory) -> Path:
    """A copy of the project with tiny params after one full `dvc repro`."""
    project = tokenized_copy(tokenized, tmp_path_factory.mktemp("work") / "proj")
    proc = sh("dvc repro", project)
    (project / "repro.log").write_text(proc.stdout + proc.stderr)
    return project
