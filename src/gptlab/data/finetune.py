"""Fine-tuning data: the records of sft.data / dpo.data read into conversations and preference pairs.

Format world reads the sets the tokenize stage wrote (data/sft_*.jsonl, data/prefs_*.jsonl). Every other
format reads a Hugging Face dataset (path, name, revision, split) or local files under finetune/: .parquet
through `datasets.load_dataset`, the loader a hub name runs, and .jsonl line by line (datasets' json reader
falls back to pandas on a record of another type and turns strings such as "5" into numbers, which would
blame the wrong record; read directly, every value keeps its JSON type and errors name `file:line`). The
schemas (one record each):

    alpaca             {"instruction": str, "input": str (may be "" or absent), "output": str}
    messages           {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    prompt_completion  {"prompt": str, "completion": str}  (or both as message lists, TRL's conversational form)
    hh_rlhf            {"chosen": str, "rejected": str}: two whole "\\n\\nHuman: ...\\n\\nAssistant: ..." dialogues
                       that share everything up to the final assistant turn
    preference         {"prompt": str, "chosen": str, "rejected": str}, or chosen/rejected as message lists
                       (UltraFeedback-binarized: whole conversations ending in the assistant's answer; or TRL's
                       conversational form: prompt as a message list, chosen/rejected as one assistant message)

A record that does not fit its schema is an error naming the record (`file:line`, or `<dataset> split <s>
record N`) and the field, before any training.
"""
from __future__ import annotations

import glob
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gptlab import paths
from gptlab.config import ConfigError, FinetuneData, GptlabError
from gptlab.data.formats import ROLES, Conversation, Message, Pair, check_roles
from gptlab.data.records import read_prefs, read_sft
from gptlab.data.sources import held_out, one_line, parquet_rows, quiet_datasets
from gptlab.fileio import REGENERATE, iter_jsonl

FILE_SUFFIXES = (".jsonl", ".parquet")
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
RESPONSE_FIELD = {"alpaca": "output", "messages": "messages[].content of an assistant turn",
                  "prompt_completion": "completion"}  # where a conversation format keeps its responses
VALIDATION_SPLITS = ("validation", "valid", "val", "dev")  # split names that hold labelled items
SFT_TEMPLATE = {"alpaca": "alpaca", "messages": "chat"}  # prompt_completion: plain (strings) or chat (lists)


@dataclass
class Sets:
    """A stage's training and held-out records, and a line saying where they came from."""

    train: list
    heldout: list
    source: str
    dropped: int = 0  # records left out on purpose (world pairs with chosen == rejected)
    empty: int = 0  # records left out with an empty response (training on end-of-text alone teaches nothing)


# --- entry points -------------------------------------------------------------------------------------

def sft_sets(cfg: FinetuneData, seed: int, key: str = "sft.data") -> Sets:
    """Conversations to train on and to hold out (val_loss)."""
    if cfg.format == "world":
        def world(path):
            return [Conversation("question", (Message("user", r["question"]), Message("assistant", r["response"])))
                    for r in read_sft(path)]
        return _without_empty(Sets(world(paths.SFT_TRAIN), world(paths.SFT_HELDOUT), f"world ({paths.SFT_TRAIN})"),
                              key, "response")
    parse = {"alpaca": _alpaca, "messages": _messages, "prompt_completion": _prompt_completion}[cfg.format]
    return _split(cfg, seed, key, parse)


def preference_sets(cfg: FinetuneData, seed: int, key: str = "dpo.data") -> Sets:
    """Preference pairs to train on and to hold out."""
    if cfg.format == "world":
        def world(path):
            rows, dropped = read_prefs(path)  # chosen == rejected teaches nothing: dropped and counted
            return [Pair(Conversation("question", (Message("user", r["question"]),)), r["chosen"], r["rejected"])
                    for r in rows], dropped
        (train, dropped), (heldout, _) = world(paths.PREFS_TRAIN), world(paths.PREFS_HELDOUT)
        return _without_empty(Sets(train, heldout, f"world ({paths.PREFS_TRAIN})", dropped), key, "chosen/rejected")
    parse = {"hh_rlhf": _hh_rlhf, "preference": _preference}[cfg.format]
    return _split(cfg, seed, key, parse)


