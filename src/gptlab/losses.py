"""Small pure loss functions. Targets use -1 for positions that carry no loss (prompt, padding)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gptlab.config import DPO_LOSS_TYPES, SMOOTHED_LOSS_TYPES  # TRL's DPOConfig.loss_type names

IGNORE = -1


def token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over positions whose target is not IGNORE (their mean, or with reduction="sum" their
    sum). logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction=reduction)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over each row's non-IGNORE positions: (B, T, V), (B, T) -> (B,)."""
    mask = targets != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked * mask).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairwise preference losses on summed response log-probs, averaged over pairs.

    Inputs have shape (B,). With z = (π_c - π_r) - (ref_c - ref_r) and ε = label_smoothing, per pair:

    - "sigmoid": DPO (Rafailov et al. 2023, arXiv:2305.18290), -log σ(βz); with ε > 0 the conservative DPO of
      Mitchell 2023 ("A note on DPO with noisy preferences"): -(1-ε) log σ(βz) - ε log σ(-βz).
    - "robust": robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", arXiv:2403.00409), an unbiased loss under
      label-flip rate ε: [-(1-ε) log σ(βz) + ε log σ(-βz)] / (1-2ε). Equals "sigmoid" at ε = 0.
    - "hinge": SLiC's hinge (Zhao et al. 2023, arXiv:2305.10425: max(0, δ - log π_c + log π_r), no reference) in
      the reference-normalised form of RSO (Liu et al. 2023, arXiv:2309.06657) that TRL uses: max(0, 1 - βz).
    - "ipo": IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17, β plays τ): (z - 1/(2β))².

    These are TRL's DPOTrainer formulas. One convention differs: TRL divides the log-ratios by the completion
    length for "ipo" (token-averaged log-probs); here every type takes the caller's summed log-probs. TRL 1.16's
    DPOTrainer also ignores label_smoothing for "sigmoid" (older TRL applied cDPO there, as we do).

    Computed in at least float32 (bf16/fp16 inputs are upcast). Returns (loss, chosen_rewards, rejected_rewards),
    rewards β(π - ref) detached: the implicit rewards TRL logs as rewards/chosen and rewards/rejected. When
    policy == ref: sigmoid/robust give ln 2, hinge 1, ipo 1/(4β²).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")
    eps = float(label_smoothing)
    if loss_type in SMOOTHED_LOSS_TYPES and not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing for {loss_type!r} must lie in [0, 0.5), got {label_smoothing}")
    if loss_type not in SMOOTHED_LOSS_TYPES and eps != 0.0:
        raise ValueError(f"label_smoothing is not defined for {loss_type!r}; it must be 0, got {label_smoothing}")

    dtype = torch.float32
    for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected):
        dtype = torch.promote_types(dtype, t.dtype)
    pc, pr, rc, rr = (t.to(dtype) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))

    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - eps) + F.logsigmoid(-beta * logits) * eps) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:  # ipo
        losses = (logits - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (pc - rc).detach()
    rejected_rewards = beta * (pr - rr).detach()
    return losses.mean(), chosen_rewards, rejected_rewards
