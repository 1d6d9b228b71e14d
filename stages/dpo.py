"""dpo: direct preference optimisation of the sft model against a frozen copy of itself (the reference).

Sigmoid loss on response log-probs summed over tokens. The reference never changes, so its log-probs are
computed once up front instead of in every step (the same result, half the forward passes).
"""
from __future__ import annotations

import copy

import torch

from gptlab import paths
from gptlab.data.formats import encode_pairs
from gptlab.data.loader import Slicer, StepCache, step_rows
from gptlab.data.records import read_prefs
from gptlab.evaluation import batch_pair_logps, pair_logps
from gptlab.losses import dpo_loss
from gptlab.stage import announce, inherit, run, stage_inputs, stage_meta, start
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
    policy, parent_meta, tok = inherit("dpo", "sft", accelerator.device)
    ref = copy.deepcopy(policy).requires_grad_(False).eval()  # frozen sft copy, before any update
    T = policy.config.block_size
    rows, dropped = read_prefs(paths.PREFS_TRAIN)  # pairs with chosen == rejected teach nothing: dropped
    pairs = encode_pairs(tok, rows, T, str(paths.PREFS_TRAIN))
    heldout = encode_pairs(tok, read_prefs(paths.PREFS_HELDOUT)[0], T, str(paths.PREFS_HELDOUT))
    heldout = heldout[: cfg.eval_batches * cfg.micro_batch_size]
    ref_chosen, ref_rejected = pair_logps(ref, pairs, cfg.micro_batch_size, tok.eot_id)
    held_ref = pair_logps(ref, heldout, cfg.micro_batch_size, tok.eot_id)
    del ref
    # two sequences (chosen, rejected) per pair: tokens_per_step counts both
    grad_accum = cfg.grad_accum_steps(2 * T, accelerator.num_processes, "dpo")
    announce(accelerator, "dpo", {
        "policy/ref": f"{paths.checkpoint_dir('sft')} (step {parent_meta['step']})",
        "beta": cfg.beta,
        "pairs": f"{len(pairs)}" + (f" ({dropped} with chosen == rejected dropped)" if dropped else ""),
        "grad_accum": grad_accum,
        "epochs": f"{cfg.max_steps * cfg.tokens_per_step / (2 * T) / len(pairs):.1f}",
    })

    slicer = Slicer(cfg.micro_batch_size, grad_accum, accelerator.process_index, accelerator.num_processes)
    step_batch = StepCache(lambda step: step_rows(len(pairs), params.seed, step, slicer.global_rows))

    def next_batch(step, micro):
        chosen = slicer.take(step_batch(step), micro)
        return [pairs[i] for i in chosen], ref_chosen[chosen], ref_rejected[chosen]

    def loss(m, batch):
        chunk, rc, rr = batch
        pc, pr = batch_pair_logps(m, chunk, tok.eot_id)
        value, cr, rj = dpo_loss(pc, pr, rc.to(pc.device), rr.to(pc.device), cfg.beta)
        return value, reward_metrics(pc, pr, cr, rj), 2 * sum(len(c.ids) for c, _ in chunk)

    def evaluate(m):
        pc, pr = pair_logps(m, heldout, cfg.micro_batch_size, tok.eot_id)
        value, cr, rj = dpo_loss(pc, pr, held_ref[0], held_ref[1], cfg.beta)
        return {"val_loss": value.item(), "val_rewards/accuracies": (cr > rj).float().mean().item()}

    meta = stage_meta("dpo", params, ("dpo",), parent="sft")
    train(policy, Task(next_batch, loss, evaluate), cfg, grad_accum, accelerator, "dpo", meta, tok,
          stage_inputs(parent_meta, paths.PREFS_TRAIN, paths.PREFS_HELDOUT))


if __name__ == "__main__":
    run(main)
