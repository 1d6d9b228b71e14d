"""`gptlab show-example`: one training example as the model sees it, with the tokens that carry loss marked.

It reads the data exactly as the sft / dpo stage would (params.yaml's sft.data or dpo.data, the template,
truncation to the context), so a user can check a template and max_prompt_tokens before paying for a run.
The tokenizer and context come from the stage's start point when it exists (sft: sft.init; dpo: the sft
checkpoint), else from what the pipeline will use (data/tokenizer and model.block_size).
"""
from __future__ import annotations

import os

from gptlab import paths
from gptlab.config import PIPELINE_MODELS, GptlabError, Params
from gptlab.data.formats import Example, encode_conversations, encode_pairs
from gptlab.tokenizer import Tokenizer

LOSS_OPEN, LOSS_CLOSE = "[[", "]]"  # around loss-carrying text when colour is off
GREEN, RESET = "\033[1;32m", "\033[0m"


def tokenizer_and_context(params: Params, stage: str) -> tuple[Tokenizer, int, str]:
    """(tokenizer, block_size, where they came from) for the stage's examples."""
    from gptlab.checkpoint import check_model_folder
    from gptlab.tokenizer import META_FILE, load_tokenizer

    parent = params.sft.init if stage == "sft" else str(paths.checkpoint_dir("sft"))
    if parent not in PIPELINE_MODELS.values() or os.path.lexists(parent):  # the pipeline's may not be made yet
        found = check_model_folder(parent)  # what load_model checks, without reading the weights
        return found.tokenizer(), found.config.block_size, parent
    if not (paths.TOKENIZER / META_FILE).exists():  # the file load_tokenizer reads first
        raise GptlabError(f"no tokenizer yet: neither {parent} nor {paths.TOKENIZER} exists; run the tokenize "
                          "stage first (dvc repro tokenize)")
    return load_tokenizer(paths.TOKENIZER), params.model.block_size, f"{paths.TOKENIZER}, model.block_size"


def show_example(params: Params, stage: str, index: int, heldout: bool, tokens: bool, color: bool) -> str:
    from gptlab.data.finetune import preference_sets, sft_sets

    tok, T, origin = tokenizer_and_context(params, stage)
    cfg = params.sft if stage == "sft" else params.dpo
    sets = (sft_sets if stage == "sft" else preference_sets)(cfg.data, params.seed)
    records = sets.heldout if heldout else sets.train
    which = "held-out" if heldout else "training"
    if not 0 <= index < len(records):
        raise GptlabError(f"--index: {index} is out of range; the {which} set has {len(records)} records (0.."
                          f"{len(records) - 1})")
    where = f"{stage}.data record {index}"
    if stage == "sft":
        enc = encode_conversations(tok, [records[index]], T, cfg.max_prompt_tokens, where)
        shown = [("example", enc.items[0])]
        template = records[index].template
    else:
        enc = encode_pairs(tok, [records[index]], T, cfg.max_prompt_tokens, where)
        shown = list(zip(("chosen", "rejected"), enc.items[0]))
        template = records[index].prompt.template
    head = [f"{stage} {which} record {index} of {len(records)} | data {sets.source} | template {template} | "
            f"tokenizer and context from {origin} (block_size {T}, max_prompt_tokens {cfg.max_prompt_tokens})"]
    if enc.cut:
        head.append("this example was cut to fit the context (prompt from the left, response at the end)")
    mark = (f"{GREEN}", f"{RESET}") if color else (LOSS_OPEN, LOSS_CLOSE)
    legend = "green" if color else f"between {LOSS_OPEN} and {LOSS_CLOSE}"
    out = head + [f"tokens that carry loss are {legend}", ""]
    for name, ex in shown:
        out += [f"--- {name}: {len(ex.ids)} tokens, {ex.n_loss} with loss ---"]
        out += [token_table(tok, ex) if tokens else marked_text(tok, ex, *mark), ""]
    return "\n".join(out).rstrip() + "\n"


def marked_text(tok: Tokenizer, ex: Example, start: str, end: str) -> str:
    """The decoded example with each run of loss-carrying tokens wrapped in start ... end."""
    parts, run, in_loss = [], [], False
    for token, loss in zip(ex.ids.tolist(), ex.mask.tolist()):
        if loss != in_loss and run:
            parts.append(_wrap(tok, run, in_loss, start, end))
            run = []
        run.append(token)
        in_loss = loss
    if run:
        parts.append(_wrap(tok, run, in_loss, start, end))
    return "".join(parts)


def _wrap(tok: Tokenizer, ids: list[int], loss: bool, start: str, end: str) -> str:
    text = "".join(_token_text(tok, i) for i in ids)
    return f"{start}{text}{end}" if loss else text


def _token_text(tok: Tokenizer, token: int) -> str:
    return "<|endoftext|>" if token == tok.eot_id else tok.decode([token])


def token_table(tok: Tokenizer, ex: Example) -> str:
    """One line per token: position, id, loss (yes/no), the token's text."""
    lines = [f"{'pos':>5} {'id':>6} loss  text"]
    for pos, (token, loss) in enumerate(zip(ex.ids.tolist(), ex.mask.tolist())):
        lines.append(f"{pos:>5} {token:>6} {'yes ' if loss else '    '}  {_token_text(tok, token)!r}")
    return "\n".join(lines)
