"""`gptlab` command line.

    gptlab generate CHECKPOINT [--prompt TEXT] [--chat] [--max_tokens 200] [--temperature 0.8] [--top_k 50]
                    [--top_p 0.9] [--repetition_penalty 1.0] [--num_samples 1] [--seed 0] [--stop STR ...]
                    [--no_cache]
    gptlab show-example {sft,dpo} [--index 0] [--heldout] [--tokens]
                                                     (one training example with its loss tokens marked)
    gptlab export-hf CHECKPOINT OUT_DIR [--overwrite]  (a transformers GPT2LMHeadModel folder; see gptlab.export_hf)
    gptlab info CHECKPOINT [--params] [--json]         (what made it: lineage with hashes, params)
    gptlab run STAGE [accelerate launch options]     (how dvc.yaml starts each stage, evaluate@MODEL too; see gptlab.launch)
    gptlab plan [--preset NAME] [--gpus 1] [--peak_tflops 989] [--mfu 0.4] [--micro_batch_size B] [--json]
                                                     (what pretraining will cost; see gptlab.plan)

CHECKPOINT: a gptlab checkpoint folder or a Hugging Face GPT-2 folder (config.json + safetensors, e.g. the hub's
gpt2 or an export-hf folder). generate, export-hf and info open it as sft.init and evaluate.models do
(gptlab.checkpoint.load_model), so all accept the same folders and refuse the others with the same line.

generate: temperature 0 is greedy. Without --prompt the prompt is read from stdin (one trailing newline
dropped). The text streams out as it is made; --num_samples N draws N samples of the prompt together and prints
each whole after a `--- sample i ---` line. A sample ends at end-of-text, after --max_tokens, or where its text
first contains a --stop string (cut off). --chat renders the prompt as a user turn in the template the
checkpoint was fine-tuned with (meta.json's "template"; see gptlab.data.formats), so the model answers as it
learned to; with no --prompt and stdin a terminal it holds a conversation: a line from you, the answer, and so
on, each turn rendered with everything said before, until an empty line or end of input.
Bad input (an option out of range, a damaged checkpoint, a prompt the tokenizer cannot encode) ends with one
`error: ...` line and exit code 2; Ctrl-C with `error: interrupted` and 130, from the moment the command
starts; a reader that stops early (`gptlab ... | head -1`) with nothing more and 141, as for a command that
SIGPIPE ends. generate refuses a --max_tokens or --num_samples that cannot fit before it loads the model:
more than gptlab.sampling.MAX_TOKENS tokens a sample, or more memory than is free (gptlab.sampling.check_size).
"""
from __future__ import annotations

import signal
import sys

_early_interrupt = False  # a Ctrl-C came while this module's imports ran: main reports it


def _note_interrupt(signum, frame) -> None:
    global _early_interrupt
    _early_interrupt = True


