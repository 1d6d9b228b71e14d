"""GPT-2 architecture, readable top to bottom.

Parameter names match transformers' GPT2LMHeadModel, so a state dict converts with
`to_hf_state_dict` / `from_hf_state_dict` by transposing the Conv1D weights and nothing else.
Shapes in comments: B batch, T new tokens, L cached + new tokens, C n_embd, H n_head, D head size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.cpu_head import OutputHead  # nn.Linear; on the CPU its large outputs reuse memory (same values)

LN_EPS = 1e-5  # GPT-2's layer_norm_epsilon
INIT_STD = 0.02  # GPT-2's initializer_range

# HF GPT-2 stores these as Conv1D, whose weight is (in, out) instead of nn.Linear's (out, in)
CONV1D_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# non-parameter buffers some transformers versions keep in the state dict
HF_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int  # transformer blocks
    n_head: int  # attention heads per block; must divide n_embd
    n_embd: int  # width of the residual stream
    block_size: int  # longest sequence the model can see (number of learned positions)
    vocab_size: int  # rows of the token embedding and of the output head
    bias: bool = True  # biases in Linear and LayerNorm layers (GPT-2 has them)
    dropout: float = 0.0  # dropout on embeddings, attention weights and residual branches


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so each new token costs one step.

    Storage is allocated on the first write, sized (B, H, max_len, D) per layer, with the dtype and
    device of the keys; `pos` counts the tokens already written. Layers write through `update`;
    the model calls `advance` once all layers have seen the new tokens.
    """

    def __init__(self, n_layer: int, max_len: int):
        self.max_len = max_len
        self.pos = 0
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (B, H, T, D) for the new tokens; returns all keys/values so far, (B, H, L, D)
        B, H, T, D = k.shape
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; cannot add {T} at position {self.pos}")
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(B, H, self.max_len, D)
            self.v[layer] = v.new_empty(B, H, self.max_len, D)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T: int) -> None:
        self.pos += T


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd={config.n_embd} must be divisible by n_head={config.n_head}")
        self.n_head = config.n_head
        self.dropout = config.dropout
        # one matmul produces queries, keys and values side by side
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        # heads are contiguous slices of C, as in GPT-2
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(layer, k, v)  # (B, H, L, D)
        p = self.dropout if self.training else 0.0
        if mask is not None:  # packed sequences: a block-diagonal causal mask (see GPT.forward)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            y = self._attend(q, k, v, past, p)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.c_proj(y))

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, p: float) -> torch.Tensor:
        T, L = q.shape[2], k.shape[2]
        if past == 0:
            # no cached keys: plain lower-triangular mask
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        if T == 1:
            # a single new token is the latest position: it may see every key
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        # new token i sits at absolute position past + i and sees keys 0..past + i
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(diagonal=past)  # (T, L)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm block: each branch reads a normalised copy and adds back into the residual stream."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=LN_EPS, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=LN_EPS, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, mask)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=LN_EPS, bias=config.bias),
            )
        )
        self.lm_head = OutputHead(config.n_embd, config.vocab_size, bias=False)
        # tie input and output embeddings: one matrix, counted and updated once
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # residual branches add up over 2 * n_layer projections; scale them so the stream's
        # variance at init does not grow with depth
        resid_std = INIT_STD * (2 * config.n_layer) ** -0.5
        for name, p in self.named_parameters():
            if name.endswith("attn.c_proj.weight") or name.endswith("mlp.c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=resid_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """An empty KV cache for up to max_len tokens (default block_size)."""
        max_len = self.config.block_size if max_len is None else max_len
        return KVCache(self.config.n_layer, min(max_len, self.config.block_size))

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                segments: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab). segments (B, T), for packed rows: which example each position belongs to
        (numbered along the row; -1 = padding); positions restart and attention stays within each example.
        last_only: logits of the last position alone, (B, 1, vocab), all that picking the next token needs."""
        B, T = idx.shape
        past = 0 if cache is None else cache.pos
        if past + T > self.config.block_size:
            raise ValueError(
                f"sequence of {past + T} tokens ({past} cached + {T} new) exceeds block_size="
                f"{self.config.block_size}; crop the input to the last {self.config.block_size} tokens"
            )
        mask = None
        if segments is not None:
            pos, mask = packed_positions(segments)  # (B, T), (B, 1, T, T)
        else:  # new tokens continue where the cache left off
            pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i, mask)  # (B, T, C)
        if cache is not None:
            cache.advance(T)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if last_only:  # inference: only the next token's logits, (B, 1, vocab_size)
            return last_logits(x[:, -1], self.lm_head.weight).unsqueeze(1)
        return self.lm_head(x)  # (B, T, vocab_size)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the tied wte/lm_head matrix counts once. non_embedding drops wpe."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6N for the matmuls (forward + backward) plus attention scores."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size


def last_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for the few rows of a decoding step: x (B, C), the output head's weight (vocab, C) -> (B, vocab).

    A decoding step reads the whole (vocab, C) matrix for a few rows. On the CPU (MKL) the order
    (weight @ x.T).T does that 3-5x faster than x @ weight.T, whose few-row kernels read the matrix slowly; a
    single row is given a copy, since one column would go to the matrix-vector kernel, as slow
    (bench/generate_throughput.py). The values are lm_head(x)'s up to float rounding (another summation order).
    """
    cols = x.T if x.shape[0] > 1 else x.repeat(2, 1).T  # (C, >= 2)
    return (weight @ cols).T[: x.shape[0]]  # (B, vocab)


def packed_positions(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed rows (segments (B, T), contiguous runs per example): each position's index within its
    example (B, T), and the attention mask (B, 1, T, T): a position sees earlier positions of its own example."""
    B, T = segments.shape
    at = torch.arange(T, device=segments.device).expand(B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.cummax(torch.where(starts, at, torch.zeros_like(at)), dim=1).values  # start of each run
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return at - first, (same & causal).unsqueeze(1)


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """State dict loadable into transformers' GPT2LMHeadModel (which always has biases)."""
    sd = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        sd[name] = t.t().contiguous() if name.endswith(CONV1D_SUFFIXES) else t.clone()
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()
    return sd


def from_hf_state_dict(sd: dict[str, torch.Tensor], config: GPTConfig) -> GPT:
    """A GPT built from a GPT2LMHeadModel state dict; the output head must be tied to wte."""
    ours = {}
    for name, t in sd.items():
        if name.endswith(HF_BUFFER_SUFFIXES):
            continue
        ours[name] = t.t().contiguous() if name.endswith(CONV1D_SUFFIXES) else t
    wte = ours["transformer.wte.weight"]
    head = ours.setdefault("lm_head.weight", wte)
    # our head is the embedding matrix itself, so an untied HF head cannot be represented
    if head.shape != wte.shape or not torch.equal(head, wte):
        raise ValueError("lm_head.weight differs from transformer.wte.weight; GPT requires tied weights")
    model = GPT(config)
    model.load_state_dict(ours, strict=True)
    return model

