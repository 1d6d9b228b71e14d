"""tokenize: build the world, train/save the tokenizer, write token shards and the SFT, preference and
evaluation sets, and the corpus statistics (incl. the entropy floor in nats per token)."""
from __future__ import annotations

from gptlab import paths
from gptlab.data.shards import write_shard
from gptlab.data.world import build_world
from gptlab.fileio import atomic_write_json, write_jsonl
from gptlab.stage import announce, start
from gptlab.tokenizer import train_tokenizer


def main() -> None:
    params, accelerator = start("tokenize")
    if not accelerator.is_main_process:  # one writer; nothing here is worth splitting across processes
        return
    world = build_world(params.data.world, params.seed)
    docs = {split: world.pretrain_docs(split) for split in ("train", "val")}
    tok = train_tokenizer(params.tokenizer, docs["train"])
    tok.save(paths.TOKENIZER)

    n_tokens = {}
    for split, path in (("train", paths.TRAIN_SHARD), ("val", paths.VAL_SHARD)):
        n_tokens[split] = write_shard(path, tok.encode_batch(docs[split]), tok.eot_id, tok.n_vocab, tok.fingerprint)

    # evaluation records carry the candidate answers, so scoring needs no knowledge of the world
    heldout = [{**row, "candidates": list(world.candidates(row["attribute"]))} for row in world.sft_examples("heldout")]
    write_jsonl(paths.SFT_TRAIN, world.sft_examples("train"))
    write_jsonl(paths.SFT_HELDOUT, heldout)
    write_jsonl(paths.PREFS_TRAIN, world.preference_pairs("train"))
    write_jsonl(paths.PREFS_HELDOUT, world.preference_pairs("heldout"))
    write_jsonl(paths.MC_EVAL, world.mc_items())

    # The generator knows how many nats of random choice went into each split; per token of the val shard
    # this is the loss a model that memorised the world's facts could reach.
    floor = world.corpus_nats("val") / n_tokens["val"]
    info = {
        "tokenizer": tok.describe(),
        "n_tokens": n_tokens,
        "entropy_floor": floor,
        "world": world.summary(),
    }
    atomic_write_json(paths.DATA_INFO, info)
    announce(accelerator, "tokenize", {
        "tokenizer": f"{tok.kind} ({tok.n_vocab} ids)",
        "train tokens": n_tokens["train"],
        "val tokens": n_tokens["val"],
        "entropy floor": f"{floor:.3f} nats/token",
    })


if __name__ == "__main__":
    main()
