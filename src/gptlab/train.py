"""The one training loop that pretrain, sft and dpo share. They differ only in a `Task`: where micro-batches
come from, how a micro-batch becomes a loss, and what evaluation measures.

Per optimizer step: evaluate (every eval_interval) → forward/backward over grad_accum micro-batches →
clip → set lr → step → log (every log_interval). Distribution, device placement and mixed precision are
accelerate's: the same loop runs on one CPU, two gloo ranks, or many GPUs.
"""
from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from tqdm import tqdm

from gptlab import paths, resume
from gptlab.checkpoint import save_checkpoint
from gptlab.config import GptlabError, TrainConfig
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer

FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # where torch (2.4+) has a fused AdamW kernel


@dataclass
class Task:
    """What a stage plugs into the loop.

    next_batch(step, micro): this process's micro-batch `micro` of optimizer step `step` (1-based): a pure
        function of them (see data/loader.py), so a run's batches never depend on what came before.
    loss(model, batch) -> (loss, metrics, n_tokens): scalar loss to minimise, extra detached scalars to log
        (averaged over micro-batches and processes), tokens the micro-batch processed (for tok/s).
    evaluate(model) -> metrics: must include "val_loss"; runs under no_grad on the unwrapped model.
    """

    next_batch: Callable[[int, int], Any]
    loss: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor], int]]
    evaluate: Callable[[torch.nn.Module], dict[str, float]]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine down to the cfg.min_lr floor at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - cfg.min_lr)


def build_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (Linear weights, embeddings) only; biases and LayerNorm are free."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # one fused kernel per step instead of a handful per tensor: faster on GPUs, and ~10% on small CPU models
    fused = device.type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def log_line(step: int, metrics: dict[str, float]) -> str:
    """`step 120 | loss 2.314 | lr 3.0e-4 | 18.2k tok/s | 41 ms` — compact and regular."""
    parts = [f"step {step}"]
    for k, v in metrics.items():
        if k == "lr":
            parts.append(f"lr {v:.1e}")
        elif k == "tokens_per_sec":
            parts.append(f"{v / 1000:.1f}k tok/s")
        elif k == "ms_per_step":
            parts.append(f"{v:.0f} ms")
        else:
            parts.append(f"{k} {v:.4f}")
    return " | ".join(parts)


def say(accelerator: Accelerator, text: str) -> None:
    """Print on the main process only, above any progress bar."""
    if accelerator.is_main_process:
        tqdm.write(text)


def open_live(stage_metrics_dir: Path, accelerator: Accelerator, resume: bool):
    """dvclive on the main process only; dvc.yaml declares metrics and plots itself (dvcyaml=False).
    resume: keep what the folder holds (restored from a resume state) instead of starting it afresh."""
    if not accelerator.is_main_process:
        return None
    from dvclive import Live

    return Live(dir=str(stage_metrics_dir), dvcyaml=False, save_dvc_exp=False, resume=resume)


# Logged per step into the plots, kept out of metrics.json: set by params, so in `dvc metrics diff` and
# `dvc exp show` they would only bury the results.
PLOTS_ONLY = ("lr",)
# Timings differ on every run, so they go to their own git-ignored file (paths.timing_file), outside every
# stage output: a rerun whose results are byte-identical leaves git and dvc.lock clean, and `dvc plots show`
# still draws them from the workspace.
TIMING = ("tokens_per_sec", "ms_per_step")


def log_to_live(live, step: int, metrics: dict[str, float]) -> None:
    if live is None:
        return
    live.step = step
    for k, v in metrics.items():
        if k not in TIMING:
            live.log_metric(k, v)
    for k in PLOTS_ONLY:
        live.summary.pop(k, None)
    live.make_summary()


def open_timing(stage: str, accelerator: Accelerator, resume: bool) -> Path | None:
    """The main process's timing file, started afresh unless a resumed run continues it."""
    if not accelerator.is_main_process:
        return None
    path = paths.timing_file(stage)
    if not (resume and path.is_file()):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\t".join(("step", *TIMING)) + "\n")
    return path


def log_timing(path: Path | None, step: int, metrics: dict[str, float]) -> None:
    if path is not None:
        with path.open("a") as f:
            f.write("\t".join([str(step)] + [f"{metrics[k]:.6g}" for k in TIMING]) + "\n")


def require_finite(step: int, loss: torch.Tensor, section: str, checkpoint_dir: Path) -> None:
    """A NaN/inf loss never recovers: stop at once, before the update, and write no checkpoint."""
    value = loss.item()
    if not math.isfinite(value):
        raise GptlabError(
            f"[{section}] step {step}: the training loss is {value}; lower {section}.lr or raise "
            f"{section}.warmup_steps (and keep {section}.grad_clip on); no checkpoint was written, so "
            f"{checkpoint_dir} still holds what it held before"
        )


def evaluate(task: Task, model: GPT) -> dict[str, float]:
    """task.evaluate in eval mode (no dropout) without gradients; the next step switches back to train."""
    model.eval()
    with torch.no_grad():
        return task.evaluate(model)


class Stopped(Exception):
    """SIGINT or SIGTERM arrived: the step finished, a resume state was saved, and the stage stops."""

    def __init__(self, stage: str, signum: int, step: int, folder: Path):
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(f"[{stage}] stopped by {name} after step {step}; its resume state is {folder}: run the "
                         f"stage again (dvc repro) to continue from there")


