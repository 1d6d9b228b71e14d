"""Fine-tuning data in the field's formats, read from local files through the same `datasets` loading code a hub
name runs: Alpaca, chat messages, prompt/completion, HH-RLHF and prompt/chosen/rejected (strings or message lists).
Templates render exactly; loss falls on every assistant response; bad records are named; packing changes nothing."""
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gptlab.config import (
    ConfigError,
    DPOConfig,
    GptlabError,
    PreferenceData,
    SFTConfig,
    SFTData,
    parse_params,
)
from gptlab.data.finetune import preference_sets, sft_sets
from gptlab.data.formats import (
    ALPACA_PREAMBLE,
    ALPACA_PREAMBLE_INPUT,
    EOT,
    Conversation,
    Message,
    collate,
    encode_conversations,
    encode_pairs,
    encode_segments,
    prompt_for_generation,
    segments,
)
from gptlab.losses import IGNORE, token_loss
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import gpt2_tokenizer

TOK = gpt2_tokenizer()

ALPACA = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
]
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"},
                     {"role": "assistant", "content": "Paris."}]}
HH = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Best fruit?\n\nAssistant: Apples, surely.",
      "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Best fruit?\n\nAssistant: Go away."}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path.relative_to(path.parents[1]))


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # paths in params are relative to the project root
    return tmp_path


def sft_data(**kw) -> SFTData:
    return SFTData(**{"val_share": 0.3, **kw})


def text_of(ex) -> str:
    return TOK.decode(ex.ids.tolist())


def loss_text(ex) -> list[str]:
    """The decoded runs of loss-carrying tokens."""
    runs, run = [], []
    for token, loss in zip(ex.ids.tolist(), ex.mask.tolist()):
        if loss:
            run.append(token)
        elif run:
            runs.append(TOK.decode(run))
            run = []
    return runs + ([TOK.decode(run)] if run else [])


# --- formats and templates ------------------------------------------------------------------------------------

def test_alpaca_renders_the_stanford_template_with_and_without_input(here):
    convs = sft_sets(sft_data(format="alpaca", paths=(write_jsonl(here / "finetune/a.jsonl", ALPACA * 10),)), 0)
    by_instruction = {c.messages[0].content: c for c in convs.train + convs.heldout}
    plain = encode_segments(TOK, segments(by_instruction["Name a colour."]))
    assert text_of(plain) == ALPACA_PREAMBLE + "### Instruction:\nName a colour.\n\n### Response:\nBlue.<|endoftext|>"
    assert loss_text(plain) == ["Blue.<|endoftext|>"]
    with_input = encode_segments(TOK, segments(by_instruction["Add the numbers."]))
    assert text_of(with_input) == (ALPACA_PREAMBLE_INPUT + "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n"
                                   "### Response:\n5<|endoftext|>")


def test_messages_train_on_every_assistant_turn_and_end_each_with_eot(here):
    sets = sft_sets(sft_data(format="messages", paths=(write_jsonl(here / "finetune/c.jsonl", [CHAT] * 10),)), 0)
    ex = encode_segments(TOK, segments(sets.train[0]))
    assert text_of(ex) == ("Be brief.\n\nHuman: Hi\n\nAssistant: Hello.<|endoftext|>\n\nHuman: Capital of France?"
                           "\n\nAssistant: Paris.<|endoftext|>")
    assert loss_text(ex) == [" Hello.<|endoftext|>", " Paris.<|endoftext|>"]


def test_generation_prompt_is_the_training_text_up_to_the_answer():
    conv = Conversation("chat", (Message("user", "Capital of France?"), Message("assistant", "Paris.")))
    trained = text_of(encode_segments(TOK, segments(conv)))
    prompt = text_of(encode_segments(TOK, prompt_for_generation("chat", conv.messages[:1])))
    assert trained == prompt + " Paris.<|endoftext|>"
    for template in ("question", "alpaca", "plain"):
        conv = Conversation(template, (Message("user", "Q?"), Message("assistant", " A.")))
        full = text_of(encode_segments(TOK, segments(conv)))
        assert full == text_of(encode_segments(TOK, prompt_for_generation(template, conv.messages[:1]))) + " A.<|endoftext|>"