def input_files(cfg: FinetuneData, key: str) -> list[Path]:
    """The local files a stage reads for `key` (resume compares their checksums; hub data is pinned by params)."""
    if cfg.format == "world":
        return [paths.SFT_TRAIN, paths.SFT_HELDOUT] if key.startswith("sft") else [paths.PREFS_TRAIN, paths.PREFS_HELDOUT]
    return expand(cfg.paths, key) if cfg.paths else []


def check_files(cfg: FinetuneData, key: str) -> str:
    """Cheap check before any work: local files exist and their first record fits the schema (hub data needs
    the network: the stage itself reads it, still before training). Returns a line describing the data."""
    if cfg.format == "world":
        return "world"
    if cfg.path:
        return _hub_name(cfg)
    files = expand(cfg.paths, key)
    parse = {"alpaca": _alpaca, "messages": _messages, "prompt_completion": _prompt_completion,
             "hh_rlhf": _hh_rlhf, "preference": _preference}[cfg.format]
    for path in files:
        for where, record in _file_records(path, key):
            parse(record, where)
            break
    return f"{cfg.format}: {len(files)} file(s) ({' '.join(cfg.paths)})"


# --- reading ------------------------------------------------------------------------------------------

def _split(cfg: FinetuneData, seed: int, key: str, parse) -> Sets:
    """Records parsed in order; held out by val_split or a seeded val_share; training capped at max_examples.
    Records with an empty response are left out and counted (Sets.empty); their numbers still count for the
    seeded hash, so which records are held out does not depend on them."""
    train, heldout = [], []
    empty = {"training": Counter(), "held-out": Counter()}  # field -> records dropped, per set
    if cfg.val_split:
        for where, record in _records(_hub_loader(cfg, cfg.val_split), _what(cfg, cfg.val_split), key):
            _keep(parse(record, where), heldout, empty["held-out"])
    n_read = 0
    for n, (where, record) in enumerate(_stream(cfg, key)):
        n_read += 1
        item = parse(record, where)
        if cfg.val_share and held_out(f"{seed}:{key}:{n}", cfg.val_share):
            _keep(item, heldout, empty["held-out"])
        elif not cfg.max_examples or len(train) < cfg.max_examples:
            _keep(item, train, empty["training"])
        elif not cfg.val_share:
            break  # nothing more to take
    if not train or not heldout:
        raise GptlabError(_empty_set_problem(cfg, key, "training" if not train else "held-out", n_read, empty))
    return Sets(train, heldout, _describe(cfg), empty=sum(sum(c.values()) for c in empty.values()))


def _keep(item, into: list, empty: Counter) -> None:
    """Add the record to `into`, unless its response is empty: then count it under the field that is empty."""
    field = _empty_field(item)
    if field:
        empty[field] += 1
    else:
        into.append(item)


def _empty_field(item) -> str:
    """The field of a record whose response is empty ("" if none is): an assistant turn with no text, or a
    preference pair's chosen or rejected answer. Training on one would teach end-of-text alone."""
    if isinstance(item, Pair):
        return "chosen" if not item.chosen.strip() else "rejected" if not item.rejected.strip() else ""
    return "assistant" if any(not m.content.strip() for m in item.messages if m.role == "assistant") else ""


def _without_empty(sets: Sets, key: str, fields: str) -> Sets:
    """A world set without its records with an empty response (tokenize never writes one; an edited file may)."""
    train, heldout, empty = [], [], Counter()
    for item in sets.train:
        _keep(item, train, empty)
    for item in sets.heldout:
        _keep(item, heldout, empty)
    if not train or not heldout:
        which = "training" if not train else "held-out"
        raise GptlabError(f"{key}: every {which} record of {sets.source} has an empty {fields}; {REGENERATE}")
    return Sets(train, heldout, sets.source, sets.dropped, sum(empty.values()))


