"""Templates, loss masks, truncation and batching for fine-tuning examples (sft) and preference pairs (dpo).

A conversation (system/user/assistant messages) becomes text through one template, chosen by the data's
format and recorded in the checkpoint, so training, evaluation and `gptlab generate --chat` render it alike:

    question (format world)          Question: {user}\\nAnswer:{assistant}<|endoftext|>
    alpaca   (format alpaca)         Stanford Alpaca's prompt: a preamble, then
                                     ### Instruction:\\n{user}\\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n{assistant}<|endoftext|>
    chat     (messages, hh_rlhf,     [{system}]\\n\\nHuman: {user}\\n\\nAssistant: {assistant}<|endoftext|> ...
              preference as lists)   (HH-RLHF's own dialogue format, so its records render as they were written)
    plain    (prompt_completion,     {prompt}{completion}<|endoftext|>: the text as given
              preference as strings)

Each template piece is tokenized on its own and the ids joined, so a response tokenizes the same whatever
precedes it. Loss is on every assistant response and the end-of-text that closes it (the model learns to
answer, and to stop); in a preference pair, on the final response only. Several turns repeat the pattern.

Truncation to the context (block_size + 1 tokens: block_size inputs and one more target): the prompt
(everything before the first loss token) keeps at most max_prompt_tokens of its last tokens (0 = no cap but
the context), then the end is cut to fit. An example left with no loss token is dropped and counted.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from gptlab.config import GptlabError
from gptlab.fileio import REGENERATE
from gptlab.losses import IGNORE
from gptlab.tokenizer import Tokenizer, TokenizerError

ROLES = ("system", "user", "assistant")
TEMPLATES = ("question", "alpaca", "chat", "plain")
QUESTION_PROMPT = "Question: {question}\nAnswer:"
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. Write a response that appropriately completes the request.\n\n")
CHAT_LABELS = {"user": "\n\nHuman:", "assistant": "\n\nAssistant:"}  # HH-RLHF's speaker markers
EOT = None  # a segment that stands for the end-of-text token (no text encodes to it)


def format_prompt(question: str) -> str:
    """The world's question template, up to where the answer starts."""
    return QUESTION_PROMPT.format(question=question)


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str


@dataclass(frozen=True)
class Conversation:
    """Messages in order; alpaca records also carry their `input` field (context)."""

    template: str
    messages: tuple[Message, ...]
    context: str = ""


def check_roles(messages: tuple[Message, ...], where: str, generating: bool = False) -> None:
    """An optional system message first, then user and assistant turns alternating, starting with user and
    ending with an assistant response (or, for generation, a user turn)."""
    roles = [m.role for m in messages]
    for r in roles:
        if r not in ROLES:
            raise GptlabError(f"{where}: role {r!r} is not one of {ROLES}")
    turns = roles[1:] if roles[:1] == ["system"] else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    last = "user" if generating else "assistant"
    if not turns or turns != expected or turns[-1] != last:
        raise GptlabError(f"{where}: messages have roles {roles}; expected an optional system message, then user "
                          f"and assistant turns alternating, starting with user and ending with {last}")


def segments(conv: Conversation, last_only: bool = False, generating: bool = False) -> list[tuple[str | None, bool]]:
    """(text or EOT, carries loss) pieces of a conversation in its template. last_only: loss on the final
    response only (preference pairs). generating: end with the cue the assistant's answer follows."""
    out: list[tuple[str | None, bool]] = []
    n_assistant = sum(m.role == "assistant" for m in conv.messages)
    seen = 0
    for i, m in enumerate(conv.messages):
        if m.role == "assistant":
            seen += 1
            trains = not last_only or seen == n_assistant
            out += [(_response_text(conv.template, m.content), trains), (EOT, trains)]
        else:
            out.append((_prompt_text(conv, i), False))
    if generating:
        out.append((_answer_cue(conv.template), False))
    return [(t, trains) for t, trains in out if t != ""]


