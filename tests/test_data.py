"""Token shards and the prompt/response format with its loss mask."""
import numpy as np
import pytest
import torch

from gptlab.config import GptlabError, TokenizerConfig
from gptlab.data.formats import collate, encode_example, encode_examples, format_prompt
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


def test_loss_mask_covers_response_and_eot_only(tok):
    ex = encode_example(tok, "Where was Anna born?", " Lisbon.")
    idx, targets = collate([ex, encode_example(tok, "Where?", " Lis.")], pad_id=tok.eot_id)
    assert idx.shape == targets.shape == (2, len(ex.ids) - 1)
    supervised = targets[0][targets[0] != IGNORE].tolist()
    assert tok.decode(supervised[:-1]) == " Lisbon." and supervised[-1] == tok.eot_id
    # targets are the inputs shifted by one wherever they are supervised
    pos = (targets[0] != IGNORE).nonzero().squeeze(-1)
    assert torch.equal(targets[0, pos[:-1]], idx[0, pos[:-1] + 1])
    # the shorter row is padded with IGNORE targets
    assert (targets[1] != IGNORE).sum().item() == len(" Lis.") + 1


def test_too_long_examples_are_an_error_naming_block_size(tok):
    rows = [{"question": "Where was Anna born?", "response": " Lisbon."}]
    with pytest.raises(GptlabError, match="model.block_size=8"):
        encode_examples(tok, rows, block_size=8, where="sft.jsonl")
