"""The evaluate stage's measurements on models whose answers are known by construction: a uniform model (every
token has log-prob -ln V) makes the two multiple-choice conventions, bits per byte and the standard errors
plain arithmetic."""
import math
import types

import numpy as np
import pytest
import torch

from gptlab.config import TokenizerConfig
from gptlab.data.loader import Windows
from gptlab.evaluation import (
    binomial_stderr,
    lmeval_preprocess,
    mc_requests,
    multiple_choice_conventions,
    normalize_answer,
    token_metrics,
)
from gptlab.tokenizer import gpt2_tokenizer, train_tokenizer


class Uniform(torch.nn.Module):
    """Every next token equally likely: log p = -ln V everywhere."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a parameter, so device_of() works

    def forward(self, idx, **_):
        return torch.zeros(*idx.shape, self.vocab)


# A hand-made HellaSwag-schema file. The uniform model scores a continuation -n_tokens * ln V, so:
# acc (both conventions) picks the ending with the fewest tokens; lm-eval's acc_norm the fewest tokens per
# character; llm.c's acc_norm (mean loss per token) sees a tie everywhere and takes the first ending.
ITEMS = [
    {"activity_label": "Cooking", "ctx_a": "A man stirs a pot.", "ctx_b": "he", "ctx": "A man stirs a pot. he",
     "endings": ["tastes the soup with a wooden spoon.", "xq zv kj wp.", "stops.", "laughs and laughs and laughs."],
     "label": "2"},
    {"activity_label": "Running", "ctx_a": "A woman ties her shoes.", "ctx_b": "she", "ctx": "A woman ties her shoes. she",
     "endings": ["qz.", "runs down the road.", "jumps over the fence and keeps running.", "zzq qqz."],
     "label": "1"},
]


def expected(tok, convention):
    acc = acc_norm = 0
    for item in ITEMS:
        context, conts, chars = mc_requests(item, convention)
        n = np.array([len(tok.encode(context + c)) - len(tok.encode(context)) for c in conts], dtype=float)
        acc += int(np.argmin(n)) == int(item["label"])
        norm = -n / np.array(chars) if convention == "lmeval" else -np.ones_like(n)
        acc_norm += int(np.argmax(norm)) == int(item["label"])
    return acc / len(ITEMS), acc_norm / len(ITEMS)


def test_both_multiple_choice_conventions_on_a_hand_made_file():
    tok = gpt2_tokenizer()
    got = multiple_choice_conventions(Uniform(tok.n_vocab), tok, ITEMS, micro_batch_size=3)
    # by construction: item 1's fewest tokens is "stops." (2), its best chars-per-token is the longest English
    # ending; llm.c's normalised score ties, so it answers 0 for both
    assert got["mc_llmc"]["acc_norm"] == 0.0
    for convention in ("lmeval", "llmc"):
        acc, acc_norm = expected(tok, convention)
        assert got[f"mc_{convention}"]["acc"] == acc and got[f"mc_{convention}"]["acc_norm"] == acc_norm
    assert got["mc_lmeval"]["acc"] == 0.5  # "stops." wins item 1 (label 2); "qz." wins item 2 (label 1): wrong
    assert got["mc_lmeval"]["acc_stderr"] == pytest.approx(math.sqrt(0.25 / 1))


def test_lmeval_preprocessing_and_context_follow_the_harness():
    item = {"activity_label": "Home and Garden", "ctx_a": "[header] How to plant a tree. [title] Dig a hole.",
            "ctx_b": "then", "ctx": "unused", "endings": ["water  it [step] well.", " add soil."], "label": 0}
    context, conts, chars = mc_requests(item, "lmeval")
    assert context == "Home and Garden: How to plant a tree.. Dig a hole. Then"
    assert conts == [" water it well.", " add soil."] and chars == [len("water it well."), len("add soil.")]
    context, conts, _ = mc_requests(item, "llmc")
    assert context == "unused" and conts == [" water  it [step] well.", " add soil."]
    assert lmeval_preprocess(" a [title] b ") == "a. b"


def test_bits_per_byte_and_token_accuracy_of_a_uniform_model():
    tok = train_tokenizer(TokenizerConfig(kind="char"), ["abcdefgh"])  # one byte per character
    ids = np.array([0, 1, 2, 3, tok.eot_id, 4, 5, 6, 7, tok.eot_id] * 20, dtype=np.uint16)
    windows = Windows([types.SimpleNamespace(tokens=ids)], 8)
    got = token_metrics(Uniform(tok.n_vocab), windows, n_batches=2, micro_batch_size=4, token_bytes=tok.token_bytes())
    assert got["val_loss"] == pytest.approx(math.log(tok.n_vocab), rel=1e-6)
    assert got["bits_per_byte"] == pytest.approx(math.log2(tok.n_vocab), rel=1e-6)  # EOT: in neither sum


class Ranked(Uniform):
    """Prefers ids in a fixed order: 0 first, then 1, 2, ... (so top-k holds ids 0..k-1)."""

    def forward(self, idx, **_):
        return -torch.arange(self.vocab, dtype=torch.float).expand(*idx.shape, self.vocab)


def test_top1_and_top5_accuracy_count_the_targets_in_the_best_k():
    tok = train_tokenizer(TokenizerConfig(kind="char"), ["abcdefgh"])
    ids = np.array([0, 1, 2, 3, 4, 5, 6, 7, tok.eot_id] * 20, dtype=np.uint16)
    windows = Windows([types.SimpleNamespace(tokens=ids)], 8)
    got = token_metrics(Ranked(tok.n_vocab), windows, n_batches=2, micro_batch_size=4, token_bytes=tok.token_bytes())
    targets = windows.rows(windows.fixed(8))[:, 1:].ravel()
    assert got["top1_acc"] == pytest.approx(np.mean(targets == 0))
    assert got["top5_acc"] == pytest.approx(np.mean(targets < 5))
    assert got["top1_acc_stderr"] == pytest.approx(binomial_stderr(int(np.sum(targets == 0)), len(targets)))


def test_binomial_stderr():
    assert binomial_stderr(50, 100) == pytest.approx(math.sqrt(0.25 / 99))
    assert binomial_stderr(0, 10) == 0.0 and math.isnan(binomial_stderr(1, 1))


def test_hellaswag_items_through_the_hub_loading_code_on_a_local_copy(tmp_path):
    """evaluate.mc_path goes through datasets.load_dataset(path, name, split, revision), as Rowan/hellaswag
    would; a local folder laid out like that repo (labels as strings, as the hub stores them) runs offline."""
    import json

    from gptlab.config import GptlabError
    from gptlab.data.finetune import hub_mc_items

    repo = tmp_path / "hellaswag"
    repo.mkdir()
    rows = [{**{k: v for k, v in item.items()}, "ind": i, "split": "val"} for i, item in enumerate(ITEMS)]
    (repo / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (repo / "test.jsonl").write_text("".join(json.dumps({**r, "label": ""}) + "\n" for r in rows))
    items = hub_mc_items(str(repo), "", "validation", "")
    assert [i["label"] for i in items] == [2, 1] and items[0]["activity_label"] == "Cooking"
    tok = gpt2_tokenizer()
    got = multiple_choice_conventions(Uniform(tok.n_vocab), tok, items, micro_batch_size=4)
    assert got["mc_lmeval"]["acc"] == expected(tok, "lmeval")[0]
    with pytest.raises(GptlabError, match=r"split test record 1: field 'label' is '', .*use the validation split"):
        hub_mc_items(str(repo), "", "test", "")


@pytest.mark.parametrize("answer,reference,same", [
    (" Paris.", "Paris", True),
    ("the  Eiffel tower!", "Eiffel Tower", True),
    ("An apple", "apple.", True),
    ("Paris, France", "Paris", False),
    ("42", "4 2", False),
])
def test_exact_match_normalises_case_punctuation_articles_and_spaces_only(answer, reference, same):
    assert (normalize_answer(answer) == normalize_answer(reference)) is same
