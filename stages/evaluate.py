"""evaluate@NAME: one model's scores on the held-out sets (NAME: a key of evaluate.models in params.yaml).

dvc.yaml runs one evaluate stage per model (foreach over evaluate.models), so an experiment that changes only
dpo rescores only dpo. The model is a pipeline checkpoint or a folder under models/: a gptlab checkpoint, or a
Hugging Face GPT-2 (an export-hf folder, the hub's gpt2). It writes metrics/evaluate/NAME/:

  metrics.json  results first: exact match on held-out instructions, preference accuracy and, for a dpo model,
                reward accuracy and margin (each accuracy with its binomial standard error, `_stderr`);
                multiple choice under both conventions (mc_lmeval, mc_llmc: see gptlab.evaluation); then the
                val-shard figures (for a model whose tokenizer made the shards) and the SHA-256 of the weights
                scored. 4 decimals, so `dvc metrics diff` reads as a clean table.
  scores.json   the accuracies as rows (metric, value, stderr): the data of dvc.yaml's `evaluation` plot
  samples.md    greedy answers to the first held-out instructions, and samples from fixed prompts

Held-out instructions: with sft.data format world, the world's held-out questions, right when the answer names
the true value (and `preferred_style`: the share in the terse style dpo prefers); with other sft data, the
held-out conversations' last assistant turns, right on SQuAD-normalised exact match. Preference pairs: dpo.data's
held-out pairs, encoded as dpo encodes them; a dpo model's reward uses the reference log-probs dpo trained
against (data/ref_logps) and the beta in its meta.json.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch

from gptlab import paths, ref_logps
from gptlab.checkpoint import load_model
from gptlab.config import MODEL_NAME, PIPELINE_MODELS, GptlabError
from gptlab.data.finetune import hub_mc_items, sft_sets
from gptlab.data.formats import Conversation, Message, encode_segments, segments
from gptlab.data.loader import Windows
from gptlab.data.records import read_mc, read_questions
from gptlab.data.world import answer_matches, style_of
from gptlab.evaluation import (
    greedy_answers,
    multiple_choice_conventions,
    normalize_answer,
    pair_logps,
    share,
    token_metrics,
)
from gptlab.fileio import replace_folder, write_new
from gptlab.sampling import Sampling, generate
from gptlab.stage import announce, read_split, run, say, start
from gptlab.tokenizer import load_tokenizer

N_SHOWN = 6  # greedy answers shown in samples.md
# the accuracies the comparison plot shows: (row name, path in metrics.json)
PLOTTED = (("exact_match", ("exact_match",)), ("pref_acc", ("pref_acc",)), ("reward_acc", ("reward_acc",)),
           ("mc_lmeval acc_norm", ("mc_lmeval", "acc_norm")), ("mc_llmc acc_norm", ("mc_llmc", "acc_norm")),
           ("top1_acc", ("top1_acc",)), ("top5_acc", ("top5_acc",)))


@dataclass(frozen=True)
class Instruction:
    conv: Conversation  # up to the user turn the model answers
    reference: str  # the held-out answer
    candidates: tuple[str, ...] = ()  # the world's: every value the question's attribute can take


def take(rows: list, n: int) -> list:
    return rows if n == 0 else rows[:n]


def model_name(argv: list[str], models: dict[str, str]) -> str:
    if len(argv) != 1 or argv[0] not in models:
        got = f"got {' '.join(argv)!r}" if argv else "got none"
        raise GptlabError(f"evaluate: name one model of evaluate.models ({', '.join(models)}), {got}; dvc.yaml "
                          f"runs `gptlab run evaluate@NAME` for each")
    return argv[0]


def instructions(params) -> list[Instruction]:
    cfg = params.sft.data
    if cfg.format == "world":
        return [Instruction(Conversation("question", (Message("user", q["question"]),)), q["answer"],
                            tuple(q["candidates"])) for q in read_questions(paths.SFT_HELDOUT)]
    return [Instruction(Conversation(c.template, c.messages[:-1], c.context), c.messages[-1].content)
            for c in sft_sets(cfg, params.seed).heldout]


def mc_source(ecfg) -> list[dict]:
    """The world's multiple-choice items, or evaluate.mc_path's (e.g. Rowan/hellaswag's validation split)."""
    if not ecfg.mc_path:
        return read_mc(paths.MC_EVAL)
    return hub_mc_items(ecfg.mc_path, ecfg.mc_name, ecfg.mc_split, ecfg.mc_revision)


def answer_metrics(model, tok, items: list[Instruction], max_new_tokens: int) -> tuple[dict, list[str]]:
    answers = greedy_answers(model, tok, [i.conv for i in items], max_new_tokens)
    if items and items[0].candidates:  # the world: right when the answer names the true value
        exact = [answer_matches(a, i.reference, i.candidates) for a, i in zip(answers, items)]
        preferred = [style_of(a) == "preferred" for a in answers]
        return {**share(sum(exact), len(exact), "exact_match"), "preferred_style": sum(preferred) / len(preferred)}, answers
    exact = [normalize_answer(a) == normalize_answer(i.reference) for a, i in zip(answers, items)]
    return share(sum(exact), len(exact), "exact_match"), answers


def preference_metrics(model, meta: dict, tok, params, strict: bool, note) -> dict:
    """Share of held-out pairs where the chosen response is more likely; for a dpo model also the share where
    its implicit reward beta*(logp - ref_logp) of chosen beats rejected, and the mean reward margin."""
    ecfg, dcfg = params.evaluate, params.dpo
    encoded = ref_logps.encoded_sets(dcfg, params.seed, tok, model.config.block_size, ("heldout",))[1]["heldout"].items
    pairs = take(encoded, ecfg.max_pairs)
    chosen, rejected = pair_logps(model, pairs, ecfg.micro_batch_size, tok.eot_id)
    out = share(int((chosen > rejected).sum()), len(pairs), "pref_acc")
    if meta.get("stage") != "dpo":
        return out
    try:
        if "init_sha256" not in meta:
            raise GptlabError(f"{meta['init_from']}'s meta.json does not name its reference weights (made by an "
                              "older gptlab); rerun dpo")
        ref_chosen, ref_rejected = ref_logps.read(meta["init_sha256"],
                                                  {"heldout": ref_logps.pairs_fingerprint(encoded)})["heldout"]
    except GptlabError as e:
        if strict:  # the pipeline's own dpo model: its reference must be there
            raise
        note(f"no reward_acc or reward_margin: {e}")
        return out
    beta = meta["params"]["dpo"]["beta"]
    n = len(pairs)
    margin = beta * ((chosen - ref_chosen[:n]) - (rejected - ref_rejected[:n]))
    return out | {**share(int((margin > 0).sum()), n, "reward_acc"), "reward_margin": margin.mean().item()}


def rounded(metrics: dict) -> dict:
    """4 decimals: what a `dvc metrics diff` reader can use (the stderrs are larger than that)."""
    return {k: rounded(v) if isinstance(v, dict) else round(v, 4) if isinstance(v, float) else v
            for k, v in metrics.items()}


def score_rows(metrics: dict) -> list[dict]:
    """The accuracies (and their stderrs) as rows, for a bar chart that compares models."""
    rows = []
    for label, where in PLOTTED:
        parent = metrics
        for key in where[:-1]:
            parent = parent.get(key, {})
        if where[-1] in parent:
            rows.append({"metric": label, "value": parent[where[-1]], "stderr": parent.get(f"{where[-1]}_stderr")})
    return rows


def samples(model, tok, prompts: list[list[int]], ecfg, seed: int) -> list[str]:
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    settings = Sampling(ecfg.max_new_tokens, ecfg.temperature, ecfg.top_k, ecfg.top_p, stop_id=tok.eot_id)
    outs = generate(model, prompts, settings, generator=gen, n_vocab=tok.n_vocab)
    return [tok.decode(o) for o in outs]


def report(name: str, folder: str, items, answers, prompts, texts, tok, ecfg) -> str:
    lines = [f"# {name} ({folder})", "", "Greedy answers to held-out instructions (the held-out answer in brackets):", ""]
    lines += [f"- {i.conv.messages[-1].content} [{i.reference}] →{a}" for i, a in zip(items[:N_SHOWN], answers)]
    lines += ["", f"Samples (temperature {ecfg.temperature}, top_k {ecfg.top_k}, top_p {ecfg.top_p}):", ""]
    for prompt, text in zip(prompts, texts):
        lines += ["```", tok.decode(prompt) + text, "```", ""]
    return "\n".join(lines)


def main() -> None:
    arg = sys.argv[1] if len(sys.argv) == 2 and MODEL_NAME.fullmatch(sys.argv[1]) else ""
    params, accelerator = start(f"evaluate@{arg}" if arg else "evaluate")
    if not accelerator.is_main_process:  # evaluation is small; one process does it all
        return
    ecfg, device = params.evaluate, accelerator.device
    name = model_name(sys.argv[1:], ecfg.models)
    folder = ecfg.models[name]
    model, tok, meta = load_model(folder, device)  # all input checked (the weights' SHA-256 too) before any scoring
    model.eval()
    data_tok = load_tokenizer(paths.TOKENIZER)
    val = read_split("evaluate", "val", data_tok) if tok.fingerprint == data_tok.fingerprint else None
    items = take(instructions(params), ecfg.max_questions)
    mc_items = take(mc_source(ecfg), ecfg.max_mc_items)

    m, answers = answer_metrics(model, tok, items, ecfg.max_new_tokens)
    m |= preference_metrics(model, meta, tok, params, folder == PIPELINE_MODELS["dpo"],
                            lambda text: say(accelerator, f"[evaluate@{name}] {text}"))
    m |= multiple_choice_conventions(model, tok, mc_items, ecfg.micro_batch_size)
    if val is not None:  # the val shard's ids mean something to this model only then
        m |= token_metrics(model, Windows(val, model.config.block_size), ecfg.val_batches, ecfg.micro_batch_size,
                           tok.token_bytes())
    m["weights_sha256"] = meta["weights"]["sha256"]  # of the file scored: load_model checked or computed it
    m = rounded(m)
    shown = {k: v for k, v in m.items() if not k.endswith("_stderr") and k != "weights_sha256"}
    announce(accelerator, f"evaluate@{name}", {"model": f"{folder} ({meta['stage']}, step {meta['step']})", **shown,
                                               **({} if val is not None else {"val shard": "skipped (another tokenizer)"})})

    prompts = [encode_segments(tok, segments(i.conv, generating=True)).ids.tolist() for i in items[: ecfg.n_samples // 2]]
    prompts += [tok.encode(item["ctx"]) for item in mc_items[: ecfg.n_samples - len(prompts)]]
    texts = samples(model, tok, prompts, ecfg, params.seed)
    # the three files in one swap, once all is computed: a failure or a kill leaves the previous scores whole
    with replace_folder(paths.metrics_dir("evaluate") / name) as out:
        write_new(out / "metrics.json", (json.dumps(m, indent=2) + "\n").encode())
        write_new(out / "scores.json", (json.dumps(score_rows(m), indent=1) + "\n").encode())
        write_new(out / "samples.md", report(name, folder, items, answers, prompts, texts, tok, ecfg).encode())


if __name__ == "__main__":
    run(main)
