"""tokenize: build the world, train/save the tokenizer, write token shards and the SFT, preference and
evaluation sets, and the corpus statistics (incl. the entropy floor in nats per token)."""
from __future__ import annotations

from gptlab import paths
from gptlab.data.formats import encode_example
from gptlab.data.shards import write_shard
from gptlab.data.world import build_world
from gptlab.fileio import atomic_write_json, write_jsonl
from gptlab.stage import announce, run, start
from gptlab.tokenizer import train_tokenizer


def main() -> None:
    params, accelerator = start("tokenize")
    if not accelerator.is_main_process:  # one writer; nothing here is worth splitting across processes
        return
    world = build_world(params.data.world, params.seed)
    docs = {split: world.pretrain_docs(split) for split in ("train", "val")}
    sft_train, prefs_train = world.sft_examples("train"), world.preference_pairs("train")
    # The tokenizer learns from everything the models train on (never the held-out sets), so the
    # prompt template and answer phrasings get real tokens rather than byte fragments.
    finetune_text = [r["question"] + r["response"] for r in sft_train]
    finetune_text += [r["question"] + r["chosen"] + r["rejected"] for r in prefs_train]
    tok = train_tokenizer(params.tokenizer, docs["train"] + finetune_text)
    tok.save(paths.TOKENIZER)

    n_tokens = {}
    for split, path in (("train", paths.TRAIN_SHARD), ("val", paths.VAL_SHARD)):
        n_tokens[split] = write_shard(path, tok.encode_batch(docs[split]), tok.eot_id, tok.n_vocab, tok.fingerprint)

    # evaluation records carry the candidate answers, so scoring needs no knowledge of the world
    heldout = [{**row, "candidates": list(world.candidates(row["attribute"]))} for row in world.sft_examples("heldout")]
    write_jsonl(paths.SFT_TRAIN, sft_train)
    write_jsonl(paths.SFT_HELDOUT, heldout)
    write_jsonl(paths.PREFS_TRAIN, prefs_train)
    prefs_heldout = world.preference_pairs("heldout")
    write_jsonl(paths.PREFS_HELDOUT, prefs_heldout)
    write_jsonl(paths.MC_EVAL, world.mc_items())

    # The generator knows how many nats of random choice went into each split; per token of the val shard
    # this is the loss a model that memorised the world's facts could reach.
    floor = world.corpus_nats("val") / n_tokens["val"]
    # the longest prompt+response a later stage trains or evaluates on: pretrain checks model.block_size
    # against it, so a too-small context fails before pretraining rather than after
    answered = [(r["question"], r["response"]) for r in sft_train + heldout]
    answered += [(r["question"], r[k]) for r in prefs_train + prefs_heldout for k in ("chosen", "rejected")]
    longest = max(len(encode_example(tok, question, response).ids) for question, response in answered)
    info = {
        "tokenizer": tok.describe(),
        "longest_example": longest,
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
        "longest example": f"{longest} tokens",
    })


if __name__ == "__main__":
    run(main)
