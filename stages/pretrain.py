"""pretrain: a GPT from scratch on the token shards, next-token loss on random windows."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np

from gptlab import paths
from gptlab.data.records import INFO_FIELDS
from gptlab.data.shards import read_shard
from gptlab.evaluation import shard_loss, windows
from gptlab.fileio import read_json
from gptlab.losses import token_loss
from gptlab.model import GPT, GPTConfig
from gptlab.stage import announce, check_context, require_same_tokenizer, run, stage_meta, start
from gptlab.tokenizer import load_tokenizer, padded_vocab_size
from gptlab.train import Task, open_live, train


def main() -> None:
    params, accelerator = start("pretrain")
    cfg, T = params.pretrain, params.model.block_size
    tok = load_tokenizer(paths.TOKENIZER)  # first, so the shards' ids can be checked against its vocabulary
    train_shard, val_shard = read_shard(paths.TRAIN_SHARD, tok.n_vocab), read_shard(paths.VAL_SHARD, tok.n_vocab)
    for shard in (train_shard, val_shard):
        require_same_tokenizer("pretrain", tok, shard.fingerprint)
    check_context(T, read_json(paths.DATA_INFO, INFO_FIELDS))  # sft and dpo inherit T: fail now, not after
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
