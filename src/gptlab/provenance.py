"""What made a checkpoint, recorded in its meta.json so that a pulled copy says it without the repo's history.

    "init_from":   the start point's folder ("scratch" for pretrain)
    "init_sha256": the start point's weights' SHA-256 (a dpo model's reference too)
    "lineage":     every ancestor, oldest first: {stage, folder, step, weights_sha256, git}
    "git":         {"commit": HEAD's sha, "dirty": tracked files differ from it} where the stage ran (commit
                   null outside a git work tree); under `dvc exp run` params.yaml differs, so dirty is true and
                   "params" is what tells the experiment's values
    "params":      the resolved params sections the stage read (a preset's values merged in), and the preset

`gptlab info CHECKPOINT` prints this lineage, and says for each ancestor whether the folder it came from
still holds the same weights.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from gptlab.checkpoint import META_FILE, read_meta
from gptlab.config import GptlabError

PROVENANCE_FIELDS = ("stage", "step", "weights", "init_from", "init_sha256", "lineage", "git", "params")
GIT_TIMEOUT = 10  # seconds; a stage never waits longer than this for provenance


def git_state(cwd: str | Path = ".") -> dict:
    """{"commit": sha or None, "dirty": bool or None} of the work tree at `cwd`."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def ancestor(folder: str | Path, meta: dict) -> dict:
    """One lineage entry: a start point as its child records it."""
    return {"stage": meta.get("stage", "?"), "folder": str(folder), "step": meta.get("step"),
            "weights_sha256": meta.get("weights", {}).get("sha256"), "git": meta.get("git")}


def lineage(folder: str | Path, meta: dict) -> list[dict]:
    """The start point's own lineage, then the start point itself."""
    return [*meta.get("lineage", []), ancestor(folder, meta)]


# --- gptlab info ------------------------------------------------------------------------------------------

def read_provenance(folder: str | Path) -> tuple[dict, str]:
    """(meta, what the folder is) of a checkpoint, or of an export-hf folder's gptlab_meta.json."""
    folder = Path(folder)
    exported = folder / "gptlab_meta.json"
    if not (folder / META_FILE).exists() and exported.is_file():
        try:
            return json.loads(exported.read_text()), f"a Hugging Face export of a gptlab checkpoint ({exported})"
        except (OSError, ValueError) as e:
            raise GptlabError(f"{exported}: unreadable ({e}); export the checkpoint again") from None
    return read_meta(folder), "a gptlab checkpoint"


def now_holds(entry: dict) -> str:
    """Whether the folder an ancestor came from still holds its weights, as a short note."""
    folder = Path(entry["folder"])
    try:
        meta = read_meta(folder) if (folder / META_FILE).exists() else None
    except GptlabError:
        return "now unreadable"
    if meta is None:
        return "not here" if not folder.exists() else "not a gptlab checkpoint here"
    sha = meta.get("weights", {}).get("sha256")
    return "same weights here" if sha == entry["weights_sha256"] else f"now holds other weights ({(sha or '?')[:12]})"


def _git(g: dict | None) -> str:
    if not g or not g.get("commit"):
        return "git: unknown"
    return f"git {g['commit'][:12]}" + (" + uncommitted changes" if g.get("dirty") else "")


def describe(folder: str | Path, show_params: bool = False) -> str:
    """The lines `gptlab info` prints."""
    meta, what = read_provenance(folder)
    weights = meta.get("weights", {}).get("sha256") or "?"
    lines = [f"{folder}: {what}",
             f"  stage {meta.get('stage', '?')}, step {meta.get('step', '?')}, weights sha256 {weights}",
             f"  made at {_git(meta.get('git'))}" + (f", preset {meta['params']['preset']}"
                                                      if meta.get("params", {}).get("preset") else ""),
             "lineage (oldest first):"]
    chain = [*meta.get("lineage", []), {**ancestor(folder, meta), "this": True}]
    for i, entry in enumerate(chain):
        arrow = "  " if i == 0 else "→ "
        note = "this checkpoint" if entry.get("this") else now_holds(entry)
        lines.append(f"  {arrow}{entry['stage']:<8} step {entry['step']!s:<6} weights {(entry['weights_sha256'] or '?')[:16]}  "
                     f"{_git(entry.get('git'))}  {entry['folder']} ({note})")
    if meta.get("init_from") not in (None, "scratch") and not meta.get("lineage"):
        lines.append(f"  (made before lineage was recorded: started from {meta['init_from']})")
    if show_params:
        lines.append("params:")
        lines += [f"  {k} = {json.dumps(v)}" for k, v in _flat(meta.get("params", {}))]
    return "\n".join(lines)


def _flat(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v
