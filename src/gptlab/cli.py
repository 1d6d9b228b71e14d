"""`gptlab` command line.

    gptlab generate CHECKPOINT --prompt TEXT [--chat] [--max_tokens 200] [--temperature 0.8] [--top_k 50] [--top_p 0.9]
    gptlab show-example {sft,dpo} [--index 0] [--heldout] [--tokens]
                                                     (one training example with its loss tokens marked)
    gptlab run STAGE [accelerate launch options]     (how dvc.yaml starts each stage; see gptlab.launch)
    gptlab plan [--preset NAME] [--gpus 1] [--peak_tflops 989] [--mfu 0.4] [--micro_batch_size B] [--json]
                                                     (what pretraining will cost; see gptlab.plan)

temperature 0 is greedy. --chat renders the prompt as a user turn in the template the checkpoint was fine-tuned
with (meta.json's "template"; see gptlab.data.formats), so the model answers as it learned to.
Bad input (an option out of range, a damaged checkpoint, a prompt the tokenizer cannot encode) ends with one
`error: ...` line and exit code 2; Ctrl-C with `error: interrupted` and 130.
"""
from __future__ import annotations

import argparse
import sys

# Only light imports up here: torch takes seconds to import, and a Ctrl-C meanwhile must still end with
# main's one line rather than a traceback, so the functions below import the heavy modules themselves.
from gptlab.config import GptlabError

# generate()'s argument names -> this command's options
OPTIONS = {"max_new_tokens": "--max_tokens", "temperature": "--temperature", "top_k": "--top_k",
           "top_p": "--top_p"}
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes an unsigned 64-bit seed


class UsageError(GptlabError):
    """A command-line option that cannot work; the message names the option."""


def generate_text(checkpoint: str, prompt: str, max_tokens: int, temperature: float, top_k: int, top_p: float,
                  seed: int, chat: bool = False) -> str:
    import torch

    from gptlab.checkpoint import checkpoint_tokenizer, load_checkpoint, read_meta
    from gptlab.sampling import generate
    from gptlab.tokenizer import TokenizerError

    tok = checkpoint_tokenizer(checkpoint)  # before the model: a prompt it cannot encode fails fast
    try:
        if chat:
            ids, text = chat_prompt(tok, read_meta(checkpoint), checkpoint, prompt)
        else:
            text = prompt
            ids = tok.encode(text) or [tok.eot_id]  # an empty prompt starts from end-of-text, like a new document
    except TokenizerError as e:  # a char tokenizer meeting a character its corpus never had
        raise UsageError(f"--prompt: {e}") from None
    model, _ = load_checkpoint(checkpoint)
    gen = torch.Generator().manual_seed(seed)
    out = generate(model, [ids], max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   stop_id=tok.eot_id, generator=gen, n_vocab=tok.n_vocab)[0]
    return text + tok.decode(out)


def chat_prompt(tok, meta: dict, checkpoint: str, prompt: str) -> tuple[list[int], str]:
    """The prompt as one user turn in the checkpoint's template: (ids, the text they decode to)."""
    from gptlab.data.formats import Message, encode_segments, prompt_for_generation

    template = meta.get("template")
    if template is None:
        raise UsageError(f"--chat: {checkpoint} was not fine-tuned (its meta.json names no template); "
                         "use an sft or dpo checkpoint, or leave out --chat")
    ids = encode_segments(tok, prompt_for_generation(template, (Message("user", prompt),))).ids.tolist()
    return ids, tok.decode(ids)


def show_text(args: argparse.Namespace) -> str:
    from gptlab.config import load_params
    from gptlab.show import show_example

    color = sys.stdout.isatty() and not args.tokens
    return show_example(load_params(args.params), args.stage, args.index, args.heldout, args.tokens, color)


