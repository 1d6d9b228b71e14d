"""pretrain: a GPT from scratch on the token shards, next-token loss on random windows."""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np

from gptlab import paths
from gptlab.config import GptlabError
from gptlab.data.shards import read_shard
from gptlab.evaluation import shard_loss, windows
from gptlab.losses import token_loss
from gptlab.model import GPT, GPTConfig
from gptlab.stage import announce, run, stage_meta, start, tokenizer_for
from gptlab.tokenizer import padded_vocab_size
from gptlab.train import Task, open_live, train


def main() -> None:
    params, accelerator = start("pretrain")
    cfg, T = params.pretrain, params.model.block_size
    train_shard, val_shard = read_shard(paths.TRAIN_SHARD), read_shard(paths.VAL_SHARD)
    tok = tokenizer_for("pretrain", train_shard.fingerprint)
    for shard in (train_shard, val_shard):
        if len(shard.tokens) < T + 2:
            raise GptlabError(
                f"model.block_size={T} needs at least {T + 2} tokens but {shard.path} has {len(shard.tokens)}; "
                "lower model.block_size or add data"
            )
    longest = json.loads(paths.DATA_INFO.read_text())["longest_example"]
    if longest > T + 1:  # sft and dpo inherit this model's block_size: fail now, not after pretraining
        raise GptlabError(
            f"model.block_size={T} fits {T + 1} tokens but the longest sft/preference example has {longest}; "
            f"raise model.block_size to at least {longest - 1}"
        )
    grad_accum = cfg.grad_accum_steps(T, accelerator.num_processes, "pretrain")
    model = GPT(GPTConfig(**asdict(params.model), vocab_size=padded_vocab_size(tok.n_vocab)))
    announce(accelerator, "pretrain", {
        "params": f"{model.num_params() / 1e6:.2f}M",
        "vocab": f"{tok.n_vocab} (padded {model.config.vocab_size})",
        "tokens/step": cfg.tokens_per_step,
        "grad_accum": grad_accum,
        "epochs": f"{cfg.max_steps * cfg.tokens_per_step / len(train_shard.tokens):.1f}",
    })

    rng = np.random.default_rng(params.seed + accelerator.process_index)  # each process its own windows
    high = len(train_shard.tokens) - T - 1

    def next_batch():
        return windows(train_shard.tokens, rng.integers(0, high + 1, cfg.micro_batch_size), T, accelerator.device)

    def loss(m, batch):
        idx, targets = batch
        return token_loss(m(idx), targets), {}, idx.numel()

    def evaluate(m):
        return {"val_loss": shard_loss(m, val_shard.tokens, T, cfg.eval_batches, cfg.micro_batch_size)}

    meta = stage_meta("pretrain", params, ("data", "tokenizer", "model", "pretrain"), parent=None)
    live = open_live(paths.metrics_dir("pretrain"), accelerator)
    train(model, Task(next_batch, loss, evaluate), cfg, grad_accum, accelerator, live, paths.checkpoint_dir("pretrain"), meta, tok)


if __name__ == "__main__":
    run(main)
