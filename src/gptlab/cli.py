"""`gptlab` command line: user-facing verbs outside the DAG.

    gptlab generate CHECKPOINT --prompt TEXT [--max_tokens 200] [--temperature 0.8] [--top_k 50] [--top_p 0.9]

temperature 0 is greedy. --question wraps the text in the sft prompt template ("Question: ...\\nAnswer:").
"""
from __future__ import annotations

import argparse
import sys

import torch

from gptlab.checkpoint import checkpoint_tokenizer, load_checkpoint
from gptlab.data.formats import format_prompt
from gptlab.sampling import generate


def generate_text(checkpoint: str, prompt: str, max_tokens: int, temperature: float, top_k: int, top_p: float,
                  seed: int, question: bool = False) -> str:
    model, _ = load_checkpoint(checkpoint)
    tok = checkpoint_tokenizer(checkpoint)
    text = format_prompt(prompt) if question else prompt
    ids = tok.encode(text) or [tok.eot_id]  # an empty prompt starts from end-of-text, like a new document
    gen = torch.Generator().manual_seed(seed)
    out = generate(model, [ids], max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   stop_id=tok.eot_id, generator=gen, n_vocab=tok.n_vocab)[0]
    return text + tok.decode(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gptlab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="sample a continuation from a checkpoint folder")
    g.add_argument("checkpoint", help="a checkpoint folder, e.g. checkpoints/dpo")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--question", action="store_true", help="wrap the prompt in the sft question template")
    g.add_argument("--max_tokens", type=int, default=200, help="new tokens at most (default 200)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top_k", type=int, default=50, help="keep the k most likely tokens; 0 = off (default 50)")
    g.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling mass; 1 = off (default 0.9)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    args = parser.parse_args(argv)
    try:
        print(generate_text(args.checkpoint, args.prompt, args.max_tokens, args.temperature, args.top_k,
                            args.top_p, args.seed, args.question))
    except ValueError as e:  # GptlabError (bad checkpoint) and bad sampling arguments alike
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
