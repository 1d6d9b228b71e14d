"""What made a checkpoint, recorded in its meta.json so that a pulled copy says it without the repo's history.

    "init_from":   the start point's folder ("scratch" for pretrain)
    "init_sha256": the start point's weights' SHA-256 (a dpo model's reference too); the one name of that hash,
                   also in a resume state's inputs and in data/ref_logps/meta.json
    "lineage":     every ancestor, oldest first: {stage, folder, step, weights_sha256}
    "params":      the resolved params sections the stage read (a preset's values merged in), and the preset

No git state: meta.json used to record the commit (and whether the work tree was dirty) where the stage ran.
A run is made before the commit that records it, so that commit never matched, and it made every checkpoint's
bytes differ between identical runs at different commits, so a fresh clone's `dvc repro` dirtied dvc.lock. The
commit that made a checkpoint is the one whose dvc.lock records its hash. (Older checkpoints still carry a
"git" field; nothing reads it.)

`gptlab info CHECKPOINT` prints this lineage, and says for each ancestor whether the folder it came from
still holds the same weights.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TypedDict

from gptlab.checkpoint import GPTLAB, load_model, model_kind, read_meta
from gptlab.config import GptlabError

PROVENANCE_FIELDS = ("stage", "step", "weights", "init_from", "init_sha256", "lineage", "params")
EXPORTED_META = "gptlab_meta.json"  # an export-hf folder's copy of its checkpoint's meta.json


class Ancestor(TypedDict):
    """One lineage entry."""

    stage: str
    folder: str
    step: int | None
    weights_sha256: str | None


class Meta(TypedDict, total=False):
    """A checkpoint's meta.json. stage_meta writes the provenance fields, training adds step and metrics, and
    gptlab.checkpoint.save_checkpoint adds model, tokenizer and weights."""

    stage: str
    init_from: str
    init_sha256: str  # absent for pretrain (scratch)
    template: str  # sft and dpo: the chat template of their data
    lineage: list[Ancestor]
    params: dict
    step: int
    metrics: dict
    model: dict  # a GPTConfig
    tokenizer: dict  # Tokenizer.describe()
    weights: dict  # {"bytes": int, "sha256": str} of model.safetensors


def init_sha256(parent_meta: dict) -> str | None:
    """What a model started from `parent_meta`'s weights records as its init_sha256: their SHA-256 (None for a
    checkpoint from before meta.json recorded it)."""
    return parent_meta.get("weights", {}).get("sha256")


def ancestor(folder: str | Path, meta: dict) -> Ancestor:
    """One lineage entry: a start point as its child records it."""
    return {"stage": meta.get("stage", "?"), "folder": str(folder), "step": meta.get("step"),
            "weights_sha256": init_sha256(meta)}


def lineage(folder: str | Path, meta: dict) -> list[Ancestor]:
    """The start point's own lineage (without the git state older checkpoints recorded), then the start point."""
    return [*({k: a.get(k) for k in Ancestor.__annotations__} for a in meta.get("lineage", [])),
            ancestor(folder, meta)]


# --- gptlab info ------------------------------------------------------------------------------------------

def read_provenance(folder: str | Path) -> tuple[dict, str]:
    """(meta, what the folder is) of any folder gptlab.checkpoint.load_model opens (and refuses what it
    refuses, with its message): a checkpoint's meta.json; for a Hugging Face folder, an export-hf folder's
    gptlab_meta.json, or else the meta load_model builds (which reads the weights, to hash them)."""
    folder = Path(folder)
    if model_kind(folder) == GPTLAB:
        return read_meta(folder), "a gptlab checkpoint"
    exported = folder / EXPORTED_META
    if exported.is_file():  # before the GPT-2 checks: an export of a char or bpe model is no GPT-2 import
        try:
            return json.loads(exported.read_text()), f"a Hugging Face export of a gptlab checkpoint ({exported})"
        except (OSError, ValueError) as e:
            raise GptlabError(f"{exported}: unreadable ({e}); export the checkpoint again") from None
    return load_model(folder)[2], "a Hugging Face GPT-2 folder"


def now_holds(entry: dict) -> str:
    """Whether the folder an ancestor came from still holds its weights, as a short note."""
    folder = Path(entry["folder"])
    try:
        kind = model_kind(folder)
    except GptlabError:
        return "not here" if not os.path.lexists(folder) else "no model here now"
    try:  # a Hugging Face start point's hash is its files': only loading it tells
        meta = read_meta(folder) if kind == GPTLAB else load_model(folder)[2]
    except GptlabError:
        return "now unreadable"
    sha = init_sha256(meta)
    return "same weights here" if sha == entry["weights_sha256"] else f"now holds other weights ({(sha or '?')[:12]})"


def describe(folder: str | Path, show_params: bool = False) -> str:
    """The lines `gptlab info` prints."""
    meta, what = read_provenance(folder)
    weights = meta.get("weights", {}).get("sha256") or "?"
    preset = meta.get("params", {}).get("preset")
    lines = [f"{folder}: {what}",
             f"  stage {meta.get('stage', '?')}, step {meta.get('step', '?')}, weights sha256 {weights}"
             + (f", preset {preset}" if preset else ""),
             "lineage (oldest first):"]
    chain = [*meta.get("lineage", []), {**ancestor(folder, meta), "this": True}]
    for i, entry in enumerate(chain):
        arrow = "  " if i == 0 else "→ "
        note = "this checkpoint" if entry.get("this") else now_holds(entry)
        lines.append(f"  {arrow}{entry['stage']:<8} step {entry['step']!s:<6} weights {(entry['weights_sha256'] or '?')[:16]}  "
                     f"{entry['folder']} ({note})")
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
