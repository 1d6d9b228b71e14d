"""tokenize: train the tokenizer on the configured sources, write them mixed into token shards, and write the
world's SFT, preference and evaluation sets and the corpus statistics (data/info.json).

The sources are checked and every fine-tuning set encoded before the first file is written; the shards are
written into a temp folder that replaces data/shards/ whole at the end, and every other file is written to a
temp name and renamed: a failure or a kill leaves data/ as it was."""
from __future__ import annotations

import tempfile
from pathlib import Path

from gptlab import paths
from gptlab.config import GptlabError
from gptlab.data.formats import Conversation, Message, encode_segments, format_prompt, segments
from gptlab.data.sources import check_sources, empty_split_problem, mixed_documents, tokenizer_sample
from gptlab.data.tokenize import Budgets, EmptySplit, write_shards
from gptlab.data.world import build_world
from gptlab.fileio import atomic_write_json, write_jsonl
from gptlab.stage import announce, data_params, run, say, start
from gptlab.tokenizer import TokenizerError, train_tokenizer


def main() -> None:
    params, accelerator = start("tokenize")
    if not accelerator.is_main_process:  # one writer; the tokenizer workers below are its own processes
        return
    data, root = params.data, Path(".")
    # the fine-tuning and evaluation sets come from the world whatever the pretraining sources are
    world = build_world(data.world, params.seed)
    for line in check_sources(data.sources, root, world):  # cheap checks, before any work
        say(accelerator, f"[tokenize] {line}")
    sft_train, prefs_train = world.sft_examples("train"), world.preference_pairs("train")
    # evaluation records carry the candidate answers, so scoring needs no knowledge of the world
    heldout = [{**row, "candidates": list(world.candidates(row["attribute"]))} for row in world.sft_examples("heldout")]
    prefs_heldout, mc_items = world.preference_pairs("heldout"), world.mc_items()

    # The tokenizer learns from the pretraining text, and, when the world is a source, from everything the
    # models fine-tune on (never the held-out sets), so answer phrasings get real tokens; it must also encode
    # the prompt template. A char tokenizer over another corpus keeps that corpus's characters (Shakespeare:
    # 65 + EOT): the world's examples it cannot encode (arithmetic's digits) are left out of the sets.
    text = tokenizer_sample(data.sources, params.seed, root, world, params.tokenizer.train_chars)
    if any(source.kind == "world" for source in data.sources):
        text += [r["question"] + r["response"] for r in sft_train]
        text += [r["question"] + r["chosen"] + r["rejected"] for r in prefs_train]
    tok = train_tokenizer(params.tokenizer, text, must_encode=format_prompt(""))
    sets = {"sft_train": sft_train, "sft_heldout": heldout, "prefs_train": prefs_train,
            "prefs_heldout": prefs_heldout, "mc_eval": mc_items}
    sets, dropped = encodable(tok, sets)
    sft_train, heldout, prefs_train, prefs_heldout, mc_items = sets.values()
    longest = longest_example(tok, sft_train, heldout, prefs_train, prefs_heldout)

    with tempfile.TemporaryDirectory() as tmp:  # the workers load the tokenizer from here
        tok.save(Path(tmp) / "tokenizer")
        stop: set[tuple[int, str]] = set()
        docs = mixed_documents(data.sources, params.seed, root, world, stop)
        budgets = Budgets(total=data.max_tokens, per_source=tuple(s.max_tokens for s in data.sources), val=data.val_tokens)
        try:
            stats = write_shards(docs, Path(tmp) / "tokenizer", paths.SHARDS, shard_tokens=data.shard_tokens,
                                 workers=data.workers, budgets=budgets, stop=stop)
        except EmptySplit as e:  # say which source left the split empty, with its own settings
            problem = empty_split_problem(e.split, data.sources, e.stats["per_source"], stop, data.max_tokens)
            raise GptlabError(f"[tokenize] {problem}") from None
    n_tokens = {split: stats[split]["n_tokens"] for split in ("train", "val")}
    tok.save(paths.TOKENIZER)
    write_jsonl(paths.SFT_TRAIN, sft_train)
    write_jsonl(paths.SFT_HELDOUT, heldout)
    write_jsonl(paths.PREFS_TRAIN, prefs_train)
    write_jsonl(paths.PREFS_HELDOUT, prefs_heldout)
    write_jsonl(paths.MC_EVAL, mc_items)
    info = {
        "tokenizer": tok.describe(),
        "made_with": data_params(params),  # lets the check stage tell whether data/ is current
        "longest_example": longest,
        "n_tokens": n_tokens,
        "sources": stats["per_source"],
        "dropped_rows": dropped,  # world rows a char tokenizer of another corpus cannot encode
        "world": world.summary(),
    }
    if [s.kind for s in data.sources] == ["world"]:
        # The generator knows how many nats of random choice went into the val split; per val token this is
        # the loss a model that memorised the world's facts could reach (only the world alone has one).
        info["entropy_floor"] = world.corpus_nats("val") / n_tokens["val"]
    atomic_write_json(paths.DATA_INFO, info)  # last: its presence says the set is complete
    announce(accelerator, "tokenize", {
        "tokenizer": f"{tok.kind} ({tok.n_vocab} ids)",
        "train tokens": f"{n_tokens['train']} in {stats['train']['n_shards']} shard(s)",
        "val tokens": n_tokens["val"],
        **({"entropy floor": f"{info['entropy_floor']:.3f} nats/token"} if "entropy_floor" in info else {}),
        "longest example": f"{longest} tokens",
        **({"caps": caps} if (caps := cap_notes(data, stats)) else {}),
        **({"left out": ", ".join(f"{n} {k}" for k, n in dropped.items() if n)} if any(dropped.values()) else {}),
    })


