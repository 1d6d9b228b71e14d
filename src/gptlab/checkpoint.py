"""Checkpoints: a folder of `model.safetensors` (weights, HF GPT-2 names), `meta.json` (everything needed to
rebuild and interpret them: model config, tokenizer, weights checksum, resolved params, step, key metrics,
parent checkpoint) and `tokenizer/`.

A folder is one atomic unit, written by gptlab.fileio.replace_folder: a kill at any moment of a save leaves
the old checkpoint or the new one, whole, and the next save of the same folder clears up what a killed one left.
Loading never writes: a folder whose save was killed between its two renames (old one moved aside, new one not
yet in) is refused, naming the stage to rerun. Nothing is ever written through an existing file, which DVC may
have hard-linked from its cache.

Loading checks everything before trusting it: meta.json's shape and types, the weights' size and SHA-256
against meta.json, the tensor names and shapes against the model meta.json describes (before that model is
allocated), and that every weight is finite. Any damage is a CheckpointError naming the file and the fix.
Loading uses safetensors only: nothing is unpickled.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch
import torch

from gptlab import hf_gpt2, paths
from gptlab.config import GptlabError
from gptlab.fileio import check_fields, moved_aside, read_json, replace_folder, step, write_new
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import Tokenizer, TokenizerError, gpt2_tokenizer, load_tokenizer

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
TIED = "lm_head.weight"  # shares storage with transformer.wte.weight; stored once
MAX_LISTED = 8  # model folders a "not found" error names as what to pass instead


class CheckpointError(GptlabError):
    pass


# --- saving ---------------------------------------------------------------------------------------------

def save_checkpoint(directory: str | Path, model: GPT, meta: dict, tok: Tokenizer,
                    weights: dict[str, torch.Tensor] | None = None) -> None:
    """Replace `directory` with a checkpoint of `model` + `meta` + `tok`, atomically (see the module doc).

    meta.json is `meta` plus "model" (the GPTConfig), "tokenizer" (tok.describe()) and "weights" (bytes and
    SHA-256 of model.safetensors). Anything else in an existing `directory` is replaced with it. `weights`:
    the model's full state dict when `model` holds only a shard of it (FSDP; see gptlab.resume.full_state).
    """
    source = model.state_dict() if weights is None else weights
    state = {k: v.detach().contiguous().cpu() for k, v in source.items() if k != TIED}
    weights = safetensors.torch.save(state, metadata={"format": "pt"})
    record = {**meta, "tokenizer": tok.describe(), "model": dataclasses.asdict(model.config),
              "weights": {"bytes": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}}
    meta_text = json.dumps(record, indent=2) + "\n"  # before touching the disk: a bad meta fails here
    with replace_folder(directory) as staging:
        tok.save(staging / TOKENIZER_DIR)
        step()
        write_new(staging / WEIGHTS_FILE, weights)
        write_new(staging / META_FILE, meta_text.encode())  # last: a folder with meta.json is complete


# --- loading --------------------------------------------------------------------------------------------

GPTLAB, HF = "gptlab", "hf"  # the two kinds of model folder (ModelFolder.kind)
MODEL_FOLDERS = (f"a model folder is a gptlab checkpoint ({META_FILE}, {WEIGHTS_FILE}, {TOKENIZER_DIR}/) or a "
                 f"Hugging Face GPT-2 ({hf_gpt2.CONFIG_FILE}, {hf_gpt2.WEIGHTS_FILE})")


@dataclasses.dataclass(frozen=True)
class ModelFolder:
    """A model folder as check_model_folder found it, from its JSON files alone (no weights read)."""

    path: Path
    kind: str  # GPTLAB or HF
    config: GPTConfig  # the model the weights must fit
    meta: dict  # a gptlab checkpoint's meta.json; {} for a Hugging Face folder (load_model builds its meta)

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the model reads: the checkpoint's own (checked against meta.json), or GPT-2's (the
        folder's own tokenizer files, if any, were checked against it)."""
        if self.kind == HF:
            return gpt2_tokenizer()
        return _tokenizer(self.path, self.meta, self.config)


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """The model of a gptlab checkpoint or of a Hugging Face GPT-2 folder: (model, its tokenizer, its meta).

    Every command and stage that reads a model opens it here, so all accept the same folders and refuse the
    others with the same line. A checkpoint's meta is its meta.json; a Hugging Face folder's has the keys
    callers use (stage "hf", step 0, model, tokenizer, weights: bytes and SHA-256; see gptlab.hf_gpt2).
    Raises CheckpointError or HFImportError (both GptlabErrors: one line naming the file and the fix)."""
    found = check_model_folder(folder)
    if found.kind == HF:
        model, meta, tok = hf_gpt2.load_checked_hf(found.path, found.config, device)
        return model, tok, meta
    tok = found.tokenizer()  # before the weights: the cheap checks first
    return _load_weights(found.path, found.meta, found.config, device), tok, found.meta


