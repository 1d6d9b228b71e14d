"""Provenance: a checkpoint's meta.json names its ancestors by weights hash and the resolved params (no git
state), and `gptlab info` prints that lineage and whether each ancestor's folder still holds those weights."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from gptlab import paths, provenance, ref_logps, resume
from gptlab.checkpoint import read_meta, save_checkpoint
from gptlab.cli import main as cli_main
from gptlab.config import GptlabError, Params, TokenizerConfig
from gptlab.model import GPT, GPTConfig
from gptlab.stage import stage_inputs, stage_meta
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


def test_each_checkpoint_names_every_ancestor_by_its_weights_hash(chain, repo):
    dpo = chain["dpo"]
    assert [a["stage"] for a in dpo["lineage"]] == ["pretrain", "sft"]
    assert [a["weights_sha256"] for a in dpo["lineage"]] == [chain[s]["weights"]["sha256"] for s in ("pretrain", "sft")]
    assert [a["folder"] for a in dpo["lineage"]] == ["checkpoints/pretrain", "checkpoints/sft"]
    assert dpo["init_sha256"] == chain["sft"]["weights"]["sha256"] and dpo["init_from"] == "checkpoints/sft"
    assert chain["pretrain"]["lineage"] == [] and chain["pretrain"]["init_from"] == "scratch"
    assert dpo["params"]["dpo"]["beta"] == Params().dpo.beta and dpo["params"]["preset"] == ""
    # no git state: it differed between identical runs at different commits (and never named the commit that
    # records the run), so the same run must give the same meta.json wherever it is made
    assert all("git" not in m and all("git" not in a for a in m["lineage"]) for m in chain.values())
    git(repo, "commit", "-qm", "two", "--allow-empty")
    params = Params()
    again = stage_meta("sft", params, ("sft",), "checkpoints/pretrain", chain["pretrain"])
    assert json.loads(json.dumps(again)) == {k: v for k, v in chain["sft"].items()
                                             if k not in ("step", "model", "tokenizer", "weights")}


def test_an_older_parents_git_state_is_not_carried_into_the_lineage(chain):
    old = {**chain["sft"], "git": {"commit": "ab" * 20, "dirty": True},
           "lineage": [{**a, "git": {"commit": "cd" * 20, "dirty": False}} for a in chain["sft"]["lineage"]]}
    meta = stage_meta("dpo", Params(), ("dpo",), "checkpoints/sft", old)
    assert "git" not in meta and meta["lineage"] == chain["dpo"]["lineage"]
    assert meta["init_sha256"] == provenance.init_sha256(old) == old["weights"]["sha256"]


def test_the_start_points_hash_has_one_name_everywhere(chain):
    """init_sha256: in meta.json, a resume state's inputs and data/ref_logps/meta.json; states and log-prob files
    that still carry an older name are refused with their usual lines, never a KeyError."""
    sha = chain["dpo"]["init_sha256"]
    assert stage_inputs(chain["sft"]) == {"init_sha256": sha}
    logps = {"train": (torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0]))}
    ref_logps.write(logps, sha, {"train": "pairs"})
    assert json.loads((paths.REF_LOGPS / "meta.json").read_text())["init_sha256"] == sha
    assert ref_logps.read(sha, {"train": "pairs"})["train"][1].tolist() == [-3.0, -4.0]
    with pytest.raises(GptlabError, match="made from other weights .* rerun the ref_logps stage"):
        ref_logps.read("f" * 64, {"train": "pairs"})
    (paths.REF_LOGPS / "meta.json").unlink()
    (paths.REF_LOGPS / "meta.json").write_text(json.dumps({"sft_sha256": sha, "pairs": {}}))  # an older gptlab's
    with pytest.raises(GptlabError, match=r"made from other weights \(sft weights unnamed .* rerun the ref_logps"):
        ref_logps.read(sha, {"train": "pairs"})
    state = Path("resume") / "step_0000001"
    state.mkdir(parents=True)
    (state / "state.json").write_text(json.dumps({"step": 1, "files": {}, "fingerprint": {"inputs": {"init_weights": sha}}}))
    with pytest.raises(resume.ResumeError, match="saved by a run with other settings .*init_sha256"):
        resume.latest(state.parent, {"inputs": stage_inputs(chain["sft"])}, "dpo")


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
    assert "git" not in out
    # sft retrained since: the dpo checkpoint still says which sft it came from, and that the folder moved on
    save(repo / "checkpoints" / "sft", 9, {"stage": "sft"})
    _, out, _ = info("checkpoints/dpo", capsys=capsys)
    assert "now holds other weights" in out.splitlines()[4] and chain["sft"]["weights"]["sha256"][:16] in out


def test_info_json_and_params(chain, capsys):
    _, out, _ = info("checkpoints/sft", "--json", capsys=capsys)
    data = json.loads(out)
    assert data["lineage"][0]["weights_sha256"] == chain["pretrain"]["weights"]["sha256"]
    assert set(data) >= {"stage", "weights", "lineage", "params"} and "model" not in data and "git" not in data
    _, out, _ = info("checkpoints/sft", "--params", capsys=capsys)
    assert f"  sft.lr = {Params().sft.lr}" in out.splitlines()


def test_info_on_a_non_checkpoint_is_one_error_line(repo, capsys):
    code, out, err = info("checkpoints/nope", capsys=capsys)
    assert code == 2 and err.startswith("error: checkpoints/nope: not found") and err.count("\n") == 1
    assert "a model folder is a gptlab checkpoint" in err and "dvc repro" not in err  # no stage makes it
    _, _, err = info("checkpoints/sft", capsys=capsys)
    assert err.startswith("error: checkpoints/sft: not found") and "(dvc repro sft) or dvc pull" in err
