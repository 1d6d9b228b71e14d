"""Every damaged pipeline file is a GptlabError naming the file (and line) and the fix, never a traceback
or a silent wrong result: shards, info.json, the jsonl sets, tokenizer folders."""
import json
import re

import numpy as np
import pytest

from gptlab.config import GptlabError, TokenizerConfig
from gptlab.data.formats import Conversation, Message, collate, encode_conversations, encode_pairs
from gptlab.data.records import INFO_FIELDS, read_mc, read_prefs, read_questions, read_sft
from gptlab.data.shards import HEADER_BYTES, MAGIC, ShardError, read_shard, write_shard
from gptlab.fileio import read_json, read_jsonl
from gptlab.tokenizer import (
    GPT2_PATTERN,
    RUSTBPE_PATTERN,
    CharTokenizer,
    TokenizerError,
    load_tokenizer,
    train_tokenizer,
)

FIX = r"dvc repro tokenize"


def raises(path, match: str, error=GptlabError):
    """pytest.raises for an error whose one-line message starts with `path` and ends with the fix."""
    return pytest.raises(error, match=rf"^{re.escape(str(path))}.*{match}.*{FIX}[^\n]*$")


# --- shards -----------------------------------------------------------------------------------------------

def shard_with(tmp_path, meta: dict, n_ids: int, itemsize: int = 2):
    path = tmp_path / "s.bin"
    header = MAGIC + json.dumps(meta).encode().ljust(HEADER_BYTES - len(MAGIC), b" ")
    path.write_bytes(header + b"\0" * (n_ids * itemsize))
    return path


GOOD = {"dtype": "uint16", "n_tokens": 3, "fingerprint": "abc"}


@pytest.mark.parametrize("meta, n_ids, match", [
    ({**GOOD, "dtype": "float64"}, 3, "dtype 'float64' is not one of"),
    ({k: v for k, v in GOOD.items() if k != "n_tokens"}, 3, "n_tokens None is not a non-negative integer"),
    ({**GOOD, "n_tokens": -1}, 3, "n_tokens -1 is not"),
    ({**GOOD, "n_tokens": "3"}, 3, "n_tokens '3' is not"),
    ({**GOOD, "n_tokens": 0}, 0, "holds no tokens"),
    ({k: v for k, v in GOOD.items() if k != "fingerprint"}, 3, "no tokenizer fingerprint"),
    ({**GOOD, "fingerprint": 7}, 3, "no tokenizer fingerprint"),
    (GOOD, 2, "is 260 bytes but its header promises 262 .*truncated"),  # truncated shard
    ({**GOOD, "dtype": "uint32"}, 3, "promises 268"),  # dtype edited in the header
    ({**GOOD, "n_vocab": 70000}, 3, "dtype uint16 does not fit n_vocab 70000"),
    ({**GOOD, "n_vocab": True}, 3, "n_vocab True is not"),
])
def test_damaged_shard_headers_are_named(tmp_path, meta, n_ids, match):
    path = shard_with(tmp_path, meta, n_ids)
    with raises(path, match, ShardError):
        read_shard(path)


def test_unparseable_or_short_shard_headers(tmp_path):
    path = tmp_path / "s.bin"
    path.write_bytes(MAGIC + b"{not json" + b" " * 300)
    with raises(path, "header is not valid JSON", ShardError):
        read_shard(path)
    path.write_bytes(MAGIC + b"[1, 2]".ljust(HEADER_BYTES - len(MAGIC)))
    with raises(path, "not a JSON object", ShardError):
        read_shard(path)
    path.write_bytes(MAGIC + b"\xff\xfe".ljust(HEADER_BYTES - len(MAGIC)))
    with raises(path, "not valid JSON", ShardError):
        read_shard(path)
    path.write_bytes(MAGIC + b"{}")
    with raises(path, "header truncated", ShardError):
        read_shard(path)
    path.write_bytes(b"")
    with raises(path, "bad magic", ShardError):
        read_shard(path)
    with raises(tmp_path / "missing.bin", "not found", ShardError):
        read_shard(tmp_path / "missing.bin")


def test_old_headers_without_n_vocab_still_read(tmp_path):
    assert read_shard(shard_with(tmp_path, GOOD, 3), n_vocab=5).tokens.tolist() == [0, 0, 0]