def check_model_folder(folder: str | Path) -> ModelFolder:
    """What load_model checks before it reads any weights: the folder's kind and its JSON files (meta.json;
    or config.json and GPT-2 tokenizer files). Cheap enough for the check stage. Raises as load_model does."""
    folder = Path(folder)
    kind = model_kind(folder)
    if kind == HF:
        return ModelFolder(folder, HF, hf_gpt2.check_hf_folder(folder), {})
    meta, config = _read_meta_file(folder)
    return ModelFolder(folder, GPTLAB, config, meta)


def model_kind(folder: str | Path) -> str:
    """GPTLAB (the folder has meta.json) or HF (config.json), by which file is there; a folder a killed save
    moved aside, and any other path, is refused with the one message every loader gives."""
    folder = Path(folder)
    _refuse_interrupted(folder)
    if (folder / META_FILE).is_file():
        return GPTLAB
    if hf_gpt2.is_hf_folder(folder):
        return HF
    missing = not os.path.lexists(folder)
    what = "not found" if missing else \
        f"holds neither {META_FILE} (a gptlab checkpoint) nor {hf_gpt2.CONFIG_FILE} (a Hugging Face GPT-2)"
    if _stage_folder(folder):
        fix = _remake(folder)
    elif missing:  # most likely a typo: say what is there to pass instead
        fix = _models_beside(folder)
    else:
        fix = ("put one there (gptlab export-hf CHECKPOINT OUT_DIR writes a Hugging Face GPT-2) or name another "
               "folder")
    raise CheckpointError(f"{folder}: {what}; {MODEL_FOLDERS}: {fix}")


def _models_beside(folder: Path) -> str:
    """What to pass instead of a folder that does not exist: the model folders in its parent folder."""
    parent = folder.parent
    if not parent.is_dir():
        return f"{parent} does not exist either; check the path"
    entries = itertools.islice(parent.iterdir(), MAX_LISTED * 100)  # a huge folder is not worth a slow error
    found = sorted(str(p) for p in entries if (p / META_FILE).is_file() or hf_gpt2.is_hf_folder(p))
    if not found:
        return (f"{parent} holds no model folder; name an existing one, or write one there (gptlab export-hf "
                "CHECKPOINT OUT_DIR writes a Hugging Face GPT-2)")
    more = f" (and {len(found) - MAX_LISTED} more)" if len(found) > MAX_LISTED else ""
    return f"pass one that exists: {', '.join(found[:MAX_LISTED])}{more}"


def read_meta(directory: str | Path) -> dict:
    """A checkpoint's meta.json, checked: "model" is a valid GPTConfig, "tokenizer" has a fingerprint and
    "weights" (absent in checkpoints from before it existed) has bytes and sha256. Raises CheckpointError."""
    return _open(Path(directory))[0]


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Rebuild the model from meta.json and load its weights: (model, meta). Raises CheckpointError.
    (load_model opens any model folder, with its tokenizer.)"""
    directory = Path(directory)
    meta, config = _open(directory)
    return _load_weights(directory, meta, config, device), meta


def checkpoint_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved beside the weights; it must be the one meta.json names and fit the model."""
    directory = Path(directory)
    return _tokenizer(directory, *_open(directory))


def _load_weights(directory: Path, meta: dict, config: GPTConfig, device) -> GPT:
    state = _read_weights(directory, meta.get("weights"))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    _require_fit(_size_problem(shapes, config), directory)
    _check_finite(state, directory)
    model = GPT(config)  # only now: the checks above tie its size to the weights on disk
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != TIED}
    _require_fit(_shape_problem(expected, shapes), directory)
    model.load_state_dict(state, strict=False)  # the tied head is the one key missing: checked just above
    return model.to(device)


