"""Start-up shared by the stage scripts: params, accelerator, seed, what a checkpoint records, announcements.

Stages open their start points with gptlab.checkpoint.load_model."""
from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from gptlab import paths, provenance
from gptlab.config import GptlabError, Params, load_params
from gptlab.data.shards import Shard, read_shard, shard_paths
from gptlab.fileio import file_sha256
from gptlab.launch import LAUNCHER_PID, die_with_parent, error_marker
from gptlab.tokenizer import Tokenizer
from gptlab.train import Stopped, say

LOCK_WAIT = "GPTLAB_LOCK_WAIT_SECONDS"  # how long a second run waits for the first to stop (default 30)
_LOCKS: list[int] = []


def start(stage: str) -> tuple[Params, Accelerator]:
    """Validate params.yaml before anything expensive, then set up devices and seeds.

    The main process holds the stage's lock until it exits, so two runs never write one output folder."""
    params = load_params()
    accelerator = Accelerator()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # else every process would train alone and write the same outputs
        raise GptlabError(
            f"[{stage}] the launch started {launched} processes but accelerate joined them into none "
            f"({accelerator.distributed_type} on {accelerator.device}): FSDP and multi-GPU configs need GPUs; "
            f"on a CPU, launch with --multi_gpu and ACCELERATE_USE_CPU=1"
        )
    if accelerator.is_main_process:
        hold_lock(stage)
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for what autocast leaves in fp32
        torch.backends.cudnn.allow_tf32 = True
    if accelerator.device.type == "cpu":
        # accelerate launch sets OMP_NUM_THREADS=1; on CPU that would leave all but one core idle
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.state.num_processes))
    set_seed(params.seed)  # same init on every process; data order differs by process_index below
    say(accelerator, f"[{stage}] {accelerator.num_processes} process(es), {accelerator.distributed_type}, device {accelerator.device}")
    return params, accelerator


def run(main: Callable[[], None]) -> None:
    """Run a stage's main(); bad input ends it with one clear line (exit 2) instead of a traceback.

    With several ranks every one of them meets the same bad input: the first to fail prints the line, the
    others only exit. Ctrl-C exits 130 quietly when `gptlab run` (which prints the one line) started us.
    Programming errors keep their traceback."""
    die_with_parent()  # SIGTERM when the launcher dies: the loop saves a resume state and stops
    try:
        main()
    except GptlabError as e:
        report(f"error: {e}")
        sys.exit(2)
    except Stopped as e:  # a resume state was saved; `gptlab run` prints the interrupted line itself
        report(f"{'' if under_gptlab_run() else 'error: '}{e}")
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        if not under_gptlab_run():
            report("error: interrupted; the stage stopped and wrote no new outputs")
        sys.exit(130)