def test_prompt_completion_as_strings_and_as_message_lists(here):
    rows = [{"prompt": "2+2=", "completion": "4"},
            {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}]}]
    paths = (write_jsonl(here / "finetune/p1.jsonl", rows[:1] * 6), write_jsonl(here / "finetune/p2.jsonl", rows[1:] * 6))
    sets = sft_sets(sft_data(format="prompt_completion", paths=paths), 0)
    texts = {text_of(encode_segments(TOK, segments(c))) for c in sets.train + sets.heldout}
    assert texts == {"2+2=4<|endoftext|>", "\n\nHuman: 2+2?\n\nAssistant: 4<|endoftext|>"}


def test_parquet_reads_like_jsonl(here):
    (here / "finetune").mkdir()
    pq.write_table(pa.Table.from_pylist(ALPACA * 5), here / "finetune/a.parquet")
    from_parquet = sft_sets(sft_data(format="alpaca", paths=("finetune/a.parquet",)), 0)
    from_jsonl = sft_sets(sft_data(format="alpaca", paths=(write_jsonl(here / "finetune/a.jsonl", ALPACA * 5),)), 0)
    assert from_parquet.train == from_jsonl.train and from_parquet.heldout == from_jsonl.heldout


def test_held_out_records_are_fixed_by_the_seed_and_max_examples_caps_training(here):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(200)]
    path = write_jsonl(here / "finetune/p.jsonl", rows)
    a, b = (sft_sets(sft_data(format="prompt_completion", paths=(path,), val_share=0.1), seed=1) for _ in range(2))
    c = sft_sets(sft_data(format="prompt_completion", paths=(path,), val_share=0.1), seed=2)
    assert a.heldout == b.heldout != c.heldout and 5 < len(a.heldout) < 40
    assert not {x.messages for x in a.train} & {x.messages for x in a.heldout}
    capped = sft_sets(sft_data(format="prompt_completion", paths=(path,), val_share=0.1, max_examples=7), seed=1)
    assert capped.train == a.train[:7] and capped.heldout == a.heldout


def test_hh_rlhf_splits_at_the_last_shared_assistant_turn(here):
    sets = preference_sets(PreferenceData(format="hh_rlhf", paths=(write_jsonl(here / "finetune/h.jsonl", [HH] * 8),),
                                          val_share=0.3), 0)
    pair = sets.train[0]
    assert [m.role for m in pair.prompt.messages] == ["user", "assistant", "user"]
    assert (pair.chosen, pair.rejected) == ("Apples, surely.", "Go away.")
    chosen, rejected = encode_pairs(TOK, [pair], 1024, 0, "hh").items[0]
    # rendered in the chat template, HH's own text comes back (with end-of-text after each assistant turn)
    assert text_of(chosen) == HH["chosen"].replace("Hello!", "Hello!<|endoftext|>") + "<|endoftext|>"
    assert loss_text(chosen) == [" Apples, surely.<|endoftext|>"] and loss_text(rejected) == [" Go away.<|endoftext|>"]
    assert chosen.n_prompt == rejected.n_prompt and (chosen.ids[: chosen.n_prompt] == rejected.ids[: chosen.n_prompt]).all()


@pytest.mark.parametrize("record, message", [
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"}, "identical"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: y"}, "share no dialogue"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b"}, "field 'rejected' is missing"),
    ({"chosen": "\n\nHuman: a\n\nHuman: c\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nHuman: c\n\nAssistant: d"},
     "expected an optional system message"),
])
def test_bad_hh_records_are_errors_naming_the_record(here, record, message):
    path = write_jsonl(here / "finetune/h.jsonl", [HH, HH, record])
    with pytest.raises(GptlabError, match=rf"finetune/h.jsonl:3: .*{message}"):
        preference_sets(PreferenceData(format="hh_rlhf", paths=(path,), val_share=0.3), 0)