def check_options(args: argparse.Namespace) -> None:
    """Reject `generate` options that cannot work, before anything is loaded."""
    from gptlab.sampling import SamplingArgError, check_sampling_args

    try:
        check_sampling_args(args.max_tokens, args.temperature, args.top_k, args.top_p)
    except SamplingArgError as e:
        raise UsageError(f"{OPTIONS[e.arg]}: {e.rule}, got {e.value}") from None
    if not 0 <= args.seed < SEED_LIMIT:
        raise UsageError(f"--seed: must lie in 0..2**64-1, got {args.seed}")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8 arrive as lone surrogates
        raise UsageError("--prompt: not valid UTF-8 text; pass the prompt in UTF-8") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptlab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="sample a continuation from a checkpoint folder")
    g.add_argument("checkpoint", help="a checkpoint folder, e.g. checkpoints/dpo")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--chat", action="store_true",
                   help="render the prompt as a user turn in the template the checkpoint was fine-tuned with")
    g.add_argument("--max_tokens", type=int, default=200, help="new tokens at most (default 200)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top_k", type=int, default=50, help="keep the k most likely tokens; 0 = off (default 50)")
    g.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling mass; 1 = off (default 0.9)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    r = sub.add_parser("run", add_help=False,
                       help="run a pipeline stage as dvc.yaml does: STAGE [accelerate launch options]")
    r.add_argument("launch_args", nargs=argparse.REMAINDER)  # gptlab.launch parses them, accelerate's too
    add_plan_parser(sub)
    e = sub.add_parser("show-example", help="print one sft example or dpo pair with its loss tokens marked")
    e.add_argument("stage", choices=("sft", "dpo"), help="whose data: sft.data or dpo.data")
    e.add_argument("--index", type=int, default=0, help="which record (default 0, the first)")
    e.add_argument("--heldout", action="store_true", help="from the held-out records instead of the training ones")
    e.add_argument("--tokens", action="store_true", help="one line per token (id, loss, text) instead of text")
    e.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    return p


def add_plan_parser(sub) -> None:
    from gptlab.plan import DEFAULT_GPUS, DEFAULT_MFU, DEFAULT_PEAK_TFLOPS  # light: no torch at import

    pl = sub.add_parser("plan", help="parameters, FLOPs, memory and time of the pretraining run, before it runs")
    pl.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    pl.add_argument("--preset", default=None, help="a preset of configs/presets/ (default: the one params names)")
    pl.add_argument("--gpus", type=int, default=DEFAULT_GPUS, help=f"data-parallel GPUs (default {DEFAULT_GPUS})")
    pl.add_argument("--peak_tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                    help=f"peak dense bf16 TFLOP/s per GPU (default {DEFAULT_PEAK_TFLOPS:g}, H100 SXM)")
    pl.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                    help=f"model FLOPs utilisation in (0, 1] (default {DEFAULT_MFU})")
    pl.add_argument("--micro_batch_size", type=int, default=None,
                    help="sequences per forward pass per GPU (default: pretrain.micro_batch_size)")
    pl.add_argument("--json", action="store_true", help="print a JSON object instead of text")


def plan_text(args: argparse.Namespace) -> str:
    import json

    from gptlab.config import load_params
    from gptlab.plan import check_assumptions, format_plan, plan

    check_assumptions(args.gpus, args.peak_tflops, args.mfu, args.micro_batch_size)  # before params load
    result = plan(load_params(args.params, args.preset), args.gpus, args.peak_tflops, args.mfu,
                  args.micro_batch_size)
    return json.dumps(result, indent=2) if args.json else format_plan(result)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # malformed options: argparse's usage message, exit 2
    if args.command == "run":
        from gptlab.launch import main as run_stage

        return run_stage(args.launch_args)
    try:
        if args.command == "plan":
            print(plan_text(args))
            return 0
        if args.command == "show-example":
            print(show_text(args), end="")
            return 0
        check_options(args)
        print(generate_text(args.checkpoint, args.prompt, args.max_tokens, args.temperature, args.top_k,
                            args.top_p, args.seed, args.chat))
    except GptlabError as e:  # bad options, checkpoints and tokenizers; anything else is a bug: traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
