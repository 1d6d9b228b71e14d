"""Token shards and the prompt/response format with its loss mask."""
import numpy as np
import pytest
import torch

from gptlab.config import GptlabError, TokenizerConfig
from gptlab.data.formats import (
    Conversation,
    Message,
    collate,
    encode_conversations,
    encode_segments,
    format_prompt,
    segments,
)
from gptlab.data.shards import HEADER_BYTES, ShardError, read_shard, write_shard
from gptlab.losses import IGNORE
from gptlab.tokenizer import train_tokenizer


def test_shard_round_trip_with_eot_between_documents(tmp_path):
    docs = [[1, 2, 3], [4, 5], [6]]
    n = write_shard(tmp_path / "s.bin", docs, eot_id=9, n_vocab=10, fingerprint="abc")
    shard = read_shard(tmp_path / "s.bin")
    assert n == 9 and shard.fingerprint == "abc" and shard.tokens.dtype == np.uint16
    assert shard.tokens.tolist() == [1, 2, 3, 9, 4, 5, 9, 6, 9]
    assert (tmp_path / "s.bin").stat().st_size == HEADER_BYTES + 2 * 9
    assert not list(tmp_path.glob(".*tmp*"))  # the temp file was renamed away


def test_large_vocab_uses_uint32(tmp_path):
    write_shard(tmp_path / "s.bin", [[70000]], eot_id=70001, n_vocab=70002, fingerprint="x")
    assert read_shard(tmp_path / "s.bin").tokens.tolist() == [70000, 70001]


def test_shard_errors(tmp_path):
    with pytest.raises(ShardError, match="out of range"):
        write_shard(tmp_path / "s.bin", [[12]], eot_id=9, n_vocab=10, fingerprint="x")
    assert not (tmp_path / "s.bin").exists()
    (tmp_path / "bad.bin").write_bytes(b"nonsense" * 40)
    with pytest.raises(ShardError, match="bad magic"):
        read_shard(tmp_path / "bad.bin")
    with pytest.raises(ShardError, match="tokenize stage"):
        read_shard(tmp_path / "missing.bin")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TokenizerConfig(kind="char"), [format_prompt("Where was Anna born?") + " Lisbon. 0123456789"])


def qa(question: str, response: str) -> Conversation:
    return Conversation("question", (Message("user", question), Message("assistant", response)))


def encode_example(tok, question: str, response: str):
    return encode_segments(tok, segments(qa(question, response)))


def test_loss_mask_covers_response_and_eot_only(tok):
    ex = encode_example(tok, "Where was Anna born?", " Lisbon.")
    idx, targets, _ = collate([ex, encode_example(tok, "Where?", " Lis.")], pad_id=tok.eot_id)
    assert idx.shape == targets.shape == (2, len(ex.ids) - 1)
    supervised = targets[0][targets[0] != IGNORE].tolist()
    assert tok.decode(supervised[:-1]) == " Lisbon." and supervised[-1] == tok.eot_id
    # targets are the inputs shifted by one wherever they are supervised
    pos = (targets[0] != IGNORE).nonzero().squeeze(-1)
    assert torch.equal(targets[0, pos[:-1]], idx[0, pos[:-1] + 1])
    # the shorter row is padded with IGNORE targets
    assert (targets[1] != IGNORE).sum().item() == len(" Lis.") + 1


def test_truncation_cuts_the_prompt_from_the_left_then_the_response_and_drops_examples_left_without_one(tok):
    convs = [qa("Where was Anna born?", " Lisbon."), qa("Where?", " Lis.")]
    whole = [encode_example(tok, "Where was Anna born?", " Lisbon."), encode_example(tok, "Where?", " Lis.")]
    n_response = [e.n_loss for e in whole]  # response + EOT
    # max_prompt_tokens 5: each prompt keeps its last 5 tokens, the responses stay whole
    enc = encode_conversations(tok, convs, block_size=40, max_prompt_tokens=5, where="sft.jsonl")
    assert enc.cut == 2 and enc.dropped == 0
    for e, w, n in zip(enc.items, whole, n_response):
        assert e.ids.tolist() == w.ids[-(5 + n):].tolist() and e.n_prompt == 5 and e.n_loss == n
    # block_size 6 (7 tokens): 5 prompt tokens, then the response is cut to the 2 that fit
    enc = encode_conversations(tok, convs, block_size=6, max_prompt_tokens=5, where="sft.jsonl")
    assert [e.ids.tolist() for e in enc.items] == [w.ids[w.n_prompt - 5 : w.n_prompt + 2].tolist() for w in whole]
    assert all(e.n_loss == 2 for e in enc.items)
    # no cap: a prompt longer than the context fills it and leaves no response token: dropped, and counted
    assert len(whole[0].ids) > 41 > whole[0].n_prompt and len(whole[1].ids) <= 41
    enc = encode_conversations(tok, convs, block_size=40, max_prompt_tokens=0, where="sft.jsonl")
    assert enc.dropped == 0 and enc.cut == 1  # the first keeps its whole prompt and part of the response
    assert enc.items[0].ids.tolist() == whole[0].ids[:41].tolist()
    enc = encode_conversations(tok, [qa("Where was Anna born? " * 2, " Lisbon."), convs[1]], block_size=30,
                               max_prompt_tokens=0, where="sft.jsonl")
    assert enc.dropped == 1 and enc.cut == 0 and enc.items[0].ids.tolist() == whole[1].ids.tolist()
    assert "1 dropped with no response token left" in enc.describe()
    with pytest.raises(GptlabError, match="all 2 examples lost every response token.*model.block_size=3"):
        encode_conversations(tok, convs, block_size=3, max_prompt_tokens=0, where="sft.jsonl")
