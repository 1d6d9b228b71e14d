"""The DPO loss family (sigmoid/cDPO, robust, hinge, ipo) against TRL's DPOTrainer and the papers' formulas.

TRL 1.16 has no standalone DPOTrainer.dpo_loss: the loss lives inline in DPOTrainer._compute_loss. We run that
method unbound on a stand-in trainer and a stand-in model whose per-token log-probs sum to our summed log-probs,
with the reference log-probs passed precomputed, so TRL's own code sees the very same tensors.
"""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from gptlab.losses import DPO_LOSS_TYPES, dpo_loss

B = 16
CASES = [  # (loss_type, beta, label_smoothing); TRL/CPO ignore label smoothing for hinge and ipo, we reject it
    ("sigmoid", 0.1, 0.0),
    ("sigmoid", 0.5, 0.0),
    ("sigmoid", 0.1, 0.1),
    ("sigmoid", 1.0, 0.3),
    ("robust", 0.1, 0.0),
    ("robust", 0.1, 0.1),
    ("robust", 0.5, 0.25),
    ("hinge", 0.1, 0.0),
    ("hinge", 1.0, 0.0),
    ("ipo", 0.1, 0.0),
    ("ipo", 0.5, 0.0),
]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def _logps(dtype, seed=0, spread=3.0):
    """Summed response log-probs: reference in [-60, -5], policy = reference + N(0, spread)."""
    g = torch.Generator().manual_seed(seed)
    ref_c, ref_r = (-5 - 55 * torch.rand(B, generator=g, dtype=torch.float64) for _ in range(2))
    pol_c, pol_r = (r + spread * torch.randn(B, generator=g, dtype=torch.float64) for r in (ref_c, ref_r))
    return tuple(t.to(dtype) for t in (pol_c, pol_r, ref_c, ref_r))


# ---------------------------------------------------------------- written-out formulas (plain Python floats)
def _softplus(x: float) -> float:  # -log σ(-x) = log(1 + e^x), stable
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _formula(pc, pr, rc, rr, beta, loss_type, eps):
    """Per-pair losses averaged, z = (π_c - π_r) - (ref_c - ref_r); -log σ(x) = softplus(-x)."""
    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        z = (a - b) - (c - d)
        if loss_type == "sigmoid":  # DPO, Rafailov et al. 2023 Eq. 7; cDPO (Mitchell 2023) for eps > 0
            out.append((1 - eps) * _softplus(-beta * z) + eps * _softplus(beta * z))
        elif loss_type == "robust":  # Chowdhury et al. 2024: [(1-ε)L(y_w,y_l) - εL(y_l,y_w)] / (1-2ε)
            out.append(((1 - eps) * _softplus(-beta * z) - eps * _softplus(beta * z)) / (1 - 2 * eps))
        elif loss_type == "hinge":  # SLiC hinge (Zhao et al. 2023), reference-normalised as in RSO (Liu et al. 2023)
            out.append(max(0.0, 1 - beta * z))
        elif loss_type == "ipo":  # Azar et al. 2023 Eq. 17 (τ = β): (h - 1/(2τ))²
            out.append((z - 1 / (2 * beta)) ** 2)
    return sum(out) / len(out)


# ---------------------------------------------------------------- TRL's own code on identical tensors
@pytest.fixture(scope="module")
def DPOTrainer():
    trl = pytest.importorskip("trl")
    assert trl.__version__ == "1.16.0", "the stand-in below follows trl 1.16.0's DPOTrainer._compute_loss"
    from trl import DPOTrainer

    return DPOTrainer


class _StubModel:
    """Returns fixed outputs: the fields DPOTrainer._compute_loss reads from its fused-LM-head forward."""

    training = True

    def __init__(self, outputs):
        self.outputs = outputs

    def __call__(self, **kwargs):
        return self.outputs