def test_preference_records_as_strings_ultrafeedback_lists_and_trl_conversational(here):
    user = {"role": "user", "content": "Pick a fruit."}
    rows = [
        {"prompt": "Pick a fruit:", "chosen": " apple", "rejected": " rock"},
        {"prompt": "Pick a fruit.", "chosen": [user, {"role": "assistant", "content": "Apple."}],
         "rejected": [user, {"role": "assistant", "content": "Rock."}]},  # UltraFeedback-binarized
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "Apple."}],
         "rejected": [{"role": "assistant", "content": "Rock."}]},  # TRL's conversational preference
    ]
    sets = preference_sets(PreferenceData(format="preference", paths=(write_jsonl(here / "finetune/p.jsonl", rows * 4),),
                                          val_share=0.2), 0)
    rendered = set()
    for pair in sets.train + sets.heldout:
        chosen, rejected = encode_pairs(TOK, [pair], 256, 0, "p").items[0]
        rendered.add((text_of(chosen), loss_text(rejected)[0]))
    assert rendered == {("Pick a fruit: apple<|endoftext|>", " rock<|endoftext|>"),
                        ("\n\nHuman: Pick a fruit.\n\nAssistant: Apple.<|endoftext|>", " Rock.<|endoftext|>")}


def test_preference_lists_that_differ_before_the_answer_are_named(here):
    a = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}]
    b = [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]
    path = write_jsonl(here / "finetune/p.jsonl", [{"prompt": "A", "chosen": a, "rejected": b}])
    with pytest.raises(GptlabError, match="finetune/p.jsonl:1: chosen and rejected differ before their final answers"):
        preference_sets(PreferenceData(format="preference", paths=(path,), val_share=0.5), 0)


def test_a_schema_mismatch_names_the_record_and_field(here):
    path = write_jsonl(here / "finetune/a.jsonl", ALPACA + [{"instruction": "x", "output": 3}])
    with pytest.raises(GptlabError, match=r"finetune/a.jsonl:3: field 'output' is int, not a string"):
        sft_sets(sft_data(format="alpaca", paths=(path,)), 0)
    path = write_jsonl(here / "finetune/c.jsonl", [{"messages": [{"role": "bot", "content": "hi"}]}])
    with pytest.raises(GptlabError, match=r"finetune/c.jsonl:1: messages\[0\].role is 'bot'"):
        sft_sets(sft_data(format="messages", paths=(path,)), 0)


def test_data_config_is_checked_before_any_work():
    def sft(data, **kw):
        return parse_params({"sft": {"data": data, **kw}})

    with pytest.raises(ConfigError, match="sft.data.format: must be one of"):
        sft({"format": "hh_rlhf"})  # a preference format is no instruction format
    with pytest.raises(ConfigError, match="sft.data.paths: 'data/x.jsonl' is not under finetune/"):
        sft({"format": "alpaca", "paths": ["data/x.jsonl"], "val_share": 0.1})
    with pytest.raises(ConfigError, match="sft.data.val_share: held-out examples are needed"):
        sft({"format": "alpaca", "path": "tatsu-lab/alpaca"})
    with pytest.raises(ConfigError, match="sft.data.path: not for format world"):
        sft({"format": "world", "path": "tatsu-lab/alpaca"})
    with pytest.raises(ConfigError, match="sft.init: must be checkpoints/pretrain or a model folder under models/"):
        sft({}, init="/tmp/gpt2")
    with pytest.raises(ConfigError, match="dpo.label_smoothing: only sigmoid and robust use it"):
        parse_params({"dpo": {"loss_type": "hinge", "label_smoothing": 0.1}})
    with pytest.raises(ConfigError, match="dpo.loss_type: must be one of"):
        parse_params({"dpo": {"loss_type": "kto"}})
    assert SFTConfig().data.format == DPOConfig().data.format == "world"


