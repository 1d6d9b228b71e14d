"""Invariants of the GPT model and of generation: causality, init, HF parity, KV cache, sampling."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptlab import cpu_head
from gptlab.model import GPT, GPTConfig, from_hf_state_dict, to_hf_state_dict
from gptlab.sampling import Sampling, generate

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100)


def make_model(config: GPTConfig = TINY, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def naive_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with a full forward pass over the last block_size tokens every step."""
    idx = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(idx[:, -model.config.block_size:])  # (1, T, V)
            nxt = logits[0, -1].argmax()
            out.append(int(nxt))
            idx = torch.cat([idx, nxt.view(1, 1)], dim=1)
    return out


# 1. causality


def test_changing_a_token_only_affects_later_positions():
    model = make_model()
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.block_size))
    t = 7
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)  # (B, T, V)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_too_long_input_raises():
    model = make_model()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, TINY.block_size + 1, dtype=torch.long))


# 2. loss at init


def test_loss_at_init_is_close_to_uniform():
    V = 512
    model = make_model(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=V))
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (8, 16), generator=gen)
    targets = torch.randint(0, V, (8, 16), generator=gen)
    with torch.no_grad():
        logits = model(idx)
    loss = F.cross_entropy(logits.view(-1, V), targets.view(-1))
    assert abs(loss.item() - math.log(V)) < 0.1


# 3. init scale and tying


def test_residual_projection_init_is_scaled_by_depth():
    config = GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=16, vocab_size=100)
    model = make_model(config)
    expected = 0.02 / math.sqrt(2 * config.n_layer)
    for block in model.transformer.h:
        for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
            assert abs(w.std().item() - expected) < 0.05 * expected
    # everything else keeps the plain 0.02
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001
    assert model.transformer.h[0].attn.c_attn.bias.abs().max().item() == 0.0


def test_output_head_is_tied_to_token_embedding():
    model = make_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_param_counts_and_flops():
    model = make_model()
    C, V, T, L = TINY.n_embd, TINY.vocab_size, TINY.block_size, TINY.n_layer
    per_block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    total = V * C + T * C + L * per_block + 2 * C
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - T * C
    assert model.flops_per_token() == 6 * (total - T * C) + 12 * L * C * T


# 4. HF parity


def hf_model(config: GPTConfig):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(hf_config).eval()


def load_into_hf(hf, sd):
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    known_buffers = (".attn.bias", ".attn.masked_bias")
    assert [k for k in missing if not k.endswith(known_buffers)] == []
    assert unexpected == []


def test_parameter_names_match_hf():
    hf = hf_model(TINY)
    ours = make_model()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in hf.named_parameters()]


def test_ours_to_hf_gives_same_logits():
    hf = hf_model(TINY)
    ours = make_model()
    load_into_hf(hf, to_hf_state_dict(ours))
    idx = torch.randint(0, TINY.vocab_size, (3, TINY.block_size))
    with torch.no_grad():
        expected = ours(idx)
        got = hf(idx).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_hf_to_ours_gives_same_logits():
    torch.manual_seed(3)
    hf = hf_model(TINY)
    ours = from_hf_state_dict(hf.state_dict(), TINY).eval()
    assert ours.lm_head.weight is ours.transformer.wte.weight
    idx = torch.randint(0, TINY.vocab_size, (3, 10))
    with torch.no_grad():
        assert torch.allclose(ours(idx), hf(idx).logits, atol=1e-5)


def test_hf_round_trip_is_exact():
    ours = make_model()
    back = from_hf_state_dict(to_hf_state_dict(ours), TINY)
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


# 5. KV cache


