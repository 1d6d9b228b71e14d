"""sft: supervised fine-tuning on instruction examples (sft.data), loss on the responses only.

The loss is the sum of response-token losses over the whole optimizer step divided by the step's response
tokens, counted over every micro-batch of every process: each response token weighs the same, so the split
into micro-batches and processes (and how long each example's response is) does not change the loss.
"""
from __future__ import annotations

from gptlab.checkpoint import load_model
from gptlab.data.finetune import input_files, sft_sets
from gptlab.data.formats import collate, encode_conversations
from gptlab.data.loader import Slicer, StepCache, step_rows, to_device
from gptlab.evaluation import examples_loss
from gptlab.losses import token_loss
from gptlab.stage import announce, empty_entry, epochs_entry, run, stage_inputs, stage_meta, start
from gptlab.train import Task, train


def main() -> None:
    params, accelerator = start("sft")
    cfg = params.sft
    model, tok, parent_meta = load_model(cfg.init, accelerator.device)  # a checkpoint, or a Hugging Face GPT-2
    T = model.config.block_size
    sets = sft_sets(cfg.data, params.seed)
    where = f"sft.data ({sets.source})"
    train_set = encode_conversations(tok, sets.train, T, cfg.max_prompt_tokens, where)
    heldout = encode_conversations(tok, sets.heldout, T, cfg.max_prompt_tokens, f"{where}, held out")
    examples, heldout = train_set.items, heldout.items[: cfg.eval_batches * cfg.micro_batch_size]
    grad_accum = cfg.grad_accum_steps(T, accelerator.num_processes, "sft")
    init_from = cfg.init
    announce(accelerator, "sft", {
        "init": f"{init_from} (step {parent_meta['step']}, {model.num_params() / 1e6:.2f}M params)",
        "data": sets.source,
        **empty_entry(sets.empty),
        "template": sets.train[0].template,
        "examples": train_set.describe(),
        "grad_accum": grad_accum,
        **epochs_entry("sft", cfg.max_steps, cfg.micro_batch_size * grad_accum * accelerator.num_processes,
                       len(examples)),
        **({"packing": f"up to {T} positions per row"} if cfg.packing else {}),
    })

    slicer = Slicer(cfg.micro_batch_size, grad_accum, accelerator.process_index, accelerator.num_processes)
    step_batch = StepCache(lambda step: step_rows(len(examples), params.seed, step, slicer.global_rows))
    # every process knows the whole step's rows (see data/loader.py), so the loss tokens need no communication
    step_tokens = StepCache(lambda step: sum(examples[i].n_loss for i in step_batch(step)))
    pieces = grad_accum * accelerator.num_processes  # the loop divides by grad_accum, DDP averages over processes

    def next_batch(step, micro):
        rows = slicer.take(step_batch(step), micro)
        idx, targets, segments = collate([examples[i] for i in rows], tok.eot_id, T if cfg.packing else 0)
        dev = accelerator.device
        return (to_device(idx, dev), to_device(targets, dev),
                None if segments is None else to_device(segments, dev), step_tokens(step))

    def loss(m, batch):
        idx, targets, segments, n_step = batch
        logits = m(idx) if segments is None else m(idx, segments=segments)
        return token_loss(logits, targets, reduction="sum") * (pieces / n_step), {}, idx.numel()

    def evaluate(m):
        return {"val_loss": examples_loss(m, heldout, cfg.micro_batch_size, tok.eot_id)}

    meta = stage_meta("sft", params, ("sft",), init_from, parent_meta, template=sets.train[0].template)
    train(model, Task(next_batch, loss, evaluate), cfg, grad_accum, accelerator, "sft", meta, tok,
          stage_inputs(parent_meta, *input_files(cfg.data, "sft.data")))


if __name__ == "__main__":
    run(main)