def _prompt_text(conv: Conversation, i: int) -> str:
    """The text of message i (system or user) and the cue that the assistant's answer follows."""
    m, t = conv.messages[i], conv.template
    first_user = all(x.role == "system" for x in conv.messages[:i])
    nxt = conv.messages[i + 1].role if i + 1 < len(conv.messages) else None
    cue = _answer_cue(t) if nxt == "assistant" else ""
    if m.role == "system":
        return {"alpaca": m.content + "\n\n", "chat": m.content, "plain": m.content, "question": m.content + "\n"}[t]
    if t == "question":
        return ("" if first_user else "\n") + QUESTION_PROMPT.format(question=m.content)[: -len("Answer:")] + cue
    if t == "alpaca":
        has_system = conv.messages[0].role == "system"
        preamble = "" if not first_user or has_system else (ALPACA_PREAMBLE_INPUT if conv.context else ALPACA_PREAMBLE)
        lead = preamble if first_user else "\n\n"
        extra = f"### Input:\n{conv.context}\n\n" if conv.context and first_user else ""
        return f"{lead}### Instruction:\n{m.content}\n\n{extra}" + cue
    if t == "chat":
        return f"{CHAT_LABELS['user']} {m.content}" + cue
    return m.content + cue  # plain


def _answer_cue(template: str) -> str:
    return {"question": "Answer:", "alpaca": "### Response:\n", "chat": CHAT_LABELS["assistant"], "plain": ""}[template]


def _response_text(template: str, content: str) -> str:
    return f" {content}" if template == "chat" else content


def prompt_for_generation(template: str, messages: tuple[Message, ...]) -> list[tuple[str | None, bool]]:
    """The segments `gptlab generate --chat` feeds the model: the conversation so far, then the answer cue."""
    check_roles(messages, "--chat", generating=True)
    return segments(Conversation(template, messages), generating=True)