def test_shard_ids_are_checked_against_the_vocabulary(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, [[1, 2], [3]], eot_id=9, n_vocab=10, fingerprint="abc")
    assert read_shard(path, n_vocab=10).tokens.tolist() == [1, 2, 9, 3, 9]
    with raises(path, "written for a tokenizer with 10 ids but this one has 12", ShardError):
        read_shard(path, n_vocab=12)
    # an old header (no n_vocab) with an id past the vocabulary: the sample check finds it
    old = shard_with(tmp_path, {**GOOD, "n_tokens": 4}, 0)
    with open(old, "ab") as f:
        f.write(np.array([1, 2, 3, 40], dtype=np.uint16).tobytes())
    with raises(old, "token id 40 at position 3 is not below the tokenizer's 10 ids", ShardError):
        read_shard(old, n_vocab=10)


def test_sampled_id_check_reaches_the_last_id_of_a_long_shard(tmp_path, monkeypatch):
    monkeypatch.setattr("gptlab.data.shards.MAX_CHECKED_IDS", 7)
    path = tmp_path / "s.bin"
    write_shard(path, [list(range(5))] * 20, eot_id=9, n_vocab=10, fingerprint="abc")
    with open(path, "r+b") as f:  # corrupt the very last id
        f.seek(-2, 2)
        f.write(np.array([11], dtype=np.uint16).tobytes())
    with raises(path, "token id 11 at position 119", ShardError):
        read_shard(path, n_vocab=10)


# --- info.json ----------------------------------------------------------------------------------------------

INFO = {"entropy_floor": 0.4, "longest_example": 30, "n_tokens": {"train": 9}, "tokenizer": {"kind": "bpe"}}


@pytest.mark.parametrize("text, match", [
    (json.dumps(INFO)[:-1], r":1: not valid JSON at column \d+"),
    ('{\n  "a": 1,\n  oops\n}', ":3: not valid JSON at column 3"),
    ("[]", "expected a JSON object, got a list"),
    (json.dumps({**INFO, "longest_example": 3.5}), "field 'longest_example' should be an integer"),
    (json.dumps({**INFO, "longest_example": True}), "field 'longest_example' should be an integer, got true"),
    (json.dumps({k: v for k, v in INFO.items() if k != "n_tokens"}), "field 'n_tokens' is missing"),
    (json.dumps({**INFO, "tokenizer": "bpe"}), "field 'tokenizer' should be an object"),
])
def test_damaged_info_json_is_named(tmp_path, text, match):
    path = tmp_path / "info.json"
    path.write_text(text)
    with raises(path, match):
        read_json(path, INFO_FIELDS)


@pytest.mark.parametrize("value, match", [("0.4", 'should be a finite number, got "0.4"'),
                                          (float("nan"), "should be a finite number, got NaN")])
def test_a_float_field_refuses_text_and_nan(tmp_path, value, match):
    path = tmp_path / "info.json"
    path.write_text(json.dumps({**INFO, "entropy_floor": value}))
    with raises(path, f"field 'entropy_floor' {match}"):
        read_json(path, {**INFO_FIELDS, "entropy_floor": float})


def test_info_json_reads_and_ints_count_as_floats(tmp_path):
    path = tmp_path / "info.json"
    path.write_text(json.dumps({**INFO, "entropy_floor": 1}))
    assert read_json(path, {**INFO_FIELDS, "entropy_floor": float})["entropy_floor"] == 1
    with raises(tmp_path / "missing.json", "not found"):
        read_json(tmp_path / "missing.json")
    with raises(tmp_path, "cannot be read"):
        read_json(tmp_path)


# --- jsonl ----------------------------------------------------------------------------------------------------

ROW = json.dumps({"question": "Q?", "response": " A."})


@pytest.mark.parametrize("data, match", [
    (b"", "has no records"),
    (b"\n  \n", "has no records"),
    (f"{ROW}\n{ROW}\n\xff\n".encode("latin-1"), r":3: not UTF-8 text \(byte 0xff\)"),
    (f"{ROW}\n{{\"question\": \n".encode(), ":2: not valid JSON at column"),
    (f"{ROW}\n\n[1, 2]\n".encode(), ":3: expected a JSON object, got a list"),
    (f"{ROW}\nnull\n".encode(), ":2: expected a JSON object, got null"),
])
def test_damaged_jsonl_is_named_with_its_line(tmp_path, data, match):
    path = tmp_path / "sft_train.jsonl"
    path.write_bytes(data)
    with raises(path, match):
        read_jsonl(path)


def test_read_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(f"{ROW}\n\n{ROW}\n")
    assert len(read_jsonl(path)) == 2
    with raises(tmp_path / "missing.jsonl", "not found"):
        read_jsonl(tmp_path / "missing.jsonl")


# --- typed records --------------------------------------------------------------------------------------------