class StopSignals:
    """Turns the first SIGINT/SIGTERM into a request the loop honours at the end of the step (save, then
    stop); signals that follow are ignored until then, so a launcher's follow-up SIGTERM cannot cut a save
    short (kill -9 still can: the previous state stays whole)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self.previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._request)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _request(self, signum, frame) -> None:
        self.signum = self.signum or signum
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def agreed(self, accelerator: Accelerator) -> int:
        """The signal any process received (every process must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.signum
        return int(accelerator.gather(torch.tensor([self.signum], device=accelerator.device)).max())


def resume_or_start(model: GPT, optimizer, cfg: TrainConfig, grad_accum: int, accelerator: Accelerator,
                    stage: str, meta: dict, inputs: dict[str, str]):
    """Load the newest resume state if one matches this run (else refuse), or start at step 0.
    Returns (the last step done, the fingerprint new states record, the state loaded or None)."""
    root, metrics_dir = paths.resume_dir(stage), paths.metrics_dir(stage)
    expected = resume.fingerprint(meta["params"], inputs, accelerator, cfg.micro_batch_size, grad_accum)
    saved = resume.latest(root, expected, stage)
    accelerator.wait_for_everyone()  # every process has read the state before the main one tidies the folder
    if accelerator.is_main_process:
        resume.clear_leftovers(root)
        if saved is not None:
            resume.restore_metrics(saved, metrics_dir)
    if saved is None:
        return 0, expected, None
    resume.load_into(saved, model, optimizer, accelerator)
    say(accelerator, f"[{stage}] resuming after step {saved.step} from {saved.folder} (same params, inputs and launch)")
    return saved.step, expected, saved


def train(
    model: GPT,
    task: Task,
    cfg: TrainConfig,
    grad_accum: int,
    accelerator: Accelerator,
    stage: str,
    meta: dict,
    tok: Tokenizer,
    inputs: dict[str, str],
) -> dict[str, float]:
    """Run cfg.max_steps optimizer steps (continuing a saved state when there is one), then save the
    checkpoint; returns the final metrics. inputs: name -> checksum of what the stage read, for resume."""
    checkpoint_dir = paths.checkpoint_dir(stage)
    optimizer = build_optimizer(model, cfg, accelerator.device)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    # the model itself (sharded in place under FSDP) and the torch optimizer: what gptlab.resume reads and writes
    module, raw_optimizer = accelerator.unwrap_model(wrapped), optimizer.optimizer
    start, expected, saved = resume_or_start(module, raw_optimizer, cfg, grad_accum, accelerator, stage, meta, inputs)
    if cfg.compile:
        wrapped.compile()  # in place: parameter names and the state dict stay as they are
    live = open_live(paths.metrics_dir(stage), accelerator, resume=saved is not None)
    timing = open_timing(stage, accelerator, resume=saved is not None)
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not accelerator.is_main_process, desc="train",
               dynamic_ncols=True, mininterval=2.0)
    final: dict[str, float] = {}
    seconds, tokens, steps = 0.0, 0, 0  # training work since the last log line (evaluation excluded)
    try:
        with StopSignals() as signals:
            for step in range(start + 1, cfg.max_steps + 1):
                t0 = time.perf_counter()
                lr = lr_at(step - 1, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                # forward/backward over grad_accum micro-batches; gradients sync only on the last one
                wrapped.train()
                sums: dict[str, torch.Tensor] = {}
                for micro in range(grad_accum):
                    sync = micro == grad_accum - 1
                    with nullcontext() if sync else accelerator.no_sync(wrapped):
                        loss, extra, n_tokens = task.loss(wrapped, task.next_batch(step, micro))
                        accelerator.backward(loss / grad_accum)
                    for k, v in {"loss": loss.detach(), **extra}.items():
                        sums[k] = sums.get(k, 0.0) + v.float() / grad_accum
                    tokens += n_tokens * accelerator.num_processes
                if cfg.grad_clip > 0:
                    accelerator.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip)
                require_finite(step, sums["loss"], stage, checkpoint_dir)  # before the step spreads it into the weights
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                seconds, steps = seconds + time.perf_counter() - t0, steps + 1
                bar.update(1)

                last = step == cfg.max_steps
                if step % cfg.log_interval == 0 or last:
                    # every process reaches this point at the same steps, so the collective reduce is safe
                    means = {k: accelerator.reduce(v.reshape(1), reduction="mean").item() for k, v in sums.items()}
                    metrics = {**means, "lr": lr, "tokens_per_sec": tokens / seconds, "ms_per_step": 1000 * seconds / steps}
                    say(accelerator, log_line(step, metrics))
                    log_to_live(live, step, metrics)
                    log_timing(timing, step, metrics)
                    final.update(metrics)
                    seconds, tokens, steps = 0.0, 0, 0
                if step % cfg.eval_interval == 0 or last:
                    with accelerator.autocast():
                        evals = evaluate(task, module)
                    say(accelerator, log_line(step, evals))
                    log_to_live(live, step, evals)
                    final.update(evals)

                stop = signals.agreed(accelerator)
                if not last and (stop or (cfg.save_interval and step % cfg.save_interval == 0)):
                    folder = resume.save_state(paths.resume_dir(stage), step, module, raw_optimizer, accelerator,
                                               expected, paths.metrics_dir(stage), cfg.keep_saves)
                    if stop:
                        raise Stopped(stage, stop, step, folder)
    finally:
        bar.close()  # also on an error or Ctrl-C, so the one `error:` line gets a line of its own

    accelerator.wait_for_everyone()
    weights = resume.full_state(module)  # a collective under FSDP
    if accelerator.is_main_process:
        summary = {k: final[k] for k in ("loss", "val_loss") if k in final}
        save_checkpoint(checkpoint_dir, module, {**meta, "step": cfg.max_steps, "metrics": summary}, tok, weights)
        if live is not None:
            live.end()
        resume.discard_all(paths.resume_dir(stage))  # the stage is done: nothing left to resume
    accelerator.wait_for_everyone()
    return final
