"""tokenize: build the world, train/save the tokenizer, write token shards and the SFT, preference and
evaluation sets, and the corpus statistics (incl. the entropy floor in nats per token).

Everything is computed and encoded before the first file is written, so input the tokenizer cannot
handle fails with data/ untouched; each file is then written to a temp name and renamed."""
from __future__ import annotations

from gptlab import paths
from gptlab.data.formats import encode_example, format_prompt
from gptlab.data.shards import write_shard
from gptlab.data.world import build_world
from gptlab.fileio import atomic_write_json, write_jsonl
from gptlab.stage import announce, data_params, run, start
from gptlab.tokenizer import train_tokenizer


def main() -> None:
    params, accelerator = start("tokenize")
    if not accelerator.is_main_process:  # one writer; nothing here is worth splitting across processes
        return
    world = build_world(params.data.world, params.seed)
    docs = {split: world.pretrain_docs(split) for split in ("train", "val")}
    sft_train, prefs_train = world.sft_examples("train"), world.preference_pairs("train")
    # evaluation records carry the candidate answers, so scoring needs no knowledge of the world
    heldout = [{**row, "candidates": list(world.candidates(row["attribute"]))} for row in world.sft_examples("heldout")]
    prefs_heldout, mc_items = world.preference_pairs("heldout"), world.mc_items()
    # The tokenizer learns from everything the models train on (never the held-out sets), so the
    # answer phrasings get real tokens rather than byte fragments; it must also encode the prompt template.
    finetune_text = [r["question"] + r["response"] for r in sft_train]
    finetune_text += [r["question"] + r["chosen"] + r["rejected"] for r in prefs_train]
    tok = train_tokenizer(params.tokenizer, docs["train"] + finetune_text, must_encode=format_prompt(""))
    ids = {split: tok.encode_batch(docs[split]) for split in ("train", "val")}
    n_tokens = {split: sum(len(doc) + 1 for doc in ids[split]) for split in ids}  # + one EOT per document

    # the longest prompt+response a later stage trains or evaluates on: pretrain checks model.block_size
    # against it, so a too-small context fails before pretraining rather than after
    answered = [(r["question"], r["response"]) for r in sft_train + heldout]
    answered += [(r["question"], r[k]) for r in prefs_train + prefs_heldout for k in ("chosen", "rejected")]
    longest = max(len(encode_example(tok, question, response).ids) for question, response in answered)
    for item in mc_items:  # evaluate encodes these: fail here, before writing, if the tokenizer cannot
        tok.encode_batch([item["ctx"], *item["endings"]])
    # The generator knows how many nats of random choice went into each split; per token of the val shard
    # this is the loss a model that memorised the world's facts could reach.
    floor = world.corpus_nats("val") / n_tokens["val"]
    info = {
        "tokenizer": tok.describe(),
        "made_with": data_params(params),  # lets the check stage tell whether data/ is current
        "longest_example": longest,
        "n_tokens": n_tokens,
        "entropy_floor": floor,
        "world": world.summary(),
    }

    tok.save(paths.TOKENIZER)
    for split, path in (("train", paths.TRAIN_SHARD), ("val", paths.VAL_SHARD)):
        write_shard(path, ids[split], tok.eot_id, tok.n_vocab, tok.fingerprint)
    write_jsonl(paths.SFT_TRAIN, sft_train)
    write_jsonl(paths.SFT_HELDOUT, heldout)
    write_jsonl(paths.PREFS_TRAIN, prefs_train)
    write_jsonl(paths.PREFS_HELDOUT, prefs_heldout)
    write_jsonl(paths.MC_EVAL, mc_items)
    atomic_write_json(paths.DATA_INFO, info)  # last: its presence says the set is complete
    announce(accelerator, "tokenize", {
        "tokenizer": f"{tok.kind} ({tok.n_vocab} ids)",
        "train tokens": n_tokens["train"],
        "val tokens": n_tokens["val"],
        "entropy floor": f"{floor:.3f} nats/token",
        "longest example": f"{longest} tokens",
    })


if __name__ == "__main__":
    run(main)