def test_incremental_decoding_matches_full_forward():
    model = make_model()
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.block_size))
    cache = model.new_cache()
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        steps = [model(idx[:, t:t + 1], cache) for t in range(TINY.block_size)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert cache.pos == TINY.block_size


def test_cached_chunks_longer_than_one_token_stay_causal():
    model = make_model()
    idx = torch.randint(0, TINY.vocab_size, (2, 12))
    cache = model.new_cache()
    with torch.no_grad():
        full = model(idx)
        parts = [model(idx[:, :5], cache), model(idx[:, 5:9], cache), model(idx[:, 9:], cache)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_last_only_gives_the_last_positions_logits(batch):
    model = make_model()
    idx = torch.randint(0, TINY.vocab_size, (batch, 10))
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        last = model(idx, last_only=True)  # (B, 1, V)
        cache = model.new_cache()
        prefill = model(idx[:, :6], cache, last_only=True)
        steps = [model(idx[:, t:t + 1], cache, last_only=True) for t in range(6, 10)]
    assert last.shape == (batch, 1, TINY.vocab_size)
    assert torch.allclose(last, full[:, -1:], atol=1e-5)
    assert torch.allclose(prefill, full[:, 5:6], atol=1e-5)
    assert torch.allclose(torch.cat(steps, dim=1), full[:, 6:], atol=1e-5)


def test_cache_overflow_raises():
    model = make_model()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.zeros(1, TINY.block_size, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="block_size"):
            model(torch.zeros(1, 1, dtype=torch.long), cache)


def test_batched_greedy_generate_matches_naive_loop():
    model = make_model()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8], [9], [10, 11, 12, 13, 14]]
    got = generate(model, prompts, Sampling(6))
    assert got == [naive_greedy(model, p, 6) for p in prompts]


def test_generate_truncates_before_stop_id():
    model = make_model()
    prompts = [[1, 2, 3], [4, 5]]
    full = generate(model, prompts, Sampling(8))
    stop = full[0][2]
    got = generate(model, prompts, Sampling(8, stop_id=stop))
    assert got[0] == full[0][: full[0].index(stop)]
    expected_1 = full[1][: full[1].index(stop)] if stop in full[1] else full[1]
    assert got[1] == expected_1
    assert all(stop not in row for row in got)


def test_generate_past_block_size_matches_cropped_naive_loop():
    model = make_model()
    prompts = [list(range(1, 14)), list(range(20, 40)), [3, 4]]  # 13, 20 (> block_size) and 2 tokens
    got = generate(model, prompts, Sampling(10))
    assert got == [naive_greedy(model, p, 10) for p in prompts]


def test_generate_rejects_empty_prompt_and_restores_mode():
    model = make_model().train()
    with pytest.raises(ValueError, match="prompt"):
        generate(model, [[1], []], Sampling(2))
    generate(model, [[1, 2]], Sampling(2))
    assert model.training


# 6. sampling


def test_top_k_one_equals_greedy():
    model = make_model()
    prompts = [[1, 2, 3], [4, 5]]
    greedy = generate(model, prompts, Sampling(6))
    assert generate(model, prompts, Sampling(6, temperature=1.0, top_k=1)) == greedy


def test_tiny_top_p_equals_greedy():
    model = make_model()
    prompts = [[1, 2, 3], [4, 5]]
    greedy = generate(model, prompts, Sampling(6))
    assert generate(model, prompts, Sampling(6, temperature=1.0, top_p=1e-6)) == greedy


def test_seeded_sampling_is_reproducible_and_random():
    model = make_model()
    prompts = [[1, 2, 3], [4, 5]] * 4

    def sample(seed):
        gen = torch.Generator().manual_seed(seed)
        return generate(model, prompts, Sampling(8, temperature=1.5), generator=gen)

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)


# 7. bias and dropout


def test_no_bias_config_has_no_bias_parameters():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, bias=False)
    model = make_model(config)
    assert not any(name.endswith(".bias") for name, _ in model.named_parameters())
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 100)


def test_dropout_is_stochastic_in_train_and_deterministic_in_eval():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, dropout=0.2)
    model = make_model(config)
    idx = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        model.train()
        assert not torch.allclose(model(idx), model(idx))
        model.eval()
        assert torch.equal(model(idx), model(idx))


class PaddingLover(GPT):
    """A GPT whose vocabulary padding (ids 50..63) is by far the most likely."""

    def forward(self, idx, cache=None, segments=None, last_only=False):
        logits = super().forward(idx, cache, segments, last_only)
        logits[..., 50:] += 100.0
        return logits


def test_generate_never_picks_vocabulary_padding():
    torch.manual_seed(0)
    model = PaddingLover(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64))
    assert min(generate(model, [[1, 2, 3]], Sampling(8))[0]) >= 50  # unrestricted, padding wins
    for temperature in (0.0, 1.0):
        out = generate(model, [[1, 2, 3]], Sampling(8, temperature=temperature), n_vocab=50,
                       generator=torch.Generator().manual_seed(0))
        assert max(out[0]) < 50


