"""Batches as a pure function of (seed, step, process): resumable by construction, the same for any split of
the global batch into processes and micro-batches.

Pretraining reads windows of block_size+1 consecutive tokens from memory-mapped shards; a window never crosses
a shard's end. At optimizer step k the global batch is `n` distinct windows drawn without replacement by a
generator seeded with (seed, k); process p of P takes its contiguous slice of them, and micro-batch m of that
slice the next micro_batch_size rows. So:
- the batch at step k does not depend on whether steps 0..k-1 were drawn (a resumed run sees what it would have);
- processes never share a window within a step, and P processes train on the windows one process would;
- validation uses fixed, evenly spaced windows: the same in every run and for every process count.
Fine-tuning sets (sft, dpo) use `step_rows`, the same scheme over example indices.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gptlab.data.shards import Shard


class Windows:
    """Every window start of a list of shards, numbered globally: shard by shard, offset by offset."""

    def __init__(self, shards: list[Shard], block_size: int):
        self.tokens = [s.tokens for s in shards]
        self.block_size = block_size
        counts = [max(0, len(t) - block_size) for t in self.tokens]  # starts 0 .. len-T-1 in each shard
        self.first = np.cumsum([0, *counts])  # global number of each shard's first window
        self.n = int(self.first[-1])

    def rows(self, starts: np.ndarray) -> np.ndarray:
        """(B, T+1) int64 token windows for global window numbers `starts`."""
        shard = np.searchsorted(self.first, starts, side="right") - 1
        T = self.block_size
        return np.stack([self.tokens[s][o : o + T + 1].astype(np.int64) for s, o in zip(shard, starts - self.first[shard])])

    def batch(self, starts: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
        """idx (B, T) and targets (B, T): the windows and the same windows shifted by one token."""
        rows = to_device(torch.from_numpy(self.rows(np.asarray(starts, dtype=np.int64))), device)
        return rows[:, :-1], rows[:, 1:]

    def fixed(self, count: int) -> np.ndarray:
        """`count` evenly spaced window numbers: the validation windows, the same every call."""
        return np.linspace(0, self.n - 1, num=count).astype(np.int64)


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """To a GPU from pinned memory without blocking (the copy overlaps the previous kernels); else plainly."""
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def step_generator(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])


def step_windows(n_windows: int, seed: int, step: int, count: int) -> np.ndarray:
    """The global batch of step `step`: `count` distinct window numbers (with repeats only when there are
    fewer windows than rows)."""
    return step_generator(seed, step).choice(n_windows, size=count, replace=count > n_windows)


def step_rows(n_rows: int, seed: int, step: int, count: int) -> np.ndarray:
    """The global batch of step `step` over a fine-tuning set: `count` example indices, with replacement."""
    return step_generator(seed, step).integers(0, n_rows, count)


@dataclass(frozen=True)
class Slicer:
    """Which rows of a step's global batch a process's micro-batch takes."""

    micro_batch_size: int
    grad_accum: int
    process_index: int
    num_processes: int

    @property
    def global_rows(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.num_processes

    def take(self, rows: np.ndarray, micro: int) -> np.ndarray:
        start = (self.process_index * self.grad_accum + micro) * self.micro_batch_size
        return rows[start : start + self.micro_batch_size]


class StepCache:
    """A step's global batch, computed once and sliced by each of its micro-batches."""

    def __init__(self, draw):
        self.draw, self.step, self.rows = draw, None, None

    def __call__(self, step: int) -> np.ndarray:
        if step != self.step:
            self.step, self.rows = step, self.draw(step)
        return self.rows