def jsonl(tmp_path, name: str, rows: list[dict]):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SFT = {"question": "Where was Anna born?", "response": " Lisbon."}
QUESTION = {**SFT, "answer": "Lisbon", "candidates": ["Lisbon", "Paris"], "attribute": "city"}
PREF = {"question": "Where was Anna born?", "chosen": " Lisbon.", "rejected": " Paris."}
MC = {"ctx": "Anna was born in", "endings": [" Lisbon.", " Paris."], "label": 1}


@pytest.mark.parametrize("reader, good, bad, match", [
    (read_sft, SFT, {"question": "Q?"}, "field 'response' is missing"),
    (read_sft, SFT, {**SFT, "question": 3}, "field 'question' should be a string, got 3"),
    (read_questions, QUESTION, {**QUESTION, "candidates": "Lisbon"}, "field 'candidates' should be a list of strings"),
    (read_questions, QUESTION, {**QUESTION, "candidates": ["Lisbon", 2]}, "field 'candidates' should be a list of strings"),
    (read_questions, QUESTION, {k: v for k, v in QUESTION.items() if k != "answer"}, "field 'answer' is missing"),
    (read_questions, QUESTION, {**QUESTION, "answer": " "}, "field 'answer' is empty"),
    (read_prefs, PREF, {**PREF, "rejected": None}, "field 'rejected' should be a string, got null"),
    (read_mc, MC, {**MC, "label": 2}, "field 'label' is 2, not an index into its 2 endings"),
    (read_mc, MC, {**MC, "label": -1}, "field 'label' is -1"),
    (read_mc, MC, {**MC, "label": 1.0}, "field 'label' should be an integer"),
    (read_mc, MC, {**MC, "endings": [" Lisbon."], "label": 0}, "field 'endings' has 1 item"),
    (read_mc, MC, {**MC, "endings": []}, "field 'endings' has 0 item"),
    (read_mc, MC, {**MC, "ctx": ["Anna"]}, "field 'ctx' should be a string"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, reader, good, bad, match):
    path = jsonl(tmp_path, "set.jsonl", [good, good, bad, good])
    with raises(path, f":3: {match}"):
        reader(path)


@pytest.mark.parametrize("reader", [read_sft, read_questions, read_prefs, read_mc])
def test_empty_sets_are_errors(tmp_path, reader):
    path = tmp_path / "set.jsonl"
    path.write_text("")
    with raises(path, "has no records"):
        reader(path)


def test_good_rows_read_back(tmp_path):
    assert read_sft(jsonl(tmp_path, "a.jsonl", [SFT, QUESTION])) == [SFT, QUESTION]
    assert read_questions(jsonl(tmp_path, "b.jsonl", [QUESTION])) == [QUESTION]
    assert read_mc(jsonl(tmp_path, "c.jsonl", [MC])) == [MC]


def test_prefs_drop_pairs_that_teach_nothing(tmp_path):
    same = {**PREF, "rejected": PREF["chosen"]}
    assert read_prefs(jsonl(tmp_path, "p.jsonl", [PREF, same, PREF])) == ([PREF, PREF], 1)
    path = jsonl(tmp_path, "q.jsonl", [same, same])
    with raises(path, "every pair has chosen == rejected"):
        read_prefs(path)


# --- encoding -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def char_tok():
    return CharTokenizer("".join(sorted(set("Question: Where was Anna born?\nAnswer: Lisbon. Paris."))))


def test_encoding_nothing_is_an_error_naming_where(char_tok):
    with raises("data/sft_train.jsonl", "no examples"):
        encode_conversations(char_tok, [], 64, 0, "data/sft_train.jsonl")
    with raises("data/prefs_train.jsonl", "no examples"):
        encode_pairs(char_tok, [], 64, 0, "data/prefs_train.jsonl")
    idx, targets, _ = collate([], pad_id=0)
    assert idx.shape == targets.shape == (0, 0)


def test_char_tokenizer_names_the_character_and_where_it_came_from(char_tok):
    rows = [SFT, {**SFT, "response": " Zürich."}]
    convs = [Conversation("question", (Message("user", r["question"]), Message("assistant", r["response"]))) for r in rows]
    named = r"^data/sft_train.jsonl: char tokenizer: character 'Z' \(at position 1 of ' Zürich.'\)"
    with pytest.raises(TokenizerError, match=named):
        encode_conversations(char_tok, convs, 64, 0, "data/sft_train.jsonl")


# --- tokenizer folders ----------------------------------------------------------------------------------------

TEXTS = ["Anna Reed was born in Lisbon. 3 + 4 = 7."] * 5


def test_rustbpe_pattern_is_the_one_rustbpe_writes():
    assert train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=260), TEXTS).pattern == RUSTBPE_PATTERN


