"""gptlab.sampling: decoding through GPT.forward with and without the cache, the Sampling settings, repetition
penalty, streaming."""
from __future__ import annotations

import pytest
import torch

from gptlab.model import GPT, GPTConfig
from gptlab.sampling import Sampling, SamplingArgError, apply_repetition_penalty, generate, stream

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100)


def make_model(config: GPTConfig = TINY, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def prompts_of(batch: int, length: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (batch, length), generator=gen).tolist()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("length, new", [(3, 10), (5, 30), (20, 6)])  # in the block, past it, a prompt beyond it
def test_greedy_is_the_same_with_and_without_the_cache(batch, length, new):
    model = make_model()
    prompts = prompts_of(batch, length)
    cached = generate(model, prompts, Sampling(new))
    assert cached == generate(model, prompts, Sampling(new), use_cache=False)  # the last block_size tokens anew
    assert all(len(row) == new for row in cached)


def test_generation_follows_changes_to_the_parameters():
    model = make_model()
    prompts = prompts_of(2, 4)
    before = generate(model, prompts, Sampling(8))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)  # in place, as an optimizer step changes them
    after = generate(model, prompts, Sampling(8))
    assert after == generate(model, prompts, Sampling(8), use_cache=False) and after != before
    model.load_state_dict(make_model(seed=0).state_dict())
    assert generate(model, prompts, Sampling(8)) == before


def test_n_vocab_keeps_padding_out():
    model = make_model()
    with torch.no_grad():
        model.transformer.wte.weight[60:] *= 50  # the "padding" ids' logits dwarf the others
    free = generate(model, [[1, 2, 3]], Sampling(8))
    kept = generate(model, [[1, 2, 3]], Sampling(8), n_vocab=60)
    assert max(free[0]) >= 60 and max(kept[0]) < 60


# --- repetition penalty ---------------------------------------------------------------------------------------

def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 0.5, -0.5, 0.0], [2.0, -2.0, 0.5, -0.5, 0.0]])
    seen = torch.tensor([[True, True, False, False, True], [False, False, True, True, False]])
    got = apply_repetition_penalty(logits, seen, 2.0)
    assert got.tolist() == [[1.0, -4.0, 0.5, -0.5, 0.0], [2.0, -2.0, 0.25, -1.0, 0.0]]
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_repetition_penalty_is_transformers_processor():
    logits_process = pytest.importorskip("transformers.generation.logits_process")
    ids = torch.tensor([[3, 1, 3], [0, 4, 2]])
    scores = torch.randn(2, 6)
    seen = torch.zeros(2, 6, dtype=torch.bool).scatter_(1, ids, True)
    theirs = logits_process.RepetitionPenaltyLogitsProcessor(1.7)(ids, scores.clone())
    assert torch.equal(apply_repetition_penalty(scores, seen, 1.7), theirs)


def naive_penalized_greedy(model: GPT, prompt: list[int], n: int, penalty: float) -> list[int]:
    idx = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([idx[-model.config.block_size:]]))[0, -1]
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[idx] = True
            idx.append(int(apply_repetition_penalty(logits[None], seen[None], penalty).argmax()))
    return idx[len(prompt):]


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_penalizes_the_prompt_and_what_it_made(use_cache):
    model = make_model()
    prompts = prompts_of(2, 4)
    got = generate(model, prompts, Sampling(20, repetition_penalty=1.8), use_cache=use_cache)  # past block_size
    assert got == [naive_penalized_greedy(model, p, 20, 1.8) for p in prompts]
    assert got != generate(model, prompts, Sampling(20))


# --- the settings ---------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field, value, rule", [
    ("max_new_tokens", -1, "must be 0 or more"),
    ("temperature", -0.5, "must be 0 (greedy) or a finite number of at least 1e-06"),
    ("temperature", 1e-9, "must be 0 (greedy) or a finite number of at least 1e-06"),
    ("temperature", NAN, "must be 0 (greedy) or a finite number of at least 1e-06"),
    ("temperature", INF, "must be 0 (greedy) or a finite number of at least 1e-06"),
    ("top_k", -1, "must be 0 (off) or positive"),
    ("top_p", 0.0, "must lie in (0, 1]"),
    ("top_p", 1.5, "must lie in (0, 1]"),
    ("top_p", NAN, "must lie in (0, 1]"),
    ("repetition_penalty", 0.0, "must be a finite number above 0 (1 = off)"),
    ("repetition_penalty", -1.0, "must be a finite number above 0 (1 = off)"),
    ("repetition_penalty", NAN, "must be a finite number above 0 (1 = off)"),
    ("repetition_penalty", INF, "must be a finite number above 0 (1 = off)"),
])
def test_settings_out_of_range_are_refused_when_made(field, value, rule):
    with pytest.raises(SamplingArgError) as e:
        Sampling(**{"max_new_tokens": 5, field: value})
    assert (e.value.arg, e.value.rule) == (field, rule)
    assert str(e.value) == f"{field} {rule}, got {value}"


def test_settings_are_frozen_and_greedy_by_default():
    s = Sampling(5)
    assert (s.temperature, s.top_k, s.top_p, s.repetition_penalty, s.stop_id) == (0.0, 0, 1.0, 1.0, None)
    with pytest.raises(AttributeError):
        s.temperature = 1.0
    with pytest.raises(TypeError, match="Sampling"):
        generate(make_model(), [[1, 2]], 5)  # a bare token count is not settings


# --- stream and arguments -------------------------------------------------------------------------------------

def test_stream_yields_step_by_step_and_restores_the_mode_when_left_early():
    model = make_model().train()
    prompts = prompts_of(3, 4)
    full = generate(model, prompts, Sampling(6))
    steps = stream(model, prompts, Sampling(6))
    first = [next(steps) for _ in range(3)]
    assert torch.stack(first, dim=1).tolist() == [row[:3] for row in full]
    assert not model.training  # eval while decoding
    steps.close()
    assert model.training


def test_stream_ends_once_every_row_has_made_the_stop_id():
    model = make_model()
    prompts = prompts_of(2, 4)
    full = generate(model, prompts, Sampling(12))
    stop = full[0][3]
    ends = max(row.index(stop) if stop in row else len(row) - 1 for row in full) + 1
    steps = list(stream(model, prompts, Sampling(12, stop_id=stop)))
    assert torch.stack(steps, dim=1).tolist() == [row[:ends] for row in full]
    assert generate(model, prompts, Sampling(12, stop_id=stop)) == [row[:row.index(stop)] if stop in row else row
                                                                    for row in full]


def test_stream_wants_one_prompt_length_and_seeded_rows_differ():
    model = make_model()
    with pytest.raises(ValueError, match="one length"):
        list(stream(model, [[1, 2], [3]], Sampling(2)))
    rows = [[1, 2, 3]] * 4

    def draw(seed: int) -> list[list[int]]:
        return generate(model, rows, Sampling(10, temperature=1.0), generator=torch.Generator().manual_seed(seed))

    first = draw(7)
    assert first == draw(7) and len({tuple(r) for r in first}) == 4


def test_prompt_ids_outside_the_vocabulary_are_refused():
    model = make_model()
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(model, [[1, TINY.vocab_size]], Sampling(2))
    with pytest.raises(ValueError, match="n_vocab"):
        generate(model, [[1]], Sampling(2), n_vocab=TINY.vocab_size + 1)
