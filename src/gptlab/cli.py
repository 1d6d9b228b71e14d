"""`gptlab` command line.

    gptlab generate CHECKPOINT --prompt TEXT [--max_tokens 200] [--temperature 0.8] [--top_k 50] [--top_p 0.9]
    gptlab run STAGE [accelerate launch options]     (how dvc.yaml starts each stage; see gptlab.launch)

temperature 0 is greedy. --question wraps the text in the sft prompt template ("Question: ...\\nAnswer:").
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
                  seed: int, question: bool = False) -> str:
    import torch

    from gptlab.checkpoint import checkpoint_tokenizer, load_checkpoint
    from gptlab.data.formats import format_prompt
    from gptlab.sampling import generate
    from gptlab.tokenizer import TokenizerError

    tok = checkpoint_tokenizer(checkpoint)  # before the model: a prompt it cannot encode fails fast
    text = format_prompt(prompt) if question else prompt
    try:
        ids = tok.encode(text) or [tok.eot_id]  # an empty prompt starts from end-of-text, like a new document
    except TokenizerError as e:  # a char tokenizer meeting a character its corpus never had
        raise UsageError(f"--prompt: {e}") from None
    model, _ = load_checkpoint(checkpoint)
    gen = torch.Generator().manual_seed(seed)
    out = generate(model, [ids], max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   stop_id=tok.eot_id, generator=gen, n_vocab=tok.n_vocab)[0]
    return text + tok.decode(out)


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
    g.add_argument("--question", action="store_true", help="wrap the prompt in the sft question template")
    g.add_argument("--max_tokens", type=int, default=200, help="new tokens at most (default 200)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top_k", type=int, default=50, help="keep the k most likely tokens; 0 = off (default 50)")
    g.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling mass; 1 = off (default 0.9)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    r = sub.add_parser("run", add_help=False,
                       help="run a pipeline stage as dvc.yaml does: STAGE [accelerate launch options]")
    r.add_argument("launch_args", nargs=argparse.REMAINDER)  # gptlab.launch parses them, accelerate's too
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # malformed options: argparse's usage message, exit 2
    if args.command == "run":
        from gptlab.launch import main as run_stage

        return run_stage(args.launch_args)
    try:
        check_options(args)
        print(generate_text(args.checkpoint, args.prompt, args.max_tokens, args.temperature, args.top_k,
                            args.top_p, args.seed, args.question))
    except GptlabError as e:  # bad options, checkpoints and tokenizers; anything else is a bug: traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
