"""Resume states: everything a training stage needs to continue exactly where it stopped.

A state is a folder `checkpoints/resume/<stage>/step_NNNNNNN/` holding
- model.safetensors      the weights (tied head stored once, as in a checkpoint);
- optimizer.safetensors  AdamW's per-parameter tensors (step, exp_avg, exp_avg_sq), keyed `<param>.<name>`;
- rng-<rank>.safetensors each process's torch RNG states (CPU, and CUDA where there is one);
- metrics/               a copy of the stage's dvclive folder as it was after that step;
- state.json             the step, the SHA-256 of every file above, and the fingerprint of the run: the
                         resolved params, the inputs' checksums, the process count and batch geometry.
The batches are a pure function of (seed, step) (data/loader.py) and the learning rate of the step, so the
step number is the whole data and schedule position.

Writing: the main process replaces `step_NNNNNNN` with gptlab.fileio.replace_folder; every rank writes its
RNG file into the staging folder, the main process the rest, state.json last, and one rename swaps it in. A
kill at any moment leaves the previous states as they were; what it left is cleared at the next start (the
stage's lock means no other writer). Only the newest `keep_saves` states are kept. Nothing here is pickled.

The folder is not a DVC output, so `dvc push` shares final checkpoints only. A stage that finishes deletes
its resume states: they exist only for runs that were stopped.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from accelerate.utils import broadcast_object_list
from torch.distributed.tensor import DTensor, distribute_tensor

from gptlab.config import GptlabError
from gptlab.fileio import (
    check_fields,
    file_sha256,
    read_json,
    recover,
    recover_all,
    remove_folder,
    replace_folder,
    write_new,
)

STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
METRICS_COPY = "metrics"
TIED = "lm_head.weight"  # shares storage with transformer.wte.weight
PREFIX = "step_"
# changing these never changes what a run computes, so a state made with other values still resumes
FREE_KEYS = ("save_interval", "keep_saves")


class ResumeError(GptlabError):
    pass


@dataclass(frozen=True)
class Saved:
    """A loaded resume state: the step it was saved after, and its folder."""

    step: int
    folder: Path


def rng_file(rank: int) -> str:
    return f"rng-{rank}.safetensors"


def fingerprint(params: dict, inputs: dict[str, str], accelerator, micro_batch_size: int, grad_accum: int) -> dict:
    """What must be the same for a state to continue this run exactly."""
    params = json.loads(json.dumps(params))  # a copy, in the form state.json stores it
    for values in params.values():
        for key in FREE_KEYS if isinstance(values, dict) else ():
            values.pop(key, None)
    return {
        "params": params,
        "inputs": inputs,
        "launch": {
            "processes": accelerator.num_processes,
            "micro_batch_size": micro_batch_size,
            "grad_accum": grad_accum,
            "mixed_precision": str(accelerator.mixed_precision),
            "device": accelerator.device.type,
        },
    }


# --- writing ---------------------------------------------------------------------------------------------

def clear_leftovers(root: Path) -> None:
    """What killed saves, prunes and discard_all left in and beside `root` (see gptlab.fileio.recover)."""
    recover(root)
    recover_all(root)


def full_state(module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU, the tied head left out. Under FSDP each process holds a shard
    (a DTensor) and this gathers it: a collective, so every process calls it, in the same order."""
    return {k: _whole(v) for k, v in module.state_dict().items() if k != TIED}


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().contiguous().cpu()


