"""evaluate: measure the pretrain, sft and dpo checkpoints on the same held-out sets.

Writes metrics/evaluate/metrics.json keyed by model (so `dvc metrics show` reads as a table) and
metrics/evaluate/samples.md with fixed-prompt samples from each model. Per model, results first: exact match,
preference and reward accuracy (each with its binomial standard error, `_stderr`), multiple choice under both
conventions (mc_lmeval, mc_llmc; see gptlab.evaluation), then the val-shard figures, and the SHA-256 of the
weights scored (checked against meta.json on load). Figures are rounded to 4 decimals, so `dvc metrics diff`
reads as a clean table.
"""
from __future__ import annotations

import math

import torch

from gptlab import paths
from gptlab.checkpoint import checkpoint_tokenizer, load_checkpoint
from gptlab.data.formats import Conversation, Message, Pair, encode_pairs, format_prompt
from gptlab.data.loader import Windows
from gptlab.data.records import INFO_FIELDS, read_mc, read_prefs, read_questions
from gptlab.data.world import answer_matches, style_of
from gptlab.evaluation import greedy_answers, multiple_choice_conventions, pair_logps, share, token_metrics
from gptlab.fileio import atomic_write_json, atomic_write_text, read_json
from gptlab.sampling import generate
from gptlab.stage import announce, read_split, run, start
from gptlab.tokenizer import load_tokenizer

MODELS = ("pretrain", "sft", "dpo")
N_SHOWN = 6  # greedy answers shown per model in samples.md


def take(rows: list, n: int) -> list:
    return rows if n == 0 else rows[:n]


def mc_source(ecfg) -> list[dict]:
    """The world's multiple-choice items, or evaluate.mc_path's (e.g. Rowan/hellaswag's validation split)."""
    if not ecfg.mc_path:
        return read_mc(paths.MC_EVAL)
    from gptlab.data.finetune import hub_mc_items

    return hub_mc_items(ecfg.mc_path, ecfg.mc_name, ecfg.mc_split, ecfg.mc_revision)


def answer_metrics(model, tok, questions: list[dict], max_new_tokens: int) -> tuple[dict, list[str]]:
    answers = greedy_answers(model, tok, [q["question"] for q in questions], max_new_tokens)
    exact = [answer_matches(a, q["answer"], q["candidates"]) for a, q in zip(answers, questions)]
    preferred = [style_of(a) == "preferred" for a in answers]
    return {**share(sum(exact), len(exact), "exact_match"), "preferred_style": sum(preferred) / len(preferred)}, answers


def preference_metrics(model, pairs, ref_logps, micro_batch_size: int, pad_id: int, beta: float) -> dict:
    """Share of held-out pairs where the chosen response is more likely; with a reference also the share
    where the implicit reward beta*(logp - ref_logp) of chosen beats rejected (the policy's own preference)."""
    chosen, rejected = pair_logps(model, pairs, micro_batch_size, pad_id)
    out = share(int((chosen > rejected).sum()), len(pairs), "pref_acc")
    if ref_logps is not None:
        margin = beta * ((chosen - ref_logps[0]) - (rejected - ref_logps[1]))
        out |= {**share(int((margin > 0).sum()), len(pairs), "reward_acc"), "reward_margin": margin.mean().item()}
    return out


def rounded(metrics: dict) -> dict:
    """4 decimals: what a `dvc metrics diff` reader can use (the stderrs are larger than that)."""
    return {k: rounded(v) if isinstance(v, dict) else round(v, 4) if isinstance(v, float) else v
            for k, v in metrics.items()}


def samples(model, tok, prompts: list[str], ecfg, seed: int) -> list[str]:
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    outs = generate(model, [tok.encode(p) for p in prompts], ecfg.max_new_tokens, temperature=ecfg.temperature,
                    top_k=ecfg.top_k, top_p=ecfg.top_p, stop_id=tok.eot_id, generator=gen, n_vocab=tok.n_vocab)
    return [tok.decode(o) for o in outs]


def main() -> None:
    params, accelerator = start("evaluate")
    if not accelerator.is_main_process:  # evaluation is small; one process does it all
        return
    ecfg, device = params.evaluate, accelerator.device
    info = read_json(paths.DATA_INFO, INFO_FIELDS)
    tok = load_tokenizer(paths.TOKENIZER)
    val = read_split("evaluate", "val", tok)
    questions = take(read_questions(paths.SFT_HELDOUT), ecfg.max_questions)
    mc_items = take(mc_source(ecfg), ecfg.max_mc_items)
    heldout_pairs = read_prefs(paths.PREFS_HELDOUT)[0]
    prompts = [format_prompt(q["question"]) for q in questions[: ecfg.n_samples // 2]]
    prompts += [item["ctx"] for item in mc_items[: ecfg.n_samples - len(prompts)]]

    metrics: dict[str, dict] = {"data": {"ln_vocab": math.log(tok.n_vocab)}}
    if "entropy_floor" in info:  # the world alone knows the loss a perfect model would reach
        metrics["data"] = {"entropy_floor": info["entropy_floor"], **metrics["data"]}
    report = ["# Samples", "", f"temperature {ecfg.temperature}, top_k {ecfg.top_k}, top_p {ecfg.top_p}", ""]
    checkpoints = {name: (*load_checkpoint(paths.checkpoint_dir(name), device),
                          checkpoint_tokenizer(paths.checkpoint_dir(name))) for name in MODELS}  # all checked first
    ref_logps = None
    for name, (model, meta, mtok) in checkpoints.items():
        model.eval()
        T = model.config.block_size
        pairs = encode_pairs(mtok, [Pair(Conversation("question", (Message("user", r["question"]),)), r["chosen"],
                                         r["rejected"]) for r in heldout_pairs], T, 0, str(paths.PREFS_HELDOUT)).items
        scores, answers = answer_metrics(model, mtok, questions, ecfg.max_new_tokens)
        m = dict(scores)
        beta = params.dpo.beta
        m |= preference_metrics(model, pairs, ref_logps if name == "dpo" else None, ecfg.micro_batch_size, mtok.eot_id, beta)
        if name == "sft":  # the sft model is the dpo model's reference
            ref_logps = pair_logps(model, pairs, ecfg.micro_batch_size, mtok.eot_id)
        m |= multiple_choice_conventions(model, mtok, mc_items, ecfg.micro_batch_size)
        if mtok.fingerprint == tok.fingerprint:  # the val shard's ids mean something to this model only then
            m |= token_metrics(model, Windows(val, T), ecfg.val_batches, ecfg.micro_batch_size, mtok.token_bytes())
        m["weights_sha256"] = meta["weights"]["sha256"]  # load_checkpoint checked the file against it
        m = rounded(m)
        metrics[name] = m
        announce(accelerator, f"evaluate {name}", {k: v for k, v in m.items() if not k.endswith("_stderr")})
        report += [f"## {name}", "", "Greedy answers to held-out questions (gold answer in brackets):", ""]
        report += [f"- {q['question']} [{q['answer']}] →{a}" for q, a in zip(questions[:N_SHOWN], answers)]
        report += ["", "Samples:", ""]
        for prompt, text in zip(prompts, samples(model, mtok, prompts, ecfg, params.seed)):
            report += ["```", prompt + text, "```", ""]

    atomic_write_json(paths.metrics_dir("evaluate") / "metrics.json", metrics)
    atomic_write_text(paths.metrics_dir("evaluate") / "samples.md", "\n".join(report))


if __name__ == "__main__":
    run(main)