def trl_loss(DPOTrainer, pc, pr, rc, rr, beta, loss_type, eps=0.0, lengths=None):
    """TRL's DPOTrainer._compute_loss on summed log-probs (B,). lengths=(chosen_len, rejected_len) sets the
    completion lengths TRL sees (only 'ipo' uses them); default 1 token each, so nothing is length-averaged.
    Returns (loss, metrics dict of TRL's logged values)."""
    n = pc.shape[0]
    lens = torch.ones(2 * n, dtype=torch.long) if lengths is None else torch.cat(lengths).long()
    T = 1 + int(lens.max())  # position 0 is the prompt, completion tokens at 1..len
    pos = torch.arange(T)
    completion_mask = ((pos >= 1) & (pos <= lens[:, None])).long()  # (2B, T), batch is [chosen, rejected]
    logps = torch.cat([pc, pr])
    # The model's per-token log-probs are 0 outside the completion; put each sequence's whole sum on its first
    # completion token so TRL's sum over positions reproduces our summed log-probs bit for bit (and keeps autograd).
    per_token = torch.cat([logps[:, None], torch.zeros(2 * n, T - 2, dtype=logps.dtype)], dim=1)
    zeros = torch.zeros(2 * n, T - 1)
    model = _StubModel(SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()))
    ident = lambda t: t  # noqa: E731 - single process: gather is the identity
    trainer = SimpleNamespace(
        model=model, ref_model=None, accelerator=SimpleNamespace(device=torch.device("cpu"), gather=ident,
                                                                 gather_for_metrics=ident),
        beta=beta, loss_types=[loss_type], loss_weights=[1.0], label_smoothing=eps, f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5, ld_alpha=None, use_weighting=False, aux_loss_enabled=False,
        precompute_ref_logps=True, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros(2 * n, T, dtype=torch.long), "attention_mask": torch.ones(2 * n, T, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_cdpo_loss(DPOTrainer, pc, pr, rc, rr, beta, eps):
    """TRL 1.16's DPOTrainer 'sigmoid' ignores label_smoothing; its 'aot' branch has the cDPO expression
    -(1-ε) log σ(βδ) - ε log σ(-βδ) on δ = sort(π_c - π_r) - sort(ref_c - ref_r). Run it one pair at a time
    (sorting one element is the identity, so δ = z) and average: TRL's code for cDPO on our tensors."""
    per_pair = [trl_loss(DPOTrainer, pc[i:i + 1], pr[i:i + 1], rc[i:i + 1], rr[i:i + 1], beta, "aot", eps)[0]
                for i in range(pc.shape[0])]
    return torch.stack(per_pair).mean()


# ---------------------------------------------------------------- 1. parity with TRL and the formulas
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_type,beta,eps", CASES)
def test_matches_trl_and_formula(DPOTrainer, loss_type, beta, eps, dtype):
    pc, pr, rc, rr = (t.clone().requires_grad_(i < 2) for i, t in enumerate(_logps(dtype)))
    ours, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps)
    assert ours.dtype == dtype and chosen.dtype == dtype and not chosen.requires_grad
    our_grads = torch.autograd.grad(ours, (pc, pr))

    if loss_type == "sigmoid" and eps > 0:
        theirs = trl_cdpo_loss(DPOTrainer, pc, pr, rc, rr, beta, eps)
        _, metrics = trl_loss(DPOTrainer, pc, pr, rc, rr, beta, loss_type, eps)
    else:
        theirs, metrics = trl_loss(DPOTrainer, pc, pr, rc, rr, beta, loss_type, eps)
    assert theirs.dtype == dtype
    assert_close(ours, theirs, **TOL[dtype])
    for g, h in zip(our_grads, torch.autograd.grad(theirs, (pc, pr))):
        assert_close(g, h, **TOL[dtype])
    # the implicit rewards TRL logs
    assert_close(chosen.mean().item(), metrics["rewards/chosen"], **TOL[dtype])
    assert_close(rejected.mean().item(), metrics["rewards/rejected"], **TOL[dtype])
    assert_close((chosen - rejected).mean().item(), metrics["rewards/margins"], **TOL[dtype])
    assert_close(chosen, beta * (pc - rc).detach(), rtol=0, atol=0)

    expected = _formula(*(t.detach().double() for t in (pc, pr, rc, rr)), beta, loss_type, eps)
    assert_close(ours.item(), expected, **TOL[dtype])


def test_trl_1_16_sigmoid_ignores_label_smoothing_and_ipo_averages_over_tokens(DPOTrainer):
    """The two convention differences to TRL 1.16, pinned so a TRL upgrade that changes them is noticed."""
    pc, pr, rc, rr = _logps(torch.float64, seed=1)
    plain = trl_loss(DPOTrainer, pc, pr, rc, rr, 0.1, "sigmoid", 0.0)[0]
    assert_close(trl_loss(DPOTrainer, pc, pr, rc, rr, 0.1, "sigmoid", 0.2)[0], plain, rtol=0, atol=0)
    assert not torch.allclose(dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", 0.2)[0], plain)  # ours is cDPO

    # TRL's ipo divides each log-ratio by its completion length: equal to ours on length-averaged log-probs.
    g = torch.Generator().manual_seed(2)
    lc, lr = (torch.randint(1, 40, (B,), generator=g) for _ in range(2))
    theirs = trl_loss(DPOTrainer, pc, pr, rc, rr, 0.1, "ipo", lengths=(lc, lr))[0]
    assert_close(dpo_loss(pc / lc, pr / lr, rc / lc, rr / lr, 0.1, "ipo")[0], theirs, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(dpo_loss(pc, pr, rc, rr, 0.1, "ipo")[0], theirs)


# ---------------------------------------------------------------- 2. step 0: policy == reference
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5, 2.0])
def test_step_zero_values(beta, dtype):
    _, _, c, r = _logps(dtype, seed=3)
    for loss_type, eps in [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.4), ("robust", 0.0), ("robust", 0.1),
                           ("robust", 0.45)]:
        loss, chosen, rejected = dpo_loss(c, r, c, r, beta, loss_type, eps)
        assert abs(loss.item() - math.log(2)) < 1e-7, (loss_type, eps, loss.item())
        assert loss.dtype != torch.bfloat16
        assert torch.count_nonzero(chosen) == 0 and torch.count_nonzero(rejected) == 0
        assert torch.count_nonzero(chosen - rejected) == 0  # margins
    assert_close(dpo_loss(c, r, c, r, beta, "ipo")[0].item(), 1 / (4 * beta**2), rtol=1e-6, atol=0)
    assert dpo_loss(c, r, c, r, beta, "hinge")[0].item() == 1.0