def _empty_set_problem(cfg: FinetuneData, key: str, which: str, n_read: int, empty: dict[str, Counter]) -> str:
    """What left the training or held-out set empty, with the fix: no records, only empty responses, or a
    val_share / val_split that leaves nothing on one side."""
    data, lost = _describe(cfg), empty[which]
    if which == "held-out" and cfg.val_split:
        dropped = f" ({sum(lost.values())} with an empty response dropped)" if lost else ""
        return (f"{key}.val_split: {cfg.val_split!r} of {_hub_name(cfg)} gave no held-out records{dropped}; set it "
                "to a split that holds records")
    if n_read == 0:
        split = f" split {cfg.split!r}" if cfg.path else ""
        return f"{key}: {data}{split} holds no records; add records or point {key} at other data"
    read = empty["training"] + (Counter() if cfg.val_split else empty["held-out"])  # of the n_read records
    fields = " / ".join(RESPONSE_FIELD.get(cfg.format, f) if f == "assistant" else f
                        for f in (read if which == "training" else lost))
    if lost and which == "training":
        return (f"{key}: {data}: {sum(read.values())} of the {n_read} records read have an empty response (field "
                f"{fields}), leaving none to train on; fill in the responses or point {key} at other data")
    if lost:
        return (f"{key}: {data}: all {sum(lost.values())} held-out records have an empty response (field {fields}); "
                f"fill in their responses or raise {key}.val_share to hold out more")
    if which == "training" and cfg.val_share:
        return (f"{key}: {data}: {n_read} records, val_share {cfg.val_share:g} held out all of them; lower "
                f"{key}.val_share or add records")
    if which == "training":
        return f"{key}: {data}: {n_read} records, none left for training; add records"
    return (f"{key}: {data}: {n_read} records, val_share {cfg.val_share:g} held out none of them; raise "
            f"{key}.val_share or add records")


def _stream(cfg: FinetuneData, key: str) -> Iterator[tuple[str, dict]]:
    if cfg.path:
        yield from _records(_hub_loader(cfg, cfg.split), _what(cfg, cfg.split), key)
        return
    for path in expand(cfg.paths, key):
        yield from _file_records(path, key)


def _describe(cfg: FinetuneData) -> str:
    return f"{cfg.format} from {_hub_name(cfg) if cfg.path else ' '.join(cfg.paths)}"


def _hub_name(cfg: FinetuneData) -> str:
    pinned = f"@{cfg.revision}" if cfg.revision else " (revision unpinned: pin it for a reproducible run)"
    return f"{cfg.path}{' ' + cfg.name if cfg.name else ''}{pinned}"


def _what(cfg: FinetuneData, split: str) -> str:
    return f"{cfg.path}{' ' + cfg.name if cfg.name else ''} split {split}"


def _hub_loader(cfg: FinetuneData, split: str):
    def load():
        return quiet_datasets(hub=True).load_dataset(cfg.path, cfg.name or None, split=split,
                                                     revision=cfg.revision or None)
    return load


def _file_records(path: Path, key: str) -> Iterator[tuple[str, dict]]:
    if path.suffix.lower() == ".jsonl":
        for n, record in iter_jsonl(path, fix="fix the file"):
            yield f"{path}:{n}", record
        return

    def load():  # datasets cannot read a parquet file without rows ("BatchSize must be greater than 0")
        return [] if parquet_rows(path) == 0 else quiet_datasets().load_dataset("parquet", data_files=[str(path)],
                                                                                   split="train")
    yield from _records(load, str(path), key)


def _records(load, what: str, key: str) -> Iterator[tuple[str, dict]]:
    """(`<what> record N`, record) for each record; a failure to open or read is one error naming `key`."""
    try:
        records = iter(load())
    except Exception as e:  # noqa: BLE001 - loaders raise anything (no network, no such dataset, bad file)
        raise ConfigError(f"{key}: cannot open {what} ({one_line(e)}); check the path, name, split and "
                          "revision (and the network, for a hub dataset), or fix the file") from None
    n = 0
    while True:
        n += 1
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - a damaged file, as any type
            raise ConfigError(f"{key}: cannot read {what} at record {n} ({one_line(e)}); fix the file") from None
        yield f"{what} record {n}", record