# 8. the CPU output head (gptlab.cpu_head): nn.Linear's values, memory kept between steps

HEAD_C, HEAD_V = 16, 8192
HEAD_ROWS = (4, 256)  # 4 x 256 x 8192 fp32 logits = 32 MiB, the size from which the head keeps their memory


@pytest.fixture
def fresh_buffers(monkeypatch):
    monkeypatch.setattr(cpu_head, "BUFFERS", cpu_head._Buffers())
    return cpu_head.BUFFERS


def heads(seed: int = 0) -> tuple[cpu_head.OutputHead, torch.nn.Linear]:
    torch.manual_seed(seed)
    ours = cpu_head.OutputHead(HEAD_C, HEAD_V, bias=False)
    plain = torch.nn.Linear(HEAD_C, HEAD_V, bias=False)
    plain.weight = torch.nn.Parameter(ours.weight.detach().clone())
    return ours, plain


def test_output_head_gives_nn_linears_logits_and_gradients_bitwise(fresh_buffers):
    ours, plain = heads()
    for seed in range(3):  # the second and third calls write into kept memory
        x = torch.randn(*HEAD_ROWS, HEAD_C, generator=torch.Generator().manual_seed(seed))
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), plain(xb)
        assert torch.equal(ya, yb)
        g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(10 + seed))
        ya.backward(g)
        yb.backward(g)
        assert torch.equal(xa.grad, xb.grad) and torch.equal(ours.weight.grad, plain.weight.grad)
        ours.weight.grad = plain.weight.grad = None
        del ya, yb
    assert len(fresh_buffers.buffers) == 1  # no logits outlived their call: one buffer served every call


def test_training_with_the_output_head_is_bitwise_training_with_nn_linear(fresh_buffers):
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=HEAD_V)

    def train(plain_head: bool) -> dict[str, torch.Tensor]:
        model = make_model(config).train()
        if plain_head:
            head = torch.nn.Linear(config.n_embd, config.vocab_size, bias=False)
            head.weight = model.transformer.wte.weight  # tied, as GPT ties it
            model.lm_head = head
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            idx, targets = torch.randint(0, HEAD_V, (2, 16, 64), generator=gen)  # 16 x 64 x 8192 fp32 = 32 MiB
            loss = F.cross_entropy(model(idx).view(-1, HEAD_V), targets.view(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model.state_dict()

    ours, plain = train(plain_head=False), train(plain_head=True)
    assert isinstance(make_model(config).lm_head, cpu_head.OutputHead) and fresh_buffers.buffers
    assert all(torch.equal(ours[k], plain[k]) for k in plain)


def test_output_head_reuses_memory_only_once_nothing_holds_the_logits(fresh_buffers):
    ours, plain = heads()
    x = [torch.randn(*HEAD_ROWS, HEAD_C, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    with torch.no_grad():
        first = ours(x[0]).data_ptr()
        assert ours(x[1]).data_ptr() == first  # the last logits are gone: their memory again
        held = ours(x[2])
        view = ours(x[3])[0, :3]  # only a view of these is left
        both_kept = ours(x[4])  # both buffers in use: fresh memory, as nn.Linear's
        assert len({held.data_ptr(), view.data_ptr(), both_kept.data_ptr()}) == 3
        assert torch.equal(held, plain(x[2])) and torch.equal(view, plain(x[3])[0, :3])
        del held, both_kept
        assert ours(x[5]).data_ptr() == first  # the held logits are gone now
        assert torch.equal(view, plain(x[3])[0, :3])  # and the view's memory was left alone


def test_output_head_leaves_logits_autograd_saved_alone(fresh_buffers):
    ours, plain = heads()
    x = torch.randn(*HEAD_ROWS, HEAD_C)
    loss = (ours(x) ** 2).sum()  # pow saves the logits for its backward; no Python name holds them
    with torch.no_grad():
        ours(torch.randn(*HEAD_ROWS, HEAD_C))
        ours(torch.randn(*HEAD_ROWS, HEAD_C))
    loss.backward()
    (plain(x) ** 2).sum().backward()
    assert torch.equal(ours.weight.grad, plain.weight.grad)
