"""The output head on the CPU: an nn.Linear whose large logits reuse the memory of the last ones. Same values.

On the CPU the logits are by far the largest tensor of a training step: (B*T, vocab) fp32, 412 MB at 8 x 256
tokens with a 50304 vocabulary. glibc serves every allocation over 32 MiB with a fresh mmap and unmaps it when it
is freed, so every step the kernel maps and zeroes that memory again, one 4 KiB page at a time (~100k page
faults). OutputHead keeps the memory and writes the next logits into it once nothing uses the last ones. On
bench/train_throughput.py's large config that took large.ratio_vs_hf from 1.06 (nn.Linear) to 1.13, and
side by side with nn.Linear in one process (same weights and batches) a step ran 6% to 30% faster, the more
the busier the machine's memory was.

How it knows that nothing uses them: the kept memory is a numpy array, and the logits are a tensor made by
torch.from_numpy on a fresh numpy view of it. torch's storage holds that view until the storage is freed, which
is when no tensor, view or autograd-saved tensor of those logits is left; a weak reference to the view says
when that has happened. Until then the next logits go to a second buffer, or (both in use) to fresh memory.

Values: the forward is the mm nn.Linear runs (x @ W.T, written with out=), the backward the two mms autograd runs
for it (grad_x = g @ W, grad_W = g.T @ x), so logits and gradients are bitwise nn.Linear's (tests/test_model.py).
One layout difference: grad_W comes out as a plain (vocab, C) tensor rather than a transposed view, so the tied
embedding's gradient is added into it in place (the same sum) rather than into a third (vocab, C) tensor.
Everywhere else (an accelerator, autocast, torch.compile, a bias, outputs under 32 MiB) it is nn.Linear.
"""
from __future__ import annotations

import math
import threading
import weakref

import numpy as np
import torch
import torch.nn as nn

REUSE_BYTES = 32 * 2**20  # glibc's largest mmap threshold: malloc recycles smaller blocks itself
ALIGN = 64  # bytes, as torch's CPU allocator aligns (BLAS kernels may round differently on other alignments)
KEEP = 2  # buffers kept: a training loop may still hold the last step's logits while making the next


class _Buffer:
    """Memory for one (shape, dtype) of logits; `user` is a weak reference to the numpy view their storage holds."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype):
        self.shape, self.dtype = shape, dtype
        nbytes = math.prod(shape) * dtype.itemsize
        raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
        start = -raw.ctypes.data % ALIGN
        self.memory = raw[start:start + nbytes]
        self.user: weakref.ref | None = None

    def in_use(self) -> bool:
        return self.user is not None and self.user() is not None

    def tensor(self) -> torch.Tensor:
        view = self.memory[:]  # a new array object on the same memory, held by the tensor's storage alone
        self.user = weakref.ref(view)
        return torch.from_numpy(view).view(self.dtype).view(self.shape)


class _Buffers:
    def __init__(self, keep: int = KEEP):
        self.keep = keep
        self.buffers: list[_Buffer] = []
        self.lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """An uninitialised tensor on kept memory, or None when every kept buffer is in use."""
        with self.lock:
            free = [b for b in self.buffers if not b.in_use()]
            for b in free:
                if (b.shape, b.dtype) == (shape, dtype):
                    return b.tensor()
            if len(self.buffers) >= self.keep:
                if not free:
                    return None
                self.buffers.remove(free[0])  # another shape's: make room
            self.buffers.append(_Buffer(shape, dtype))
            return self.buffers[-1].tensor()


BUFFERS = _Buffers()


class _HeadMatmul(torch.autograd.Function):
    """x @ weight.T into kept memory where there is some, with nn.Linear's backward mms. x (N, C), weight (V, C)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        out = BUFFERS.empty((x.shape[0], weight.shape[0]), x.dtype)
        return torch.mm(x, weight.t(), out=out) if out is not None else torch.mm(x, weight.t())  # (N, V)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad.mm(weight) if ctx.needs_input_grad[0] else None  # (N, C)
        grad_w = grad.t().mm(x) if ctx.needs_input_grad[1] else None  # (V, C), contiguous
        return grad_x, grad_w


class OutputHead(nn.Linear):
    """nn.Linear; without a bias, on the CPU, its outputs of 32 MiB or more go through _HeadMatmul (see above)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.bias is None and x.device.type == "cpu" and x.dim() == 3 and x.is_contiguous()
                and x.dtype == self.weight.dtype and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling()
                and x.shape[0] * x.shape[1] * self.out_features * x.element_size() >= REUSE_BYTES):
            B, T, C = x.shape
            return _HeadMatmul.apply(x.view(B * T, C), self.weight).view(B, T, self.out_features)
        return super().forward(x)