def _defer_interrupts() -> bool:
    """Hold a Ctrl-C back while the imports below run (the console script imports this module before it can
    call main, so an interrupt there would be a traceback); main reports it. Leaves an ignored SIGINT (a
    background job) or another handler alone, and is skipped outside the main thread (where it cannot be
    set)."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return False
    try:
        signal.signal(signal.SIGINT, _note_interrupt)
    except ValueError:
        return False
    return True


_DEFERRED = _defer_interrupts()
try:
    import argparse
    import os
    from collections.abc import Callable
    from contextlib import closing
    from dataclasses import dataclass

    # Only light imports up here: torch takes seconds to import, and a Ctrl-C meanwhile must still end with
    # main's one line rather than a traceback, so the functions below import the heavy modules themselves.
    from gptlab.config import GptlabError
finally:
    if _DEFERRED:
        signal.signal(signal.SIGINT, signal.default_int_handler)

# generate()'s argument names -> this command's options
OPTIONS = {"max_new_tokens": "--max_tokens", "temperature": "--temperature", "top_k": "--top_k",
           "top_p": "--top_p", "repetition_penalty": "--repetition_penalty",
           "rows": "--num_samples"}  # rows: samples decoded together (gptlab.sampling.check_size)
PIPE_CLOSED = 128 + 13  # what the shell reports for a command SIGPIPE cut off (`... | head -1`)
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes an unsigned 64-bit seed
CHAT_CUE = "> "  # what the conversation loop writes before it reads your line
MODEL_ARG = "a gptlab checkpoint or a Hugging Face GPT-2 folder: every command opens it with gptlab.checkpoint.load_model"
Write = Callable[[str], None]


class UsageError(GptlabError):
    """A command-line option that cannot work; the message names the option."""


@dataclass(frozen=True)
class Sampling:
    """How `gptlab generate` samples (its options, as check_options accepts them)."""

    max_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    num_samples: int = 1
    seed: int = 0
    stop: tuple[str, ...] = ()
    use_cache: bool = True

    @classmethod
    def of(cls, args: argparse.Namespace) -> Sampling:
        return cls(args.max_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                   args.num_samples, args.seed, tuple(args.stop or ()), not args.no_cache)


def generate_text(checkpoint: str, prompt: str, max_tokens: int, temperature: float, top_k: int, top_p: float,
                  seed: int, chat: bool = False, *, repetition_penalty: float = 1.0, num_samples: int = 1,
                  stop: tuple[str, ...] = (), use_cache: bool = True, write: Write | None = None) -> str:
    """The prompt's text (with --chat: rendered in the template) and its continuation; with num_samples > 1,
    every sample so, each after a `--- sample i ---` line. write, if given, gets the same text as it is made."""
    import torch

    from gptlab.checkpoint import load_model
    from gptlab.data.formats import Message
    from gptlab.tokenizer import TokenizerError

    s = Sampling(max_tokens, temperature, top_k, top_p, repetition_penalty, num_samples, seed, tuple(stop), use_cache)
    check_size(checkpoint, s)
    model, tok, meta = load_model(checkpoint)  # a gptlab checkpoint or a Hugging Face GPT-2 folder
    try:
        if chat:
            ids, text = chat_prompt(tok, chat_template(meta, checkpoint), (Message("user", prompt),))
        else:
            text = prompt
            ids = tok.encode(text) or [tok.eot_id]  # an empty prompt starts from end-of-text, like a new document
    except TokenizerError as e:  # a char tokenizer meeting a character its corpus never had
        raise UsageError(f"--prompt: {e}") from None
    gen = torch.Generator().manual_seed(seed)
    write = write or (lambda piece: None)
    if num_samples == 1:
        write(text)
        return text + sample_texts(model, tok, ids, s, gen, write)[0]
    samples = sample_texts(model, tok, ids, s, gen)  # no streaming: each sample is printed whole
    out = "\n".join(f"--- sample {i + 1} ---\n{text}{new}" for i, new in enumerate(samples))
    write(out)
    return out


def chat_template(meta: dict, checkpoint: str) -> str:
    template = meta.get("template")
    if template is None:
        raise UsageError(f"--chat: {checkpoint} was not fine-tuned (its meta.json names no template); "
                         "use an sft or dpo checkpoint, or leave out --chat")
    return template


def chat_prompt(tok, template: str, messages: tuple) -> tuple[list[int], str]:
    """The conversation so far (Messages, the last one the user's) in the template, ending with the cue the
    answer follows, exactly as training renders it: (ids, the text they decode to)."""
    from gptlab.data.formats import encode_segments, prompt_for_generation

    ids = encode_segments(tok, prompt_for_generation(template, messages)).ids.tolist()
    return ids, tok.decode(ids)


def chat_loop(checkpoint: str, s: Sampling, read: Callable[[], str], write: Write) -> None:
    """A conversation: read a line, answer it in the checkpoint's template with everything said before, repeat
    until an empty line or end of input. A line the tokenizer cannot encode is refused and the talk goes on."""
    import torch

    from gptlab.checkpoint import load_model
    from gptlab.data.formats import Message
    from gptlab.tokenizer import TokenizerError

    check_size(checkpoint, s)
    model, tok, meta = load_model(checkpoint)
    template = chat_template(meta, checkpoint)
    gen = torch.Generator().manual_seed(s.seed)
    said: tuple = ()
    while True:
        write(CHAT_CUE)
        line = read().rstrip("\r\n")
        if not line:  # an empty line, or end of input ("")
            write("\n")
            return
        asked = said + (Message("user", line),)
        try:
            ids, _ = chat_prompt(tok, template, asked)
        except TokenizerError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        answer = sample_texts(model, tok, ids, s, gen, write)[0]
        write("\n")
        said = asked + (Message("assistant", answer_content(template, answer)),)


def answer_content(template: str, answer: str) -> str:
    """The message whose rendering is the answer's text: the chat template writes an assistant message as
    " " + content (gptlab.data.formats), the others as the content itself."""
    return answer[1:] if template == "chat" and answer.startswith(" ") else answer


class Continuation:
    """One sample's text as its tokens arrive. It ends at end-of-text or where the text first contains a stop
    string (cut there); `fresh` hands out the text not yet written that can no longer change."""

    def __init__(self, tok, stop: tuple[str, ...]):
        self.tok, self.stop = tok, stop
        self.ids: list[int] = []
        self.text = ""
        self.done = False
        self.shown = 0  # characters handed out so far

    def add(self, token: int) -> None:
        if token == self.tok.eot_id:
            self.done = True
            return
        self.ids.append(token)
        # the whole row again: a character's bytes may be split across tokens, and only the whole decodes right
        self.text = self.tok.decode(self.ids)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.done = self.text[:min(hits)], True

    def fresh(self) -> str:
        end = len(self.text)
        if not self.done:
            end = len(self.text.rstrip("\ufffd"))  # a character whose last bytes have not come yet
            end -= _stop_start(self.text[:end], self.stop)  # may still become a stop string
        piece = self.text[self.shown:end]
        self.shown = max(self.shown, end)
        return piece


def _stop_start(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest end of text that is the beginning of a stop string."""
    return max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def sample_texts(model, tok, ids: list[int], s: Sampling, gen, write: Write | None = None) -> list[str]:
    """s.num_samples continuations of ids, decoded together; with one, write gets its text as it is made."""
    from gptlab import sampling

    rows = [Continuation(tok, s.stop) for _ in range(s.num_samples)]
    settings = sampling.Sampling(s.max_tokens, s.temperature, s.top_k, s.top_p, s.repetition_penalty)
    steps = sampling.stream(model, [ids] * s.num_samples, settings, generator=gen, n_vocab=tok.n_vocab,
                            use_cache=s.use_cache)
    try:
        # closing: stops decoding (and restores the model's mode) as soon as every sample has ended
        with closing(steps):
            for step in steps:
                for row, token in zip(rows, step.tolist()):
                    if not row.done:
                        row.add(token)
                if write is not None:
                    write(rows[0].fresh())
                if all(row.done for row in rows):
                    break
    except sampling.SamplingArgError as e:  # the first step's size check: the prompt is longer than guessed
        raise option_error(e) from None
    for row in rows:
        row.done = True  # out of tokens: what was held back is final
    if write is not None:
        write(rows[0].fresh())
    return [row.text for row in rows]


def show_text(args: argparse.Namespace) -> str:
    from gptlab.config import load_params
    from gptlab.show import show_example

    color = sys.stdout.isatty() and not args.tokens
    return show_example(load_params(args.params), args.stage, args.index, args.heldout, args.tokens, color)


def check_options(args: argparse.Namespace) -> None:
    """Reject `generate` options that cannot work, before anything is loaded."""
    from gptlab import sampling

    try:
        sampling.Sampling(args.max_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    except sampling.SamplingArgError as e:
        raise option_error(e) from None
    if not args.num_samples >= 1:
        raise UsageError(f"--num_samples: must be at least 1, got {args.num_samples}")
    if not 0 <= args.seed < SEED_LIMIT:
        raise UsageError(f"--seed: must lie in 0..2**64-1, got {args.seed}")
    if args.prompt is not None:
        check_text(args.prompt, "--prompt")
    for stop in args.stop or ():
        if not stop:  # it would be found before the first token
            raise UsageError("--stop: must not be empty")
        check_text(stop, "--stop")


def option_error(e) -> UsageError:
    """A gptlab.sampling.SamplingArgError, naming this command's option."""
    return UsageError(f"{OPTIONS[e.arg]}: {e.rule}, got {e.value}")


def check_size(checkpoint: str, s: Sampling) -> None:
    """Refuse a --max_tokens or --num_samples too big to decode, from the folder's JSON files alone: before
    the weights are loaded or anything is allocated. The prompt counts as one token here (it is not encoded
    yet); the first decoding step checks again with its real length."""
    import torch

    from gptlab import sampling
    from gptlab.checkpoint import check_model_folder

    config = check_model_folder(checkpoint).config
    try:
        sampling.check_size(config, s.num_samples, 1, s.max_tokens, torch.device("cpu"))  # where it loads
    except sampling.SamplingArgError as e:
        raise option_error(e) from None


def check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8 arrive as lone surrogates
        raise UsageError(f"{where}: not valid UTF-8 text; pass it in UTF-8") from None


def read_prompt(stdin) -> str:
    """The prompt piped in on stdin, less one trailing newline (the one `echo` adds)."""
    try:
        text = stdin.read()
    except UnicodeDecodeError:
        raise UsageError("stdin: not valid UTF-8 text; pass the prompt in UTF-8") from None
    check_text(text, "stdin")
    return text.removesuffix("\n")


def run_generate(args: argparse.Namespace) -> None:
    check_options(args)
    s = Sampling.of(args)
    if args.prompt is None and sys.stdin.isatty():
        if not args.chat:
            raise UsageError("--prompt: give the prompt with --prompt or on stdin (or talk turn by turn with --chat)")
        if s.num_samples != 1:
            raise UsageError(f"--num_samples: a --chat conversation takes one answer a turn, got {s.num_samples}")
        chat_loop(args.checkpoint, s, sys.stdin.readline, write_out)
        return
    prompt = read_prompt(sys.stdin) if args.prompt is None else args.prompt
    generate_text(args.checkpoint, prompt, s.max_tokens, s.temperature, s.top_k, s.top_p, s.seed, args.chat,
                  repetition_penalty=s.repetition_penalty, num_samples=s.num_samples, stop=s.stop,
                  use_cache=s.use_cache, write=write_out)
    write_out("\n")


def write_out(piece: str) -> None:
    if piece:
        sys.stdout.write(piece)
        sys.stdout.flush()  # the text appears as it is made


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptlab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    r = sub.add_parser("run", add_help=False,
                       help="run a pipeline stage as dvc.yaml does: STAGE (evaluate@MODEL for evaluate) [accelerate launch options]")
    r.add_argument("launch_args", nargs=argparse.REMAINDER)  # gptlab.launch parses them, accelerate's too
    add_plan_parser(sub)
    e = sub.add_parser("show-example", help="print one sft example or dpo pair with its loss tokens marked")
    e.add_argument("stage", choices=("sft", "dpo"), help="whose data: sft.data or dpo.data")
    e.add_argument("--index", type=int, default=0, help="which record (default 0, the first)")
    e.add_argument("--heldout", action="store_true", help="from the held-out records instead of the training ones")
    e.add_argument("--tokens", action="store_true", help="one line per token (id, loss, text) instead of text")
    e.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    x = sub.add_parser("export-hf", help="write a checkpoint as a transformers GPT2LMHeadModel folder")
    x.add_argument("checkpoint", help=f"a model folder, e.g. checkpoints/dpo ({MODEL_ARG})")
    x.add_argument("out_dir", help="folder to create (transformers, lm-evaluation-harness and vLLM load it)")
    x.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    i = sub.add_parser("info", help="what made a checkpoint: its lineage (pretrain -> sft -> dpo) with each hash")
    i.add_argument("checkpoint", help=f"a model folder, e.g. checkpoints/dpo ({MODEL_ARG}; an export-hf folder "
                                      "tells its checkpoint's)")
    i.add_argument("--params", action="store_true", help="also list the resolved params it was made with")
    i.add_argument("--json", action="store_true", help="print meta.json's provenance fields as JSON")
    return p


def info_text(args: argparse.Namespace) -> str:
    import json

    from gptlab.provenance import PROVENANCE_FIELDS, describe, read_provenance

    if args.json:
        meta = read_provenance(args.checkpoint)[0]
        return json.dumps({k: meta[k] for k in PROVENANCE_FIELDS if k in meta}, indent=2)
    return describe(args.checkpoint, args.params)


def export_text(args: argparse.Namespace) -> str:
    from gptlab.export_hf import export_hf

    s = export_hf(args.checkpoint, args.out_dir, overwrite=args.overwrite)
    missing = "" if s["tokenizer_exported"] else f" (no HF tokenizer for kind {s['tokenizer_kind']}: see its README.md)"
    return f"wrote {s['out_dir']}: {', '.join(s['files'])}{missing}"


def add_generate_parser(sub) -> None:
    d = Sampling()
    g = sub.add_parser("generate", help="sample a continuation from a checkpoint folder")
    g.add_argument("checkpoint", help=f"a model folder, e.g. checkpoints/dpo ({MODEL_ARG})")
    g.add_argument("--prompt", default=None, help="text to continue (default: read from stdin)")
    g.add_argument("--chat", action="store_true",
                   help="render the prompt as a user turn in the template the checkpoint was fine-tuned with; "
                        "without --prompt, on a terminal: a conversation, one line a turn")
    g.add_argument("--max_tokens", type=int, default=d.max_tokens, help=f"new tokens at most (default {d.max_tokens})")
    g.add_argument("--temperature", type=float, default=d.temperature, help=f"0 = greedy (default {d.temperature})")
    g.add_argument("--top_k", type=int, default=d.top_k,
                   help=f"keep the k most likely tokens; 0 = off (default {d.top_k})")
    g.add_argument("--top_p", type=float, default=d.top_p, help=f"nucleus sampling mass; 1 = off (default {d.top_p})")
    g.add_argument("--repetition_penalty", type=float, default=d.repetition_penalty,
                   help="divide the positive logits of tokens already in the text by this, multiply the negative "
                        "ones (CTRL's penalty, as in transformers); 1 = off (default 1)")
    g.add_argument("--num_samples", type=int, default=d.num_samples,
                   help="samples of the prompt, drawn together (default 1)")
    g.add_argument("--seed", type=int, default=d.seed, help=f"sampling seed (default {d.seed})")
    g.add_argument("--stop", action="append", default=None, metavar="STR",
                   help="end a sample where its text first contains STR, cut there (repeatable)")
    g.add_argument("--no_cache", action="store_true",
                   help="recompute every position at every step instead of keeping a KV cache (slow; same tokens)")


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
    global _early_interrupt
    try:
        if _early_interrupt:  # held back while this module was imported
            _early_interrupt = False
            raise KeyboardInterrupt
        code = run_command(parser().parse_args(argv))  # malformed options: argparse's usage message, exit 2
        sys.stdout.flush()  # here, where a closed pipe is caught, rather than at exit
        return code
    except GptlabError as e:  # bad options, checkpoints and tokenizers; anything else is a bug: traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return pipe_closed()


def run_command(args: argparse.Namespace) -> int:
    if args.command == "run":
        from gptlab.launch import main as run_stage

        return run_stage(args.launch_args)
    if args.command == "generate":
        run_generate(args)
        return 0
    text = {"plan": plan_text, "show-example": show_text, "export-hf": export_text, "info": info_text}
    print(text[args.command](args), end="" if args.command == "show-example" else "\n")
    return 0


def pipe_closed() -> int:
    """Whoever read stdout stopped (`gptlab info ... | head -1`): end quietly, as cat or yes do. Python
    flushes stdout once more at exit and would report the same broken pipe there, so stdout now goes to
    devnull."""
    try:
        stdout = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # stdout is no file (a test's capture): nothing to flush
        return PIPE_CLOSED
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stdout)
    os.close(devnull)
    return PIPE_CLOSED


if __name__ == "__main__":
    sys.exit(main())