def test_char_tokenizer_learns_the_text_it_must_encode():
    tok = train_tokenizer(TokenizerConfig(kind="char"), ["abc"], must_encode="Q:\n")
    assert tok.decode(tok.encode("Q:\nab")) == "Q:\nab"
    assert train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=260), TEXTS, must_encode="Q:").encode("Q:")


@pytest.fixture
def bpe_dir(tmp_path):
    train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=270), TEXTS).save(tmp_path)
    return tmp_path


def edit_meta(directory, **changes):
    meta = json.loads((directory / "tokenizer.json").read_text())
    meta.update(changes)
    (directory / "tokenizer.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


@pytest.mark.parametrize("changes, match", [
    ({"pattern": r"(a+)+$"}, r"pattern '\(a\+\)\+\$' is not one gptlab writes"),
    ({"pattern": None}, "field 'pattern' is missing"),
    ({"fingerprint": None}, "field 'fingerprint' is missing"),
    ({"kind": 3}, "field 'kind' should be a string"),
])
def test_damaged_tokenizer_json_is_named(bpe_dir, changes, match):
    edit_meta(bpe_dir, **changes)
    with raises(bpe_dir / "tokenizer.json", match, TokenizerError):
        load_tokenizer(bpe_dir)


def test_gpt2_pattern_is_accepted_for_bpe(bpe_dir):
    edit_meta(bpe_dir, pattern=GPT2_PATTERN)
    with pytest.raises(TokenizerError, match="fingerprint"):  # past the pattern check, to the fingerprint
        load_tokenizer(bpe_dir)


def test_unreadable_tokenizer_json(bpe_dir):
    path = bpe_dir / "tokenizer.json"
    path.write_text('{"kind": "bpe",')
    with raises(path, "not valid JSON", TokenizerError):
        load_tokenizer(bpe_dir)
    path.write_text('"bpe"')
    with raises(path, "expected a JSON object", TokenizerError):
        load_tokenizer(bpe_dir)
    path.unlink()
    with raises(path, "not found", TokenizerError):
        load_tokenizer(bpe_dir)


@pytest.mark.parametrize("edit, match", [
    (lambda lines: lines[:3] + ["not-base64! 3"] + lines[4:], ":4: expected '<base64 token> <rank>'"),
    (lambda lines: lines[:3] + ["QQ== 3 extra"] + lines[4:], ":4: expected '<base64 token> <rank>'"),
    (lambda lines: lines[:3] + lines[4:], ":4: expected a new token with rank 3"),
    (lambda lines: lines + [lines[0].split()[0] + f" {len(lines)}"], ": expected a new token with rank"),
    (lambda lines: lines[3:], ":1: expected a new token with rank 0"),
])
def test_damaged_ranks_are_named(bpe_dir, edit, match):
    path = bpe_dir / "bpe.tiktoken"
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    with raises(path, match, TokenizerError):
        load_tokenizer(bpe_dir)


def test_ranks_must_cover_every_byte(bpe_dir):
    # renumbered so ranks stay contiguous, but byte 0x00 has no token: tiktoken would panic on it
    path = bpe_dir / "bpe.tiktoken"
    lines = path.read_text().splitlines()[1:]
    path.write_text("".join(f"{line.split()[0]} {rank}\n" for rank, line in enumerate(lines)))
    with raises(path, r"no token for 1 single byte\(s\), e.g. b'\\x00'", TokenizerError):
        load_tokenizer(bpe_dir)


def test_missing_or_binary_ranks(bpe_dir):
    path = bpe_dir / "bpe.tiktoken"
    path.write_bytes(b"AA== 0\n\xc3\x28 1\n")
    with raises(path, ":2: not UTF-8 text", TokenizerError):
        load_tokenizer(bpe_dir)
    path.unlink()
    with raises(path, "not found", TokenizerError):
        load_tokenizer(bpe_dir)


@pytest.mark.parametrize("chars, match", [("abca", "repeats the character 'a'"), ("", "'chars' is empty"),
                                          (["a", "b"], "'chars' should be a string")])
def test_char_vocabulary_must_be_distinct_characters(tmp_path, chars, match):
    train_tokenizer(TokenizerConfig(kind="char"), ["abc"]).save(tmp_path)
    edit_meta(tmp_path, chars=chars)
    with raises(tmp_path / "tokenizer.json", match, TokenizerError):
        load_tokenizer(tmp_path)
