"""Provenance: a checkpoint's meta.json names its ancestors by weights hash, the git commit and the resolved
params, and `gptlab info` prints that lineage and whether each ancestor's folder still holds those weights."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from gptlab import provenance
from gptlab.checkpoint import read_meta, save_checkpoint
from gptlab.cli import main as cli_main
from gptlab.config import Params, TokenizerConfig
from gptlab.model import GPT, GPTConfig
from gptlab.stage import stage_meta
from gptlab.tokenizer import train_tokenizer

TOK = train_tokenizer(TokenizerConfig(kind="char"), ["abcdefgh"])
CONFIG = GPTConfig(1, 2, 16, 64, TOK.n_vocab)


def git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "HOME": str(repo), "PATH": "/usr/bin:/bin"}
    return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True).stdout


def save(folder: Path, seed: int, meta: dict) -> dict:
    torch.manual_seed(seed)
    save_checkpoint(folder, GPT(CONFIG), {**meta, "step": seed}, TOK)
    return read_meta(folder)


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    git(tmp_path, "init", "-q")
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    git(tmp_path, "add", "params.yaml")
    git(tmp_path, "commit", "-qm", "one")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def chain(repo) -> dict[str, dict]:
    """pretrain -> sft -> dpo checkpoints under checkpoints/, each meta made by stage_meta as the stages make it."""
    params = Params()
    ck = repo / "checkpoints"
    metas = {"pretrain": save(ck / "pretrain", 1, stage_meta("pretrain", params, ("model", "pretrain")))}
    metas["sft"] = save(ck / "sft", 2, stage_meta("sft", params, ("sft",), "checkpoints/pretrain", metas["pretrain"]))
    metas["dpo"] = save(ck / "dpo", 3, stage_meta("dpo", params, ("dpo",), "checkpoints/sft", metas["sft"]))
    return metas


def test_git_state_names_the_commit_and_whether_tracked_files_changed(repo, tmp_path_factory):
    head = git(repo, "rev-parse", "HEAD").strip()
    assert provenance.git_state(repo) == {"commit": head, "dirty": False}
    (repo / "untracked.txt").write_text("x")  # outputs a stage writes are not a change to the code
    assert provenance.git_state(repo) == {"commit": head, "dirty": False}
    (repo / "params.yaml").write_text("seed: 2\n")  # as `dvc exp run -S` leaves it
    assert provenance.git_state(repo) == {"commit": head, "dirty": True}
    assert provenance.git_state(tmp_path_factory.mktemp("not-a-repo")) == {"commit": None, "dirty": None}


def test_each_checkpoint_names_every_ancestor_by_its_weights_hash(chain, repo):
    head = git(repo, "rev-parse", "HEAD").strip()
    dpo = chain["dpo"]
    assert [a["stage"] for a in dpo["lineage"]] == ["pretrain", "sft"]
    assert [a["weights_sha256"] for a in dpo["lineage"]] == [chain[s]["weights"]["sha256"] for s in ("pretrain", "sft")]
    assert [a["folder"] for a in dpo["lineage"]] == ["checkpoints/pretrain", "checkpoints/sft"]
    assert dpo["init_sha256"] == chain["sft"]["weights"]["sha256"] and dpo["init_from"] == "checkpoints/sft"
    assert chain["pretrain"]["lineage"] == [] and chain["pretrain"]["init_from"] == "scratch"
    assert all(m["git"] == {"commit": head, "dirty": False} for m in chain.values())
    assert dpo["params"]["dpo"]["beta"] == Params().dpo.beta and dpo["params"]["preset"] == ""


def info(*args: str, capsys) -> tuple[int, str, str]:
    code = cli_main(["info", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_prints_the_lineage_with_hashes_and_what_each_folder_holds_now(chain, repo, capsys):
    code, out, _ = info("checkpoints/dpo", capsys=capsys)
    assert code == 0
    lines = out.splitlines()
    rows = lines[lines.index("lineage (oldest first):") + 1:]
    assert [r.split()[0] for r in rows] == ["pretrain", "→", "→"] and [r.split()[1] for r in rows[1:]] == ["sft", "dpo"]
    for row, stage in zip(rows, ("pretrain", "sft", "dpo")):
        assert chain[stage]["weights"]["sha256"][:16] in row
    assert rows[0].endswith("(same weights here)") and rows[2].endswith("(this checkpoint)")
    assert f"git {git(repo, 'rev-parse', 'HEAD')[:12]}" in lines[2]
    # sft retrained since: the dpo checkpoint still says which sft it came from, and that the folder moved on
    save(repo / "checkpoints" / "sft", 9, {"stage": "sft"})
    _, out, _ = info("checkpoints/dpo", capsys=capsys)
    assert "now holds other weights" in out.splitlines()[5] and chain["sft"]["weights"]["sha256"][:16] in out


def test_info_json_and_params(chain, capsys):
    _, out, _ = info("checkpoints/sft", "--json", capsys=capsys)
    data = json.loads(out)
    assert data["lineage"][0]["weights_sha256"] == chain["pretrain"]["weights"]["sha256"]
    assert set(data) >= {"stage", "weights", "lineage", "git", "params"} and "model" not in data
    _, out, _ = info("checkpoints/sft", "--params", capsys=capsys)
    assert f"  sft.lr = {Params().sft.lr}" in out.splitlines()


def test_info_on_a_non_checkpoint_is_one_error_line(repo, capsys):
    code, out, err = info("checkpoints/nope", capsys=capsys)
    assert code == 2 and err.startswith("error: checkpoints/nope/meta.json: not found") and err.count("\n") == 1
