"""Checkpoints: `model.safetensors` (weights, HF GPT-2 names) + `meta.json` (everything needed to rebuild
and interpret them: model config, tokenizer, resolved params, step, key metrics, parent checkpoint).

Both files are written to temp names and renamed, the meta last, so a folder with a meta is complete.
Loading uses safetensors only: nothing is unpickled.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gptlab.config import GptlabError
from gptlab.fileio import atomic_path, atomic_write_json
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import Tokenizer, load_tokenizer

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
TIED = "lm_head.weight"  # shares storage with transformer.wte.weight; stored once


class CheckpointError(GptlabError):
    pass


def save_checkpoint(directory: str | Path, model: GPT, meta: dict, tok: Tokenizer) -> None:
    """Weights, the tokenizer they were trained with (so a pulled checkpoint stands alone), then meta."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(directory / TOKENIZER_DIR)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != TIED}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_json(directory / META_FILE, {**meta, "tokenizer": tok.describe(), "model": model.config.__dict__})


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: not found; is {directory} a checkpoint folder (dvc repro / dvc pull)?")
    return json.loads(path.read_text())


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Rebuild the model from meta.json and load its weights; returns (model, meta)."""
    directory = Path(directory)
    meta = read_meta(directory)
    model = GPT(GPTConfig(**meta["model"]))
    state = load_file(str(directory / WEIGHTS_FILE), device="cpu")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{directory}: weights do not fit the model in meta.json: {e}") from None
    if unexpected or set(missing) - {TIED}:
        raise CheckpointError(
            f"{directory}: weights do not fit the model in meta.json (missing {sorted(set(missing) - {TIED})}, "
            f"unexpected {sorted(unexpected)})"
        )
    return model.to(device), meta


def checkpoint_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved beside the weights; its fingerprint must match the one meta.json names."""
    tok = load_tokenizer(Path(directory) / TOKENIZER_DIR)
    expected = read_meta(directory)["tokenizer"]["fingerprint"]
    if tok.fingerprint != expected:
        raise CheckpointError(f"{directory}: tokenizer fingerprint {tok.fingerprint} != meta.json's {expected}")
    return tok