def expand(patterns: tuple[str, ...], key: str) -> list[Path]:
    """The files matching `key`'s paths (globs), sorted, each once; a glob matching nothing is an error."""
    found: set[str] = set()
    for pattern in patterns:
        matches = {os.path.normpath(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)}
        if not matches:
            raise ConfigError(f"{key}.paths: {pattern!r} matches no file; put the files there or fix the glob")
        found |= matches
    for p in found:
        if Path(p).suffix.lower() not in FILE_SUFFIXES:
            raise ConfigError(f"{key}.paths: {p} is not a .jsonl or .parquet file; convert it or leave it out")
    return [Path(p) for p in sorted(found)]


# --- schemas ------------------------------------------------------------------------------------------

def _text(record: dict, field: str, where: str, optional: bool = False) -> str:
    value = record.get(field)
    if value is None and optional:
        return ""
    if not isinstance(value, str):  # parquet and hub records hold null where a record lacks the field
        got = "missing" if value is None else f"{type(value).__name__}, not a string"
        raise GptlabError(f"{where}: field {field!r} is {got}; fix the record or the data's format")
    return value


def _message_list(value, field: str, where: str) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise GptlabError(f"{where}: field {field!r} should be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise GptlabError(f"{where}: {field}[{i}] should be {{\"role\": str, \"content\": str}}, got {str(m)[:60]}")
        if m["role"] not in ROLES:
            raise GptlabError(f"{where}: {field}[{i}].role is {m['role']!r}; use one of {ROLES}")
        out.append(Message(m["role"], m["content"]))
    return tuple(out)


def _alpaca(record: dict, where: str) -> Conversation:
    instruction, output = _text(record, "instruction", where), _text(record, "output", where)
    context = _text(record, "input", where, optional=True)
    return Conversation("alpaca", (Message("user", instruction), Message("assistant", output)), context)


def _messages(record: dict, where: str) -> Conversation:
    messages = _message_list(record.get("messages"), "messages", where)
    check_roles(messages, where)
    return Conversation("chat", messages)


def _prompt_completion(record: dict, where: str) -> Conversation:
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):  # TRL's conversational prompt-completion
        messages = _message_list(prompt, "prompt", where) + _message_list(completion, "completion", where)
        check_roles(messages, where)
        return Conversation("chat", messages)
    return Conversation("plain", (Message("user", _text(record, "prompt", where)),
                                  Message("assistant", _text(record, "completion", where))))


def _hh_rlhf(record: dict, where: str) -> Pair:
    chosen, rejected = _text(record, "chosen", where), _text(record, "rejected", where)
    if chosen == rejected:
        raise GptlabError(f"{where}: chosen and rejected are identical, so the pair states no preference; "
                          "remove the record")
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind("\n\nAssistant:")
    if cut < 0:
        raise GptlabError(f"{where}: chosen and rejected share no dialogue ending in '\\n\\nAssistant:' (HH-RLHF "
                          "pairs continue one conversation); fix the record or use format preference")
    prompt = _hh_dialogue(chosen[:cut], where)
    start = cut + len("\n\nAssistant:")
    return Pair(Conversation("chat", prompt), _unspace(chosen[start:]), _unspace(rejected[start:]))


def _hh_dialogue(text: str, where: str) -> tuple[Message, ...]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...' as messages (ending with the human's turn)."""
    parts = HH_TURN.split(text)  # [before, speaker, text, speaker, text, ...]
    if parts[0].strip():
        raise GptlabError(f"{where}: the dialogue should start with '\\n\\nHuman:', starts with {parts[0][:40]!r}")
    messages = tuple(Message(HH_ROLES[s], _unspace(t)) for s, t in zip(parts[1::2], parts[2::2]))
    check_roles(messages, where, generating=True)
    return messages


def _unspace(text: str) -> str:
    """Turn text after a speaker label, without the one space the chat template puts back."""
    return text[1:] if text.startswith(" ") else text


def _preference(record: dict, where: str) -> Pair:
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        pair = Pair(Conversation("plain", (Message("user", _text(record, "prompt", where)),)), chosen, rejected)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        pair = _preference_messages(record, where)
    else:
        raise GptlabError(f"{where}: fields 'chosen' and 'rejected' should both be strings or both message lists")
    if pair.chosen == pair.rejected:
        raise GptlabError(f"{where}: chosen and rejected are identical, so the pair states no preference; "
                          "remove the record")
    return pair


def _preference_messages(record: dict, where: str) -> Pair:
    chosen = _message_list(record["chosen"], "chosen", where)
    rejected = _message_list(record["rejected"], "rejected", where)
    if chosen[-1].role != "assistant" or rejected[-1].role != "assistant":
        raise GptlabError(f"{where}: chosen and rejected should end with the assistant's answer")
    if len(chosen) == 1 and len(rejected) == 1:  # TRL's form: the conversation so far is in `prompt`
        prompt = record.get("prompt")
        shared = (_message_list(prompt, "prompt", where) if isinstance(prompt, list)
                  else (Message("user", _text(record, "prompt", where)),))
    else:  # UltraFeedback's form: each side is the whole conversation
        shared = chosen[:-1]
        if rejected[:-1] != shared:
            raise GptlabError(f"{where}: chosen and rejected differ before their final answers; a pair must "
                              "share the conversation up to the answer")
    check_roles(shared, where, generating=True)
    return Pair(Conversation("chat", shared), chosen[-1].content, rejected[-1].content)


# --- multiple-choice items for evaluate (HellaSwag's schema) ---------------------------------------------

def hub_mc_items(path: str, name: str, split: str, revision: str, key: str = "evaluate.mc_path") -> list[dict]:
    """HellaSwag-schema items from a hub dataset (or a local folder laid out like one): ctx (or ctx_a/ctx_b),
    activity_label, endings, label (an int or a numeric string, as the hub's HellaSwag stores it)."""
    what = f"{path}{' ' + name if name else ''} split {split}"

    def load():
        local = os.path.isdir(path)  # a folder laid out like a hub dataset needs no network
        return quiet_datasets(hub=not local).load_dataset(path, name or None, split=split, revision=revision or None)

    items = [_mc_item(record, where, split) for where, record in _records(load, what, key)]
    if not items:
        raise ConfigError(f"{key}: {what} holds no items; name a split with labelled items, e.g. validation")
    return items


def _mc_item(record: dict, where: str, split: str) -> dict:
    endings = record.get("endings")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise GptlabError(f"{where}: field 'endings' should be a list of at least 2 strings")
    label = record.get("label")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        # an unlabelled item (HellaSwag's test split has label "") points at the split; a bad label at the item
        unlabelled = label in (None, "", -1) and split.lower() not in VALIDATION_SPLITS
        fix = ("a test split without labels cannot be scored: use the validation split (evaluate.mc_split)"
               if unlabelled else "fix the item or leave it out")
        raise GptlabError(f"{where}: field 'label' is {label!r}, not an index into its {len(endings)} endings; {fix}")
    item = {k: record[k] for k in ("ctx_a", "ctx_b", "activity_label") if isinstance(record.get(k), str)}
    if "ctx_a" in item and "ctx_b" in item and "activity_label" not in item:
        item.pop("ctx_a"), item.pop("ctx_b")  # lm-eval's context needs all three
    ctx = record.get("ctx") if isinstance(record.get("ctx"), str) else \
        (f"{item['ctx_a']} {item['ctx_b']}".strip() if "ctx_a" in item else None)
    if ctx is None:
        raise GptlabError(f"{where}: field 'ctx' is missing (and no ctx_a/ctx_b to build it from)")
    return {**item, "ctx": ctx, "endings": endings, "label": label}

