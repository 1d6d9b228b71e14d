"""Checkpoints: a folder of `model.safetensors` (weights, HF GPT-2 names), `meta.json` (everything needed to
rebuild and interpret them: model config, tokenizer, weights checksum, resolved params, step, key metrics,
parent checkpoint) and `tokenizer/`.

A folder is one atomic unit. A save writes the complete new folder beside the old one, as
`.<name>.tmp-<pid>`, fsyncs it, then swaps it in with a single rename: renameat2(RENAME_EXCHANGE) on Linux,
else old -> `.<name>.old-<pid>`, new -> `<name>`. So a kill at any moment leaves `<name>` holding the old
checkpoint or the new one, whole, and every save and load first clears up what a killed save left (see
_recover; leftovers are told apart by their writer's pid, so one machine writes a folder at a time). Nothing
is ever written through an existing file, which DVC may have hard-linked from its cache.

Loading checks everything before trusting it: meta.json's shape and types, the weights' size and SHA-256
against meta.json, the tensor names and shapes against the model meta.json describes (before that model is
allocated), and that every weight is finite. Any damage is a CheckpointError naming the file and the fix.
Loading uses safetensors only: nothing is unpickled.
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import hashlib
import json
import os
import shutil
import signal
import sys
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import safetensors.torch
import torch

from gptlab.config import GptlabError
from gptlab.fileio import check_fields, fsync, leftover_siblings, read_json, sibling
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import Tokenizer, TokenizerError, load_tokenizer

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
TIED = "lm_head.weight"  # shares storage with transformer.wte.weight; stored once
# Test hook: with GPTLAB_FAULT_AFTER=k set, the process SIGKILLs itself right after its k-th (from 0)
# filesystem step of saving or recovering a checkpoint, so tests can kill a save at every possible moment.
FAULT_ENV = "GPTLAB_FAULT_AFTER"
_AT_FDCWD = -100  # from <fcntl.h>: paths relative to the working directory
_RENAME_EXCHANGE = 2  # from <linux/fs.h>
_steps_done = 0


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
    directory = Path(os.path.abspath(directory))  # "." has no name to build the temp folder's from
    source = model.state_dict() if weights is None else weights
    state = {k: v.detach().contiguous().cpu() for k, v in source.items() if k != TIED}
    weights = safetensors.torch.save(state, metadata={"format": "pt"})
    record = {**meta, "tokenizer": tok.describe(), "model": dataclasses.asdict(model.config),
              "weights": {"bytes": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}}
    meta_text = json.dumps(record, indent=2) + "\n"  # before touching the disk: a bad meta fails here
    directory.parent.mkdir(parents=True, exist_ok=True)
    _recover(directory)
    staging = sibling(directory, "tmp")
    try:
        _write_folder(staging, weights, meta_text, tok)
        old = _swap_in(staging, directory)
        fsync(directory.parent)  # the new name is on disk before the old copy goes
        _step()
        if old is not None:
            _discard(old)
    finally:
        _discard(staging)  # only still there if an error stopped the save: the half-written new checkpoint


def _write_folder(folder: Path, weights: bytes, meta_text: str, tok: Tokenizer) -> None:
    """The whole checkpoint in a fresh folder, on disk (fsynced) before it is renamed into place."""
    folder.mkdir()
    _step()
    tok.save(folder / TOKENIZER_DIR)
    _step()
    for root, _, files in os.walk(folder / TOKENIZER_DIR):
        for name in files:
            fsync(Path(root, name))
        fsync(Path(root))
    _step()
    _write_new(folder / WEIGHTS_FILE, weights)
    _write_new(folder / META_FILE, meta_text.encode())  # last, so a folder with meta.json is complete
    fsync(folder)
    _step()


def _write_new(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:  # "x": never write through an existing (possibly DVC-linked) file
        f.write(data)
        _step()
        f.flush()
        os.fsync(f.fileno())
    _step()


def _swap_in(staging: Path, directory: Path) -> Path | None:
    """Make `staging` the checkpoint at `directory` in one step; returns where the old one now is."""
    if not os.path.lexists(directory):
        os.rename(staging, directory)
        _step()
        return None
    if _exchange(staging, directory):
        _step()
        return staging
    old = sibling(directory, "old")
    os.rename(directory, old)
    _step()
    try:
        os.rename(staging, directory)  # a kill before this leaves no `directory`: _recover puts `old` back
    except BaseException:
        os.rename(old, directory)
        raise
    _step()
    return old


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2); False where the OS or file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or a file system without it
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """libc's renameat2 (glibc 2.28+), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _step() -> None:
    """Count one filesystem step for the FAULT_ENV test hook; a no-op unless that variable is set."""
    limit = os.environ.get(FAULT_ENV)
    if limit is None:
        return
    global _steps_done
    if _steps_done >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)
    _steps_done += 1


