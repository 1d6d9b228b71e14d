"""sft: supervised fine-tuning of the pretrained model on question/response pairs, loss on responses only."""
from __future__ import annotations

from gptlab import paths
from gptlab.data.formats import collate, encode_examples
from gptlab.data.loader import Slicer, StepCache, step_rows, to_device
from gptlab.data.records import read_sft
from gptlab.evaluation import examples_loss
from gptlab.losses import token_loss
from gptlab.stage import announce, inherit, run, stage_inputs, stage_meta, start
from gptlab.train import Task, train


def main() -> None:
    params, accelerator = start("sft")
    cfg = params.sft
    model, parent_meta, tok = inherit("sft", "pretrain", accelerator.device)
    T = model.config.block_size
    examples = encode_examples(tok, read_sft(paths.SFT_TRAIN), T, str(paths.SFT_TRAIN))
    heldout = encode_examples(tok, read_sft(paths.SFT_HELDOUT), T, str(paths.SFT_HELDOUT))
    heldout = heldout[: cfg.eval_batches * cfg.micro_batch_size]
    grad_accum = cfg.grad_accum_steps(T, accelerator.num_processes, "sft")
    announce(accelerator, "sft", {
        "init": f"{paths.checkpoint_dir('pretrain')} (step {parent_meta['step']}, {model.num_params() / 1e6:.2f}M params)",
        "examples": len(examples),
        "grad_accum": grad_accum,
        "epochs": f"{cfg.max_steps * cfg.tokens_per_step / T / len(examples):.1f}",
    })

    slicer = Slicer(cfg.micro_batch_size, grad_accum, accelerator.process_index, accelerator.num_processes)
    step_batch = StepCache(lambda step: step_rows(len(examples), params.seed, step, slicer.global_rows))

    def next_batch(step, micro):
        chosen = slicer.take(step_batch(step), micro)
        idx, targets = collate([examples[i] for i in chosen], tok.eot_id)
        return to_device(idx, accelerator.device), to_device(targets, accelerator.device)

    def loss(m, batch):
        idx, targets = batch
        return token_loss(m(idx), targets), {}, idx.numel()

    def evaluate(m):
        return {"val_loss": examples_loss(m, heldout, cfg.micro_batch_size, tok.eot_id)}

    meta = stage_meta("sft", params, ("sft",), parent="pretrain")
    train(model, Task(next_batch, loss, evaluate), cfg, grad_accum, accelerator, "sft", meta, tok,
          stage_inputs(parent_meta, paths.SFT_TRAIN, paths.SFT_HELDOUT))


if __name__ == "__main__":
    run(main)