def _tokenizer(directory: Path, meta: dict, config: GPTConfig) -> Tokenizer:
    if not (directory / TOKENIZER_DIR).is_dir():
        raise CheckpointError(f"{directory / TOKENIZER_DIR}: not found; the checkpoint is incomplete: "
                              f"{_remake(directory)}")
    try:
        tok = load_tokenizer(directory / TOKENIZER_DIR)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    expected = meta["tokenizer"]["fingerprint"]
    if tok.fingerprint != expected:
        raise CheckpointError(f"{directory / TOKENIZER_DIR}: fingerprint {tok.fingerprint} != meta.json's "
                              f"{expected}; {_remake(directory)}")
    if tok.n_vocab > config.vocab_size:
        raise CheckpointError(f"{directory / TOKENIZER_DIR}: {tok.n_vocab} ids but the model has only "
                              f"{config.vocab_size}; {_remake(directory)}")
    return tok


def _open(directory: Path) -> tuple[dict, GPTConfig]:
    """Read and check the folder's meta.json."""
    _refuse_interrupted(directory)
    return _read_meta_file(directory)


def _refuse_interrupted(directory: Path) -> None:
    """Refuse a folder whose save was killed between moving the old checkpoint aside and moving the new one
    in. Reading never writes: the stage's next save puts it back or replaces it (gptlab.fileio.recover)."""
    aside = moved_aside(directory)
    if aside is not None:
        raise CheckpointError(f"{directory / META_FILE}: not found; a save of {directory} was interrupted after "
                              f"moving the old checkpoint aside (to {aside.name}, which the stage's next save "
                              f"clears up): {_remake(directory)}")


def _read_meta_file(directory: Path) -> tuple[dict, GPTConfig]:
    fix = _remake(directory)
    path = directory / META_FILE
    if not directory.is_dir():
        what = "does not exist" if not os.path.lexists(directory) else "is not a folder"
        raise CheckpointError(f"{path}: not found; {directory} {what}: {fix}")
    if not path.exists():
        raise CheckpointError(f"{path}: not found; {directory} is not a checkpoint folder (or its save never "
                              f"finished): {fix}")
    with _as_checkpoint_error():
        meta = read_json(path, {"model": dict, "tokenizer": dict}, fix)
        check_fields(meta["tokenizer"], {"fingerprint": str}, f"{path}: tokenizer", fix)
        if "weights" in meta:
            check_fields(meta["weights"], {"bytes": int, "sha256": str}, f"{path}: weights", fix)
    return meta, _model_config(meta["model"], path, fix)


def _remake(directory: Path) -> str:
    """How to fix a damaged checkpoint; a pipeline checkpoint's folder is named after its stage. A folder in
    checkpoints/ that is named after no stage was put there by hand, and no stage remakes it."""
    folder = Path(os.path.abspath(directory))
    if folder.parent.name == paths.CHECKPOINTS.name and not _stage_folder(folder):
        return (f"copy or write it again from wherever it came from (dvc repro remakes only "
                f"{', '.join(str(paths.checkpoint_dir(stage)) for stage in paths.TRAIN_STAGES)})")
    return f"rerun the stage that made it (dvc repro {folder.name}) or dvc pull"


def _stage_folder(folder: str | Path) -> bool:
    """Whether folder is a pipeline stage's checkpoint folder, checkpoints/<stage>, of any project."""
    folder = Path(os.path.abspath(folder))
    return folder.parent.name == paths.CHECKPOINTS.name and folder.name in paths.TRAIN_STAGES


@contextmanager
def _as_checkpoint_error() -> Iterator[None]:
    """fileio's checks raise GptlabError; callers catch CheckpointError."""
    try:
        yield
    except GptlabError as e:
        raise CheckpointError(str(e)) from None


