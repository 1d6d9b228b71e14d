"""pretrain: a GPT from scratch on the token shards, next-token loss on random windows."""
from __future__ import annotations

from dataclasses import asdict

from gptlab import paths
from gptlab.data.loader import Slicer, StepCache, Windows, step_windows
from gptlab.data.records import INFO_FIELDS, read_mc
from gptlab.evaluation import multiple_choice_conventions, shard_loss
from gptlab.fileio import file_sha256, read_json
from gptlab.losses import token_loss
from gptlab.model import GPT, GPTConfig
from gptlab.stage import announce, check_context, read_split, run, stage_meta, start
from gptlab.tokenizer import load_tokenizer, padded_vocab_size
from gptlab.train import Task, train


def main() -> None:
    params, accelerator = start("pretrain")
    cfg, T = params.pretrain, params.model.block_size
    tok = load_tokenizer(paths.TOKENIZER)  # first, so the shards' ids can be checked against its vocabulary
    train_windows = Windows(read_split("pretrain", "train", tok), T)
    val_windows = Windows(read_split("pretrain", "val", tok), T)
    info = read_json(paths.DATA_INFO, INFO_FIELDS)
    check_context(T, info)  # sft and dpo inherit T: fail now, not after
    # as many endings as the val loss reads windows, so each evaluation costs about twice the val loss alone
    items = read_mc(paths.MC_EVAL)
    mc_items = items[: max(1, cfg.eval_batches * cfg.micro_batch_size // len(items[0]["endings"]))]
    grad_accum = cfg.grad_accum_steps(T, accelerator.num_processes, "pretrain")
    model = GPT(GPTConfig(**asdict(params.model), vocab_size=padded_vocab_size(tok.n_vocab)))
    slicer = Slicer(cfg.micro_batch_size, grad_accum, accelerator.process_index, accelerator.num_processes)
    announce(accelerator, "pretrain", {
        "params": f"{model.num_params() / 1e6:.2f}M",
        "vocab": f"{tok.n_vocab} (padded {model.config.vocab_size})",
        "tokens/step": cfg.tokens_per_step,
        "grad_accum": grad_accum,
        "epochs": f"{cfg.max_steps * slicer.global_rows / train_windows.n * T:.1f}",
    })

    # each step's global batch of distinct windows; this process takes its slice (data/loader.py)
    step_batch = StepCache(lambda step: step_windows(train_windows.n, params.seed, step, slicer.global_rows))

    def next_batch(step, micro):
        return train_windows.batch(slicer.take(step_batch(step), micro), accelerator.device)

    def loss(m, batch):
        idx, targets = batch
        return token_loss(m(idx), targets), {}, idx.numel()

    # the loss a perfect model of the world would reach: logged beside val_loss as the loss chart's floor
    floor = {"entropy_floor": info["entropy_floor"]} if "entropy_floor" in info else {}

    def evaluate(m):  # val loss, and HellaSwag-style multiple choice as llm.c logs it while pretraining
        mc = multiple_choice_conventions(m, tok, mc_items, cfg.micro_batch_size, ("llmc",))["mc_llmc"]
        return {"val_loss": shard_loss(m, val_windows, cfg.eval_batches, cfg.micro_batch_size), **floor,
                "mc_llmc/acc": mc["acc"], "mc_llmc/acc_norm": mc["acc_norm"]}

    meta = stage_meta("pretrain", params, ("data", "tokenizer", "model", "pretrain"), None)
    inputs = {"tokenizer": tok.fingerprint, str(paths.DATA_INFO): file_sha256(paths.DATA_INFO)}  # info.json describes the shards
    train(model, Task(next_batch, loss, evaluate), cfg, grad_accum, accelerator, "pretrain", meta, tok, inputs)


if __name__ == "__main__":
    run(main)
