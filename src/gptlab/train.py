"""The one training loop that pretrain, sft and dpo share. They differ only in a `Task`: where micro-batches
come from, how a micro-batch becomes a loss, and what evaluation measures.

Per optimizer step: evaluate (every eval_interval) → forward/backward over grad_accum micro-batches →
clip → set lr → step → log (every log_interval). Distribution, device placement and mixed precision are
accelerate's: the same loop runs on one CPU, two gloo ranks, or many GPUs.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from tqdm import tqdm

from gptlab.checkpoint import save_checkpoint
from gptlab.config import GptlabError, TrainConfig
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer


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
    fused = device.type == "cuda"  # the fused kernel exists for CUDA tensors only
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


def open_live(stage_metrics_dir: Path, accelerator: Accelerator):
    """dvclive on the main process only; dvc.yaml declares metrics and plots itself (dvcyaml=False)."""
    if not accelerator.is_main_process:
        return None
    from dvclive import Live

    return Live(dir=str(stage_metrics_dir), dvcyaml=False, save_dvc_exp=False)


def log_to_live(live, step: int, metrics: dict[str, float]) -> None:
    if live is None:
        return
    live.step = step
    for k, v in metrics.items():
        live.log_metric(k, v)
    live.make_summary()


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


def train(
    model: GPT,
    task: Task,
    cfg: TrainConfig,
    grad_accum: int,
    accelerator: Accelerator,
    live,
    checkpoint_dir: Path,
    meta: dict,
    tok: Tokenizer,
) -> dict[str, float]:
    """Run cfg.max_steps optimizer steps, then save the checkpoint; returns the final metrics."""
    section = meta.get("stage", "train")
    optimizer = build_optimizer(model, cfg, accelerator.device)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    bar = tqdm(total=cfg.max_steps, disable=not accelerator.is_main_process, desc="train", dynamic_ncols=True, mininterval=2.0)
    final: dict[str, float] = {}
    seconds, tokens, steps = 0.0, 0, 0  # training work since the last log line (evaluation excluded)
    try:
        for step in range(1, cfg.max_steps + 1):
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
            require_finite(step, sums["loss"], section, checkpoint_dir)  # before the step spreads it into the weights
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
                final.update(metrics)
                seconds, tokens, steps = 0.0, 0, 0
            if step % cfg.eval_interval == 0 or last:
                evals = evaluate(task, accelerator.unwrap_model(wrapped))
                say(accelerator, log_line(step, evals))
                log_to_live(live, step, evals)
                final.update(evals)
    finally:
        bar.close()  # also on an error or Ctrl-C, so the one `error:` line gets a line of its own

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        summary = {k: final[k] for k in ("loss", "val_loss") if k in final}
        save_checkpoint(checkpoint_dir, accelerator.unwrap_model(wrapped), {**meta, "step": cfg.max_steps, "metrics": summary}, tok)
        if live is not None:
            live.end()
    accelerator.wait_for_everyone()
    return final