def _shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` placed as `param` is: this process's shard of it under FSDP (cut locally, no communication:
    every process has read the whole tensor), else on the parameter's device."""
    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
    return full.to(device=param.device, dtype=param.dtype)


def save_state(root: Path, step: int, module, optimizer, accelerator, print_fingerprint: dict,
               metrics_dir: Path, keep: int) -> Path:
    """Write the state after `step` (a collective: every process calls it). `module` is the unwrapped model
    (sharded in place under FSDP), `optimizer` the torch optimizer. Returns the new folder."""
    final = root / f"{PREFIX}{step:07d}"
    main = accelerator.is_main_process
    with replace_folder(final) if main else nullcontext() as staging:
        staging = broadcast_object_list([staging])[0]  # the main process's staging folder, for every rank
        _write_tensors(staging / rng_file(accelerator.process_index), rng_state())
        model_state = full_state(module)
        optim_state = optimizer_tensors(module, optimizer)
        accelerator.wait_for_everyone()
        if main:
            files = {
                MODEL_FILE: _write_tensors(staging / MODEL_FILE, model_state),
                OPTIMIZER_FILE: _write_tensors(staging / OPTIMIZER_FILE, optim_state),
            }
            for rank in range(accelerator.num_processes):
                files[rng_file(rank)] = file_sha256(staging / rng_file(rank))
            if metrics_dir.is_dir():
                shutil.copytree(metrics_dir, staging / METRICS_COPY)
            record = {"step": step, "files": files, "fingerprint": print_fingerprint}
            write_new(staging / STATE_FILE, (json.dumps(record, indent=2) + "\n").encode())
    if main:
        prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def optimizer_tensors(module, optimizer) -> dict[str, torch.Tensor]:
    """AdamW's state as flat named tensors, `<parameter name>.<state key>` (step, exp_avg, exp_avg_sq),
    gathered whole under FSDP (a collective there)."""
    out = {}
    for name, param in module.named_parameters():  # the tied matrix once, under its first name
        for key, value in optimizer.state.get(param, {}).items():
            out[f"{name}.{key}"] = _whole(value if torch.is_tensor(value) else torch.tensor(value))
    return out


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    data = safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    write_new(path, data)
    return hashlib.sha256(data).hexdigest()


def prune(root: Path, keep: int) -> None:
    for old in states(root)[keep:]:
        remove_folder(old)


def states(root: Path) -> list[Path]:
    """Complete state folders, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def discard_all(root: Path) -> None:
    """A finished stage needs none of its states (what a kill midway leaves, clear_leftovers deletes)."""
    with suppress(OSError):
        remove_folder(root)


# --- reading ---------------------------------------------------------------------------------------------

def latest(root: Path, expected: dict, stage: str) -> Saved | None:
    """The newest state, checked against this run's fingerprint; None when there is none."""
    found = states(root)
    if not found:
        return None
    folder = found[0]
    fix = f"delete it (rm -r {folder}) to resume from an older state, or rm -r {root} to start {stage} over"
    record = read_json(folder / STATE_FILE, {"step": int, "files": dict, "fingerprint": dict}, fix)
    if not (isinstance(record["step"], int) and record["step"] >= 1 and folder.name == f"{PREFIX}{record['step']:07d}"):
        raise ResumeError(f"{folder / STATE_FILE}: step {record['step']!r} does not match the folder name; {fix}")
    differences = _differences(record["fingerprint"], expected)
    if differences:
        raise ResumeError(
            f"[{stage}] {folder} was saved by a run with other settings ({'; '.join(differences[:4])}); "
            f"to continue it, set them back; to start {stage} over instead, rm -r {root}"
        )
    for name, digest in record["files"].items():
        check_fields({"sha256": digest}, {"sha256": str}, f"{folder / STATE_FILE}: files.{name}", fix)
        path = folder / name
        if not path.is_file() or file_sha256(path) != digest:
            what = "is missing" if not path.is_file() else "does not match its SHA-256 in state.json"
            raise ResumeError(f"{path}: {what} (damaged); {fix}")
    return Saved(record["step"], folder)


def _differences(saved, expected, where: str = "") -> list[str]:
    """`key: saved -> now` for every leaf that differs."""
    if isinstance(saved, dict) and isinstance(expected, dict):
        out = []
        for key in sorted(set(saved) | set(expected), key=str):
            name = f"{where}.{key}" if where else str(key)
            out += _differences(saved.get(key, "(absent)"), expected.get(key, "(absent)"), name)
        return out
    if saved != expected:
        shown = where.removeprefix("params.").removeprefix("launch.").removeprefix("inputs.")
        return [f"{shown}: {_short(saved)} then, {_short(expected)} now"]
    return []


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def load_into(saved: Saved, module, optimizer, accelerator) -> None:
    """Restore weights, AdamW state and this process's RNG from `saved`; every process reads the files
    (under FSDP each keeps its shard)."""
    weights = _read_tensors(saved.folder / MODEL_FILE)
    expected = set(module.state_dict()) - {TIED}
    if set(weights) != expected:
        raise ResumeError(f"{saved.folder / MODEL_FILE}: parameters {sorted(expected - set(weights))[:3]} missing, "
                          f"{sorted(set(weights) - expected)[:3]} unexpected; rm -r {saved.folder.parent} to start over")
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name != TIED:
                _local(tensor).copy_(_local(_shard_like(weights[name], tensor)))
    load_optimizer(module, optimizer, _read_tensors(saved.folder / OPTIMIZER_FILE), saved.folder)
    rng = _read_tensors(saved.folder / rng_file(accelerator.process_index))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def load_optimizer(module, optimizer, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """AdamW's state from flat `<parameter name>.<key>` tensors, each placed as its parameter is; the
    hyperparameters stay the optimizer's own (the fingerprint guarantees they are the saved run's)."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, field = key.rpartition(".")
        state.setdefault(name, {})[field] = tensor
    params = dict(module.named_parameters())
    if sorted(state) != sorted(params):
        raise ResumeError(f"{folder / OPTIMIZER_FILE}: state for {len(state)} parameters, the model has "
                          f"{len(params)} ({sorted(set(params) ^ set(state))[:3]} differ); rm -r {folder.parent} "
                          f"to start over")
    fused = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    for name, param in params.items():
        optimizer.state[param] = {
            # torch keeps `step` on the CPU unless a fused/capturable kernel reads it on the device
            key: (value.to(param.device if fused else "cpu", torch.float32) if key == "step" else _shard_like(value, param))
            for key, value in state[name].items()
        }


def restore_metrics(saved: Saved, metrics_dir: Path) -> None:
    """The stage's dvclive folder as it was when the state was saved: steps logged after it are dropped,
    so the resumed run logs each step exactly once."""
    shutil.rmtree(metrics_dir, ignore_errors=True)
    if (saved.folder / METRICS_COPY).is_dir():
        shutil.copytree(saved.folder / METRICS_COPY, metrics_dir)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged bytes
        raise ResumeError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())}); "
                          f"rm -r {path.parent} to resume from an older state") from None