def report(line: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        try:  # the file's creation elects one rank per launch (ranks share the launcher as parent); `gptlab run`
            os.close(os.open(error_marker(os.getppid()), os.O_CREAT | os.O_EXCL))  # removes it afterwards
        except FileExistsError:
            return
    print(line, file=sys.stderr, flush=True)


def under_gptlab_run() -> bool:
    """Whether `gptlab run` started this process (it exports its pid; a stale value names another parent)."""
    return os.environ.get(LAUNCHER_PID) == str(os.getppid())


def hold_lock(stage: str) -> None:
    """Take the stage's lock for this process's lifetime, waiting a little for a stopping run to let go.

    flock is released by the kernel when its holder dies, so a killed run never leaves a stale lock."""
    path = paths.lock_file(stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + float(os.environ.get(LOCK_WAIT, 30))  # long enough for an orphan to notice
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise GptlabError(
                    f"[{stage}] another run of this stage (pid {holder}) is writing its outputs; wait for it to "
                    f"finish or stop it (kill {holder}), then run again"
                ) from None
            time.sleep(0.5)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _LOCKS.append(fd)  # kept open (and locked) until the process exits


def read_split(stage: str, split: str, tok: Tokenizer) -> list[Shard]:
    """Every shard of a split, each checked (size, ids below the vocabulary) and made by this tokenizer."""
    shards = [read_shard(path, tok.n_vocab) for path in shard_paths(paths.SHARDS, split)]
    for shard in shards:
        require_same_tokenizer(stage, tok, shard.fingerprint, shard.path)
    return shards


def require_same_tokenizer(stage: str, tok: Tokenizer, expected_fingerprint: str, made: Path | str = "the input") -> None:
    if tok.fingerprint != expected_fingerprint:
        raise GptlabError(
            f"[{stage}] {paths.TOKENIZER} has fingerprint {tok.fingerprint} but {made} was made with "
            f"{expected_fingerprint}; rerun the pipeline from tokenize (dvc repro)"
        )


def announce(accelerator: Accelerator, stage: str, lines: dict) -> None:
    say(accelerator, f"[{stage}] " + " | ".join(f"{k} {v}" for k, v in lines.items()))


MANY_EPOCHS = 10  # passes over a fine-tuning set past which the run mostly memorises it: the announcement says so


def epochs_entry(stage: str, max_steps: int, rows_per_step: int, n_records: int) -> dict[str, str]:
    """announce's entry for how many times training sees each record: `epochs 2.5`, or, past MANY_EPOCHS,
    `83 epochs over 200 records (...)` with the fix, so a set far too small for max_steps is plain to see."""
    n = max_steps * rows_per_step / n_records
    if n <= MANY_EPOCHS:
        return {"epochs": f"{n:.1f}"}
    return {f"{n:.0f} epochs": f"over {n_records} records ({stage}.max_steps {max_steps} x {rows_per_step} records "
                               f"per step; add records or lower {stage}.max_steps)"}


def empty_entry(n_empty: int) -> dict[str, str]:
    """announce's entry for the records a fine-tuning set left out with an empty response (none: no entry)."""
    return {"dropped": f"{n_empty} records with an empty response"} if n_empty else {}


def stage_inputs(parent_meta: dict, *files: Path) -> dict[str, str]:
    """Checksums of what a fine-tuning stage reads: its start weights (init_sha256, as meta.json names them)
    and data files (see gptlab.resume). A resume state saved with other names or values is refused."""
    return {"init_sha256": provenance.init_sha256(parent_meta) or "", **{str(f): file_sha256(f) for f in files}}


def stage_meta(stage: str, params: Params, sections: tuple[str, ...], init_from: str | None = None,
               parent_meta: dict | None = None, **extra) -> provenance.Meta:
    """What a checkpoint records about how it was made (see gptlab.provenance): its start point's folder
    (None = scratch) and weights' hash, every ancestor, and the resolved params sections. The start point's
    hash is how evaluate finds a dpo model's reference log-probs. No git state: see gptlab.provenance."""
    parent = {} if parent_meta is None else {"init_sha256": provenance.init_sha256(parent_meta)}
    return {
        "stage": stage,
        "init_from": init_from or "scratch",
        **parent,
        **extra,
        "lineage": [] if parent_meta is None else provenance.lineage(init_from, parent_meta),
        "params": {"seed": params.seed, "preset": params.preset, **{s: asdict(getattr(params, s)) for s in sections}},
    }


def data_params(params: Params) -> dict:
    """The params that determine data/ (as JSON would store them): info.json records them."""
    return json.loads(json.dumps({"seed": params.seed, "data": asdict(params.data), "tokenizer": asdict(params.tokenizer)}))


def check_context(block_size: int, info: dict) -> None:
    """model.block_size against the data: pretraining windows need block_size+1 tokens, and sft and dpo
    (which inherit it) need the longest prompt+response to fit, so a too-small context fails before training."""
    for split, n in info["n_tokens"].items():
        if n < block_size + 2:
            raise GptlabError(
                f"model.block_size={block_size} needs at least {block_size + 2} tokens but the {split} shard has {n}; "
                "lower model.block_size or add data"
            )
    longest = info["longest_example"]
    if longest > block_size + 1:
        raise GptlabError(
            f"model.block_size={block_size} fits {block_size + 1} tokens but the longest sft/preference example has "
            f"{longest}; raise model.block_size to at least {longest - 1}"
        )
