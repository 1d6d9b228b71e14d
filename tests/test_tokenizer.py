"""One interface over bpe (trained here), exact gpt2 and char: round trips, ids, fingerprints, files."""
import json

import pytest

from gptlab.config import TokenizerConfig
from gptlab.tokenizer import (
    EOT,
    TokenizerError,
    gpt2_tokenizer,
    load_tokenizer,
    padded_vocab_size,
    train_tokenizer,
)

TEXTS = [
    "Anna Reed was born in Lisbon. Anna Reed works as a baker.",
    "Tom Hale keeps a parrot as a pet. The favourite colour of Tom Hale is green.",
    "3 + 4 = 7. 12 - 5 = 7.",
] * 20
SAMPLE = "Tom Reed was born in Lisbon. 3 + 4 = 7."


def test_gpt2_ids_are_exact():
    tok = gpt2_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot_id == 50256 and tok.n_vocab == 50257
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE


@pytest.mark.parametrize("kind", ["bpe", "gpt2", "char"])
def test_round_trip_and_save_load(kind, tmp_path):
    tok = train_tokenizer(TokenizerConfig(kind=kind, vocab_size=300), TEXTS)
    ids = tok.encode(SAMPLE)
    assert tok.decode(ids) == SAMPLE
    assert max(ids) < tok.n_vocab and tok.eot_id < tok.n_vocab and tok.eot_id not in ids
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again.kind == kind and again.fingerprint == tok.fingerprint and again.encode(SAMPLE) == ids


def test_bpe_learns_merges_and_respects_vocab_size():
    tok = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=330), TEXTS)
    assert tok.n_vocab == 330  # 256 bytes + 73 merges + EOT
    assert len(tok.encode("Anna Reed was born in Lisbon.")) <= 8  # merges make seen words single tokens


def test_eot_text_is_not_the_special_token():
    tok = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), TEXTS)
    assert tok.eot_id not in tok.encode(f"a {EOT} b")


def test_fingerprint_differs_between_tokenizers_and_detects_tampering(tmp_path):
    a = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), TEXTS)
    b = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=280), TEXTS)
    assert a.fingerprint != b.fingerprint
    a.save(tmp_path)
    ranks = (tmp_path / "bpe.tiktoken").read_text().splitlines()
    (tmp_path / "bpe.tiktoken").write_text("\n".join(ranks[:-1]) + "\n")
    with pytest.raises(TokenizerError, match="fingerprint"):
        load_tokenizer(tmp_path)


def test_char_tokenizer_names_unknown_characters():
    tok = train_tokenizer(TokenizerConfig(kind="char"), ["abc"])
    with pytest.raises(TokenizerError, match="'z'"):
        tok.encode("abz")


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(TokenizerError, match="tokenize stage"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"kind": "sentencepiece"}))
    with pytest.raises(TokenizerError, match="unknown kind"):
        load_tokenizer(tmp_path)


def test_padded_vocab():
    assert padded_vocab_size(1039) == 1088 and padded_vocab_size(1024) == 1024 and padded_vocab_size(50257) == 50304