def cap_notes(data, stats: dict) -> str:
    """The token caps the run reached, each with what it actually took: whole documents are admitted, so the one
    that reaches a cap runs past it by up to its own length (a cap of 5 can give a few hundred tokens)."""
    per_source = stats["per_source"]
    caps = [(f"data.sources[{i}].max_tokens", s.max_tokens, per_source[i]["train_tokens"], "train")
            for i, s in enumerate(data.sources) if i < len(per_source)]
    caps += [("data.max_tokens", data.max_tokens, stats["train"]["n_tokens"], "train"),
             ("data.val_tokens", data.val_tokens, stats["val"]["n_tokens"], "val")]
    notes = [f"{key} {cap} took {n} {split} tokens" for key, cap, n, split in caps if cap and n >= cap]
    if not notes:
        return ""
    return ", ".join(notes) + " (whole documents are taken: the one that reaches a cap is kept whole, EOT included)"


ENCODED = ("question", "response", "chosen", "rejected", "ctx", "endings")  # the fields later stages encode


def encodable(tok, sets: dict[str, list[dict]]) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Each set without the rows this tokenizer cannot encode (only a char tokenizer can meet such a row),
    and how many each lost; a set left empty is an error."""
    kept, dropped = {}, {}
    for name, rows in sets.items():
        kept[name] = [row for row in rows if _encodes(tok, row)]
        dropped[name] = len(rows) - len(kept[name])
        if not kept[name]:
            raise GptlabError(f"[tokenize] the {tok.kind} tokenizer cannot encode any row of the world's {name} set; "
                              "add the world as a source (data.sources) or use tokenizer.kind: bpe")
    return kept, dropped


def _encodes(tok, row: dict) -> bool:
    texts = [t for key in ENCODED if key in row for t in ([row[key]] if isinstance(row[key], str) else row[key])]
    try:
        tok.encode_batch(texts)
    except TokenizerError:
        return False
    return True


def longest_example(tok, sft_train, heldout, prefs_train, prefs_heldout) -> int:
    """The longest prompt+response a later stage trains or evaluates on: pretrain checks model.block_size
    against it, so a too-small context fails before pretraining, not after."""
    answered = [(r["question"], r["response"]) for r in sft_train + heldout]
    answered += [(r["question"], r[k]) for r in prefs_train + prefs_heldout for k in ("chosen", "rejected")]
    return max(len(encode_segments(tok, segments(Conversation("question", (Message("user", q), Message("assistant", a)))))
                   .ids) for q, a in answered)


if __name__ == "__main__":
    run(main)
