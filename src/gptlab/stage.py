"""Start-up shared by the stage scripts: params, accelerator, seed, inherited checkpoints, announcements."""
from __future__ import annotations

import os
import sys
from dataclasses import asdict
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from gptlab import paths
from gptlab.checkpoint import load_checkpoint
from gptlab.config import GptlabError, Params, load_params
from gptlab.tokenizer import Tokenizer, load_tokenizer
from gptlab.train import say


def start(stage: str) -> tuple[Params, Accelerator]:
    """Validate params.yaml before anything expensive, then set up devices and seeds."""
    params = load_params()
    accelerator = Accelerator()
    if accelerator.device.type == "cpu":
        # accelerate launch sets OMP_NUM_THREADS=1; on CPU that would leave all but one core idle
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.state.num_processes))
    set_seed(params.seed)  # same init on every process; data order differs by process_index below
    say(accelerator, f"[{stage}] {accelerator.num_processes} process(es), {accelerator.distributed_type}, device {accelerator.device}")
    return params, accelerator


def run(main: Callable[[], None]) -> None:
    """Run a stage's main(); bad input ends it with one clear line (exit 2) instead of a traceback."""
    try:
        main()
    except GptlabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def tokenizer_for(stage: str, expected_fingerprint: str) -> Tokenizer:
    """The tokenize stage's tokenizer, which must be the one the inputs were made with."""
    tok = load_tokenizer(paths.TOKENIZER)
    require_same_tokenizer(stage, tok, expected_fingerprint)
    return tok


def require_same_tokenizer(stage: str, tok: Tokenizer, expected_fingerprint: str) -> None:
    if tok.fingerprint != expected_fingerprint:
        raise GptlabError(
            f"[{stage}] {paths.TOKENIZER} has fingerprint {tok.fingerprint} but the input was made with "
            f"{expected_fingerprint}; rerun the pipeline from tokenize (dvc repro)"
        )


def inherit(stage: str, parent: str, device):
    """Load the parent stage's checkpoint and say what this stage inherits from it."""
    model, meta = load_checkpoint(paths.checkpoint_dir(parent), device)
    tok = tokenizer_for(stage, meta["tokenizer"]["fingerprint"])
    return model, meta, tok


def announce(accelerator: Accelerator, stage: str, lines: dict) -> None:
    say(accelerator, f"[{stage}] " + " | ".join(f"{k} {v}" for k, v in lines.items()))


def stage_meta(stage: str, params: Params, sections: tuple[str, ...], parent: str | None) -> dict:
    """What a checkpoint records about how it was made."""
    return {
        "stage": stage,
        "init_from": str(paths.checkpoint_dir(parent)) if parent else "scratch",
        "params": {"seed": params.seed, **{s: asdict(getattr(params, s)) for s in sections}},
    }