# --- clearing up after a killed save --------------------------------------------------------------------


def _recover(directory: Path) -> None:
    """Undo what a killed save left: if it died between moving the old checkpoint aside and moving the new
    one in, put the old one back; then delete its temp folders. A live writer's folders are left alone."""
    directory = Path(os.path.abspath(directory))  # "." has no name to build the siblings' from
    if not directory.parent.is_dir():
        return
    leftovers = leftover_siblings(directory)
    if not os.path.lexists(directory):
        complete = [p for p, kind in leftovers if kind == "old" and (p / META_FILE).is_file()]
        if complete:
            _put_back(complete[0], directory)
    for path, _ in leftovers:
        with suppress(OSError):  # a leftover we cannot delete (read-only parent) does not harm the checkpoint
            _discard(path)


def _put_back(old: Path, directory: Path) -> None:
    try:
        os.rename(old, directory)
    except OSError:
        if not os.path.lexists(directory):  # else another process (a rank loading it too) was first
            raise
    _step()
    fsync(directory.parent)
    _step()


def _discard(folder: Path) -> None:
    """Delete a checkpoint folder (or whatever is at that path), meta.json first: a folder half deleted
    never looks complete."""
    if folder.is_dir() and not folder.is_symlink():
        (folder / META_FILE).unlink(missing_ok=True)
        _step()
        shutil.rmtree(folder)
        _step()
    elif os.path.lexists(folder):
        folder.unlink()
        _step()


# --- loading --------------------------------------------------------------------------------------------

def read_meta(directory: str | Path) -> dict:
    """A checkpoint's meta.json, checked: "model" is a valid GPTConfig, "tokenizer" has a fingerprint and
    "weights" (absent in checkpoints from before it existed) has bytes and sha256. Raises CheckpointError."""
    return _open(Path(directory))[0]


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Rebuild the model from meta.json and load its weights: (model, meta). Raises CheckpointError."""
    directory = Path(directory)
    meta, config = _open(directory)
    state = _read_weights(directory, meta.get("weights"))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    _require_fit(_size_problem(shapes, config), directory)
    _check_finite(state, directory)
    model = GPT(config)  # only now: the checks above tie its size to the weights on disk
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != TIED}
    _require_fit(_shape_problem(expected, shapes), directory)
    model.load_state_dict(state, strict=False)  # the tied head is the one key missing: checked just above
    return model.to(device), meta


def checkpoint_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved beside the weights; it must be the one meta.json names and fit the model."""
    directory = Path(directory)
    meta, config = _open(directory)
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
    """Recover the folder if a save was killed, then read and check its meta.json."""
    fix = _remake(directory)
    try:
        _recover(directory)
    except OSError as e:  # e.g. a read-only parent folder, where the old checkpoint cannot be put back
        raise CheckpointError(f"{directory}: cannot clear up after an interrupted save ({e}); make "
                              f"{directory.parent} writable, or {fix}") from None
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
    """How to fix a damaged checkpoint; a pipeline checkpoint's folder is named after its stage."""
    return f"rerun the stage that made it (dvc repro {Path(os.path.abspath(directory)).name}) or dvc pull"


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
