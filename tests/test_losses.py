"""Loss functions: masking, sequence log-probs, and the DPO loss family's fixed points."""
import math

import torch

from gptlab.losses import IGNORE, dpo_loss, sequence_logps, token_loss


def test_token_loss_ignores_masked_positions():
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, IGNORE, 2], [IGNORE, IGNORE, 4]])
    manual = -torch.stack([logits[0, 0].log_softmax(-1)[1], logits[0, 2].log_softmax(-1)[2], logits[1, 2].log_softmax(-1)[4]]).mean()
    assert torch.allclose(token_loss(logits, targets), manual)


def test_sequence_logps_sum_response_tokens():
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, IGNORE, 2], [IGNORE, IGNORE, 4]])
    lp = logits.log_softmax(-1)
    expected = torch.stack([lp[0, 0, 1] + lp[0, 2, 2], lp[1, 2, 4]])
    assert torch.allclose(sequence_logps(logits, targets), expected)


def test_dpo_loss_is_ln2_when_policy_equals_reference():
    logps = torch.randn(8)
    other = torch.randn(8)
    loss, chosen, rejected = dpo_loss(logps, other, logps, other, beta=0.1)
    assert abs(loss.item() - math.log(2)) < 1e-6
    assert torch.count_nonzero(chosen) == 0 and torch.count_nonzero(rejected) == 0


def test_dpo_loss_falls_when_chosen_gains_and_gradient_points_that_way():
    ref_c, ref_r = torch.zeros(4), torch.zeros(4)
    pol_c = torch.zeros(4, requires_grad=True)
    pol_r = torch.zeros(4, requires_grad=True)
    loss, _, _ = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.5)
    loss.backward()
    assert (pol_c.grad < 0).all() and (pol_r.grad > 0).all()  # descent raises chosen, lowers rejected
    better, chosen_r, rejected_r = dpo_loss(torch.ones(4), -torch.ones(4), ref_c, ref_r, beta=0.5)
    assert better.item() < math.log(2)
    assert torch.allclose(chosen_r, torch.full((4,), 0.5)) and torch.allclose(rejected_r, torch.full((4,), -0.5))