# --- tokens -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    """Token ids and which of them are loss targets (mask[j]: the model is trained to predict ids[j])."""

    ids: np.ndarray  # (n,) int64
    mask: np.ndarray  # (n,) bool; mask[0] is always False (nothing predicts the first token)

    @classmethod
    def of(cls, prompt: list[int], response: list[int]) -> Example:
        """A prompt without loss followed by a response with loss on every token."""
        ids = np.asarray(prompt + response, dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        mask[len(prompt):] = True
        mask[0] = False
        return cls(ids, mask)

    @property
    def n_loss(self) -> int:
        return int(self.mask.sum())

    @property
    def n_prompt(self) -> int:
        """Tokens before the first loss token."""
        hits = np.flatnonzero(self.mask)
        return int(hits[0]) if len(hits) else len(self.ids)


def encode_segments(tok: Tokenizer, parts: list[tuple[str | None, bool]]) -> Example:
    ids: list[int] = []
    mask: list[bool] = []
    for text, trains in parts:
        piece = [tok.eot_id] if text is EOT else tok.encode(text)
        ids += piece
        mask += [trains] * len(piece)
    ex_mask = np.asarray(mask, dtype=bool)
    if len(ex_mask):
        ex_mask[0] = False
    return Example(np.asarray(ids, dtype=np.int64), ex_mask)


def fit(example: Example, block_size: int, max_prompt_tokens: int) -> Example | None:
    """The example cut to block_size + 1 tokens as the module docstring says; None if no loss token is left."""
    n = block_size + 1
    if len(example.ids) <= n and (max_prompt_tokens == 0 or example.n_prompt <= max_prompt_tokens):
        return example
    prompt = example.n_prompt
    keep = min(prompt if max_prompt_tokens == 0 else min(prompt, max_prompt_tokens), n)
    start = prompt - keep
    ids, mask = example.ids[start : start + n], example.mask[start : start + n].copy()
    mask[0] = False
    return Example(ids, mask) if mask.any() else None


@dataclass
class Encoded:
    """A set of encoded examples (or pairs), with what truncation did to it."""

    items: list
    cut: int = 0  # examples shortened to fit
    dropped: int = 0  # examples with no loss token left (pairs: either side), left out

    def describe(self) -> str:
        out = f"{len(self.items)}"
        if self.cut or self.dropped:
            out += f" ({self.cut} cut to fit the context, {self.dropped} dropped with no response token left)"
        return out


def encode_conversations(tok: Tokenizer, convs: list[Conversation], block_size: int, max_prompt_tokens: int,
                         where: str) -> Encoded:
    """SFT examples, loss on every assistant response; an empty result is an error naming `where`."""
    out = Encoded([])
    with _naming(where):
        for conv in convs:
            full = encode_segments(tok, segments(conv))
            ex = fit(full, block_size, max_prompt_tokens)
            out.cut += ex is not None and ex is not full
            out.dropped += ex is None
            if ex is not None:
                out.items.append(ex)
    _require_some(out, where, block_size)
    return out


@dataclass(frozen=True)
class Pair:
    """A preference record: the shared conversation so far, and the two candidate final responses."""

    prompt: Conversation  # ends with a user message
    chosen: str
    rejected: str

    def conversations(self) -> tuple[Conversation, Conversation]:
        p = self.prompt
        return tuple(Conversation(p.template, p.messages + (Message("assistant", r),), p.context)
                     for r in (self.chosen, self.rejected))


def encode_pairs(tok: Tokenizer, pairs: list[Pair], block_size: int, max_prompt_tokens: int, where: str) -> Encoded:
    """(chosen, rejected) example pairs, loss on the final response; a pair either side of which is left
    with no response token is dropped."""
    out = Encoded([])
    with _naming(where):
        for pair in pairs:
            full = [encode_segments(tok, segments(c, last_only=True)) for c in pair.conversations()]
            fitted = [fit(e, block_size, max_prompt_tokens) for e in full]
            if None in fitted:
                out.dropped += 1
                continue
            out.cut += any(f is not e for f, e in zip(fitted, full))
            out.items.append(tuple(fitted))
    _require_some(out, where, block_size)
    return out


@contextmanager
def _naming(where: str):
    """Prefix a tokenizer error (a char tokenizer meeting an unseen character) with the data it came from."""
    try:
        yield
    except TokenizerError as e:
        raise TokenizerError(f"{where}: {e}") from None


def _require_some(encoded: Encoded, where: str, block_size: int) -> None:
    # training on nothing would divide by zero (epochs) or sample from an empty range later, far from the cause
    if encoded.items:
        return
    if encoded.dropped:
        raise GptlabError(f"{where}: all {encoded.dropped} examples lost every response token to truncation at "
                          f"model.block_size={block_size}; set max_prompt_tokens below the block size or use "
                          "a model with a longer context")
    raise GptlabError(f"{where}: no examples; {REGENERATE}")


# --- batches ------------------------------------------------------------------------------------------

def _piece(e: Example) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of one example: position t reads ids[t] and predicts ids[t+1] (if it carries loss)."""
    return e.ids[:-1], np.where(e.mask[1:], e.ids[1:], IGNORE)


def collate(examples: list[Example], pad_id: int, pack: int = 0):
    """idx (B, T), targets (B, T) (IGNORE where no loss), and segments (B, T) or None.

    pack = 0: one example per row, right-padded to the longest. pack = block_size: examples placed first-fit
    in order into rows of at most that many positions; segments numbers the example each position belongs to
    (-1 for padding), and the model restarts positions and confines attention per segment (see GPT.forward),
    so each example's loss is what it would be alone."""
    pieces = [_piece(e) for e in examples]
    rows: list[list[int]] = [[i] for i in range(len(pieces))] if not pack else _first_fit([len(p[0]) for p in pieces], pack)
    T = max((sum(len(pieces[i][0]) for i in row) for row in rows), default=0)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    seg = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row):
            x, y = pieces[i]
            idx[r, at : at + len(x)] = torch.from_numpy(x)
            targets[r, at : at + len(y)] = torch.from_numpy(y)
            seg[r, at : at + len(x)] = k
            at += len(x)
    return idx, targets, (seg if pack else None)


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def loss_tokens(examples: list[Example]) -> int:
    return sum(e.n_loss for e in examples)
