"""dpo: direct preference optimisation of the sft model against a frozen copy of itself (the reference).

dpo.loss_type picks the loss (sigmoid, ipo, hinge, robust: gptlab.losses.dpo_loss) on response log-probs
summed over tokens. The reference's log-probs come from the ref_logps stage (data/ref_logps/), made once
for these pairs and these sft weights. Every micro-batch holds the same number of pairs, so the mean over
pairs does not depend on how a step is split into micro-batches and processes.
"""
from __future__ import annotations

import torch

from gptlab import paths, provenance, ref_logps
from gptlab.checkpoint import load_model
from gptlab.data.finetune import input_files
from gptlab.data.loader import Slicer, StepCache, step_rows
from gptlab.evaluation import batch_pair_logps, pair_logps
from gptlab.losses import dpo_loss
from gptlab.stage import announce, empty_entry, epochs_entry, run, stage_inputs, stage_meta, start
from gptlab.train import Task, train


def reward_metrics(policy_chosen, policy_rejected, chosen_rewards, rejected_rewards) -> dict[str, torch.Tensor]:
    """The implicit-reward statistics, named as TRL names them."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }


def main() -> None:
    params, accelerator = start("dpo")
    cfg = params.dpo
    policy, tok, parent_meta = load_model(paths.checkpoint_dir("sft"), accelerator.device)
    T = policy.config.block_size
    sets, encoded = ref_logps.encoded_sets(cfg, params.seed, tok, T)
    train_set, held_set = encoded["train"], encoded["heldout"]
    ref = ref_logps.read(provenance.init_sha256(parent_meta),
                         {name: ref_logps.pairs_fingerprint(s.items) for name, s in
                          (("train", train_set), ("heldout", held_set))})
    (ref_chosen, ref_rejected) = ref["train"]
    n_held = cfg.eval_batches * cfg.micro_batch_size
    pairs, heldout = train_set.items, held_set.items[:n_held]
    held_ref = tuple(t[:n_held] for t in ref["heldout"])
    # two sequences (chosen, rejected) per pair: tokens_per_step counts both
    grad_accum = cfg.grad_accum_steps(2 * T, accelerator.num_processes, "dpo")
    dropped = f" (and {sets.dropped} with chosen == rejected left out)" if sets.dropped else ""
    announce(accelerator, "dpo", {
        "policy/ref": f"{paths.checkpoint_dir('sft')} (step {parent_meta['step']})",
        "loss": f"{cfg.loss_type} (beta {cfg.beta}" + (f", label_smoothing {cfg.label_smoothing})" if cfg.label_smoothing else ")"),
        "data": sets.source,
        **empty_entry(sets.empty),
        "pairs": train_set.describe() + dropped,
        "grad_accum": grad_accum,
        **epochs_entry("dpo", cfg.max_steps, cfg.micro_batch_size * grad_accum * accelerator.num_processes,
                       len(pairs)),
    })

    slicer = Slicer(cfg.micro_batch_size, grad_accum, accelerator.process_index, accelerator.num_processes)
    step_batch = StepCache(lambda step: step_rows(len(pairs), params.seed, step, slicer.global_rows))

    def pair_loss(pc, pr, rc, rr):
        return dpo_loss(pc, pr, rc.to(pc.device), rr.to(pc.device), cfg.beta, cfg.loss_type, cfg.label_smoothing)

    def next_batch(step, micro):
        chosen = slicer.take(step_batch(step), micro)
        return [pairs[i] for i in chosen], ref_chosen[chosen], ref_rejected[chosen]

    def loss(m, batch):
        chunk, rc, rr = batch
        pc, pr = batch_pair_logps(m, chunk, tok.eot_id)
        value, cr, rj = pair_loss(pc, pr, rc, rr)
        return value, reward_metrics(pc, pr, cr, rj), sum(len(c.ids) + len(r.ids) for c, r in chunk)

    def evaluate(m):
        pc, pr = pair_logps(m, heldout, cfg.micro_batch_size, tok.eot_id)
        value, cr, rj = pair_loss(pc, pr, *held_ref)
        return {"val_loss": value.item(), "val_rewards/accuracies": (cr > rj).float().mean().item(),
                "val_rewards/margins": (cr - rj).mean().item()}

    template = sets.train[0].prompt.template
    meta = stage_meta("dpo", params, ("dpo",), str(paths.checkpoint_dir("sft")), parent_meta, template=template)
    train(policy, Task(next_batch, loss, evaluate), cfg, grad_accum, accelerator, "dpo", meta, tok,
          stage_inputs(parent_meta, *input_files(cfg.data, "dpo.data"), *sorted(paths.REF_LOGPS.glob("*"))))


if __name__ == "__main__":
    run(main)