# ---------------------------------------------------------------- 3. gradient signs
@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.0), ("robust", 0.2),
                                           ("hinge", 0.0), ("ipo", 0.0)])
def test_raising_chosen_lowers_every_loss(loss_type, eps):
    """At and near step 0 (β z < 1 for hinge, z < 1/(2β) for ipo) descent raises chosen and lowers rejected."""
    beta = 0.1
    for spread in (0.0, 0.5):
        pc, pr, rc, rr = _logps(torch.float32, seed=4, spread=spread)
        pc.requires_grad_(True)
        pr.requires_grad_(True)
        loss = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps)[0]
        loss.backward()
        assert (pc.grad < 0).all() and (pr.grad > 0).all(), (loss_type, spread)
        with torch.no_grad():
            assert dpo_loss(pc + 0.5, pr, rc, rr, beta, loss_type, eps)[0] < loss
            assert dpo_loss(pc, pr - 0.5, rc, rr, beta, loss_type, eps)[0] < loss


# ---------------------------------------------------------------- 4. validation and special cases
def test_bad_loss_type_names_the_choices():
    x = torch.zeros(2)
    with pytest.raises(ValueError) as e:
        dpo_loss(x, x, x, x, 0.1, "kto")
    assert "kto" in str(e.value) and all(name in str(e.value) for name in DPO_LOSS_TYPES)
    assert set(DPO_LOSS_TYPES) == {"sigmoid", "ipo", "hinge", "robust"}


@pytest.mark.parametrize("loss_type,eps", [("robust", 0.5), ("sigmoid", -0.1), ("sigmoid", 0.5), ("ipo", 0.1),
                                           ("hinge", 0.1)])
def test_bad_label_smoothing_raises(loss_type, eps):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, 0.1, loss_type, eps)


def test_bad_beta_raises():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, 0.0, "ipo")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_robust_without_label_smoothing_is_sigmoid(dtype):
    args = _logps(dtype, seed=5, spread=10.0)
    for beta in (0.1, 1.0):
        robust, sigmoid = dpo_loss(*args, beta, "robust", 0.0), dpo_loss(*args, beta, "sigmoid", 0.0)
        for a, b in zip(robust, sigmoid):
            assert_close(a, b, rtol=0, atol=0)


def test_positional_call_is_sigmoid_dpo_and_bf16_is_upcast():
    pc, pr, rc, rr = _logps(torch.float32, seed=6)
    assert_close(dpo_loss(pc, pr, rc, rr, 0.1), dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", 0.0), rtol=0, atol=0)
    half = tuple(t.bfloat16() for t in (pc, pr, rc, rr))
    loss, chosen, rejected = dpo_loss(*half, 0.1, "ipo")
    assert loss.dtype == chosen.dtype == rejected.dtype == torch.float32
    ref = dpo_loss(*(t.float() for t in half), 0.1, "ipo")
    for a, b in zip((loss, chosen, rejected), ref):
        assert_close(a, b, rtol=0, atol=0)
