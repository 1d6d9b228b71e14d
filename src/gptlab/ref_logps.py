"""The reference log-probs DPO compares against, computed once by the ref_logps stage and checked by dpo.

DPO's reference is the frozen sft model, so its summed response log-probs of every preference pair never
change while the policy trains. The ref_logps stage writes them to data/ref_logps/ (a cached DVC output):
a sweep over dpo.beta, loss_type or lr reuses them, and DPO runs one forward pass per step instead of two.

    data/ref_logps/logps.safetensors   train_chosen, train_rejected, heldout_chosen, heldout_rejected (float32)
    data/ref_logps/meta.json           init_sha256: the sft weights' SHA-256 (what the dpo checkpoint records as its
                                       init_sha256), and a fingerprint of the encoded pairs

dpo refuses log-probs made from other weights or other pairs (another dpo.data, max_prompt_tokens or
tokenizer), naming what differs, instead of training against a wrong reference.
"""
from __future__ import annotations

import hashlib

import safetensors.torch
import torch

from gptlab import paths
from gptlab.config import DPOConfig, GptlabError
from gptlab.data.finetune import Sets, preference_sets
from gptlab.data.formats import Encoded, Example, encode_pairs
from gptlab.fileio import atomic_path, atomic_write_json, read_json

WEIGHTS = "logps.safetensors"
META = "meta.json"
META_FIELDS = {"pairs": dict}  # and init_sha256: checked by read, which refuses a file without it
SETS = ("train", "heldout")
REMAKE = "rerun the ref_logps stage (dvc repro ref_logps)"


def encoded_sets(cfg: DPOConfig, seed: int, tok, block_size: int,
                 names: tuple[str, ...] = SETS) -> tuple[Sets, dict[str, Encoded]]:
    """dpo.data's pairs, encoded as ref_logps, dpo and evaluate must all encode them (their fingerprints are
    compared): (the sets, {name: encoded} for the named sets)."""
    sets = preference_sets(cfg.data, seed)
    where = {"train": f"dpo.data ({sets.source})", "heldout": f"dpo.data ({sets.source}), held out"}
    return sets, {n: encode_pairs(tok, getattr(sets, n), block_size, cfg.max_prompt_tokens, where[n]) for n in names}


def pairs_fingerprint(pairs: list[tuple[Example, Example]]) -> str:
    """SHA-256 over every pair's token ids and loss masks, in order: the exact sequences scored."""
    h = hashlib.sha256()
    for pair in pairs:
        for e in pair:
            h.update(len(e.ids).to_bytes(4, "little"))
            h.update(e.ids.tobytes())
            h.update(e.mask.tobytes())
    return h.hexdigest()


def write(logps: dict[str, tuple[torch.Tensor, torch.Tensor]], init_sha256: str, fingerprints: dict[str, str]) -> None:
    """Tensors first, meta.json last (each to a temp name, then renamed): a meta.json means a whole set."""
    folder = paths.REF_LOGPS
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META).unlink(missing_ok=True)
    tensors = {f"{name}_{side}": t.float().contiguous().cpu() for name, pair in logps.items()
               for side, t in zip(("chosen", "rejected"), pair)}
    with atomic_path(folder / WEIGHTS) as tmp:
        safetensors.torch.save_file(tensors, str(tmp))
    pairs = {name: {"count": len(logps[name][0]), "fingerprint": fingerprints[name]} for name in logps}
    atomic_write_json(folder / META, {"init_sha256": init_sha256, "pairs": pairs})


def read(init_sha256: str, fingerprints: dict[str, str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The log-probs for the sft weights with this SHA-256 and these encoded pairs; anything else is a
    GptlabError."""
    folder = paths.REF_LOGPS
    meta = read_json(folder / META, META_FIELDS, fix=REMAKE)
    made = meta.get("init_sha256")
    if made != init_sha256:  # a file from before the key was init_sha256 names no weights: refused the same way
        shown = made[:12] if isinstance(made, str) else "unnamed (an older gptlab)"
        raise GptlabError(f"{folder}: made from other weights (sft weights {shown}, not the "
                          f"{init_sha256[:12]} of {paths.checkpoint_dir('sft')}'s); {REMAKE}")
    try:
        tensors = safetensors.torch.load_file(str(folder / WEIGHTS))
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError (and others) for damaged bytes
        raise GptlabError(f"{folder / WEIGHTS}: unreadable ({e}); {REMAKE}") from None
    out = {}
    for name, fingerprint in fingerprints.items():
        made = meta["pairs"].get(name, {})
        if made.get("fingerprint") != fingerprint:
            raise GptlabError(f"{folder}: its {name} log-probs were made for other pairs (dpo.data, "
                              f"dpo.max_prompt_tokens or the tokenizer changed since); {REMAKE}")
        pair = tuple(tensors.get(f"{name}_{side}") for side in ("chosen", "rejected"))
        if any(t is None or t.shape != (made["count"],) or not torch.isfinite(t).all() for t in pair):
            raise GptlabError(f"{folder / WEIGHTS}: {name} tensors missing, misshapen or not finite; {REMAKE}")
        out[name] = pair
    return out