def test_a_glob_that_matches_nothing_names_the_key(here):
    with pytest.raises(ConfigError, match=r"sft.data.paths: 'finetune/\*.jsonl' matches no file"):
        sft_sets(sft_data(format="alpaca", paths=("finetune/*.jsonl",)), 0)


def test_the_hub_path_goes_through_datasets_and_a_failure_is_one_line_naming_the_key(here):
    data = sft_data(format="alpaca", path="no-such-org/no-such-dataset-gptlab", revision="abc")
    with pytest.raises(ConfigError, match=r"^sft.data: cannot open no-such-org/no-such-dataset-gptlab split train \("):
        sft_sets(data, 0)


# --- packing ----------------------------------------------------------------------------------------------------

def test_packed_and_unpacked_batches_give_every_example_the_same_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=TOK.n_vocab)).eval()
    convs = [Conversation("plain", (Message("user", "word " * n), Message("assistant", " reply" * (9 - n))))
             for n in range(1, 9)]
    examples = encode_conversations(TOK, convs, 64, 0, "t").items
    idx, targets, seg = collate(examples, TOK.eot_id)
    assert seg is None
    packed_idx, packed_targets, packed_seg = collate(examples, TOK.eot_id, pack=64)
    assert packed_idx.shape[0] < len(examples)  # several examples share a row
    with torch.no_grad():
        alone = [token_loss(model(idx[i : i + 1]), targets[i : i + 1], reduction="sum").item() for i in range(len(examples))]
        logits = model(packed_idx, segments=packed_seg)
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), packed_targets.flatten(), ignore_index=IGNORE,
                                                  reduction="none").view(packed_targets.shape)
    packed = []
    for r in range(packed_seg.shape[0]):
        for k in range(int(packed_seg[r].max()) + 1):
            packed.append(per_token[r][packed_seg[r] == k].sum().item())
    order = [i for row in _rows(examples, 64) for i in row]
    assert len(packed) == len(alone)
    for got, i in zip(packed, order):
        assert math.isclose(got, alone[i], rel_tol=1e-5, abs_tol=1e-5)
    # and the total is the same number of loss tokens
    assert int((packed_targets != IGNORE).sum()) == int((targets != IGNORE).sum())


def _rows(examples, capacity):
    from gptlab.data.formats import _first_fit

    return _first_fit([len(e.ids) - 1 for e in examples], capacity)


def test_eot_segments_encode_to_the_end_of_text_id():
    ex = encode_segments(TOK, [("Hi", False), (" there", True), (EOT, True)])
    assert ex.ids.tolist()[-1] == TOK.eot_id and ex.mask.tolist() == [False, True, True]


def test_the_hub_loading_code_on_a_local_copy_of_a_datasets_repo(here):
    """sft.data.path / dpo.data.path go through datasets.load_dataset(path, name, split, revision), the call a
    hub name makes; pointed at a local folder laid out like the hub repo (train/test files) it runs offline."""
    repo = here / "hh-rlhf"
    write_jsonl(repo / "train.jsonl", [HH] * 5)
    write_jsonl(repo / "test.jsonl", [HH] * 2)
    sets = preference_sets(PreferenceData(format="hh_rlhf", path=str(repo), val_split="test"), 0)
    assert len(sets.train) == 5 and len(sets.heldout) == 2 and sets.train[0].chosen == "Apples, surely."
    alpaca = here / "alpaca"
    alpaca.mkdir()
    pq.write_table(pa.Table.from_pylist(ALPACA * 10), alpaca / "train.parquet")
    sets = sft_sets(sft_data(format="alpaca", path=str(alpaca), val_share=0.2), 0)
    assert len(sets.train) + len(sets.heldout) == 20 and sets.train[0].template == "alpaca"