def _model_config(raw: dict, path: Path, fix: str) -> GPTConfig:
    """meta.json's "model" as a GPTConfig, every key and value checked, so a damaged file is never a
    TypeError; the sizes are checked against the weights' before any model is built (_size_problem)."""
    types = typing.get_type_hints(GPTConfig)
    unknown = sorted(set(raw) - set(types))
    if unknown:
        raise CheckpointError(f"{path}: model: unknown key {unknown[0]!r} (a model has {', '.join(types)}); "
                              f"{fix}")
    fields = dataclasses.fields(GPTConfig)
    required = {f.name: types[f.name] for f in fields if f.default is dataclasses.MISSING}
    with _as_checkpoint_error():
        check_fields(raw, {**required, **{k: types[k] for k in raw}}, f"{path}: model", fix)
    config = GPTConfig(**raw)
    small = [k for k, tp in types.items() if tp is int and getattr(config, k) < 1]  # every int is a count
    if small:
        value = getattr(config, small[0])
        raise CheckpointError(f"{path}: model: {small[0]} must be at least 1, got {value}; {fix}")
    if not 0.0 <= config.dropout < 1.0:
        raise CheckpointError(f"{path}: model: dropout must lie in [0, 1), got {config.dropout}; {fix}")
    if config.n_embd % config.n_head:
        raise CheckpointError(f"{path}: model: n_embd={config.n_embd} is not a multiple of "
                              f"n_head={config.n_head}; {fix}")
    return config


def _read_weights(directory: Path, expected: dict | None) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors, whose size and SHA-256 must be the ones meta.json recorded (a
    checkpoint saved before meta.json recorded them is only checked by the steps after this one)."""
    path = directory / WEIGHTS_FILE
    fix = _remake(directory)
    try:
        data = path.read_bytes()  # one read: the bytes checked are the bytes parsed
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; the checkpoint is incomplete: {fix}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror}); {fix}") from None
    if expected is not None:
        if len(data) != expected["bytes"]:
            raise CheckpointError(f"{path}: {len(data)} bytes, but meta.json records {expected['bytes']} "
                                  f"(truncated, or from another save); {fix}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected["sha256"]:
            raise CheckpointError(f"{path}: SHA-256 {digest[:12]}... differs from meta.json's "
                                  f"{expected['sha256'][:12]}... (weights and meta.json from different saves); "
                                  f"{fix}")
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError (and others) for damaged bytes
        reason = " ".join(str(e).split())  # one line, whatever the library wrote
        raise CheckpointError(f"{path}: not a readable safetensors file ({reason}); {fix}") from None


def _require_fit(problem: str | None, directory: Path) -> None:
    if problem:
        raise CheckpointError(f"{directory}: weights do not fit the model in meta.json ({problem}); "
                              f"{_remake(directory)}")


def _size_problem(shapes: dict[str, tuple[int, ...]], config: GPTConfig) -> str | None:
    """The config values that set the model's size, against the file, before the model is built: a damaged
    meta.json must never make us allocate a huge model. Parameter names are HF GPT-2's: the token and position
    tables are (vocab_size, n_embd) and (block_size, n_embd), blocks are transformer.h.0 .. h.<n_layer-1>."""
    for name, want in (("transformer.wte.weight", (config.vocab_size, config.n_embd)),
                       ("transformer.wpe.weight", (config.block_size, config.n_embd))):
        if shapes.get(name) != want:
            return f"{name} is {_shape(shapes.get(name))} in {WEIGHTS_FILE}, meta.json implies {list(want)}"
    blocks = len({k.split(".")[2] for k in shapes if k.startswith("transformer.h.")})
    if blocks != config.n_layer:
        return f"n_layer={config.n_layer} but {WEIGHTS_FILE} holds {blocks} block(s)"
    return None


def _shape_problem(expected: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]]) -> str | None:
    missing, unexpected = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
    if missing or unexpected:
        return f"missing {missing[:3]}, unexpected {unexpected[:3]}"
    wrong = [k for k in expected if expected[k] != shapes[k]]
    if wrong:
        name = wrong[0]
        return f"{name} is {_shape(shapes[name])} in {WEIGHTS_FILE}, meta.json implies {_shape(expected[name])}"
    return None


def _shape(shape: tuple[int, ...] | None) -> str:
    return "missing" if shape is None else str(list(shape))


def _check_finite(state: dict[str, torch.Tensor], directory: Path) -> None:
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{directory / WEIGHTS_FILE}: {name} holds NaN or infinite values (a "
                                  f"diverged run, or damage); {_remake(directory)}")
