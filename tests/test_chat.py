"""Chat supervision (ds_distill/chat.py through data.get_dataset): exact supervised positions under a Qwen3-style
template that rewrites history, ChatML on a Qwen-style BPE (a reply starting with "\\n" merges at the boundary), a
Llama-3 template, a template with {% generation %} blocks and a DeepSeek-R1-distill-style template (the rendered turn
does not extend the generation prompt).

The authority is the text inference would see: hand-written context strings, tokenised as one text by the tokenizer,
and the hand-written reply with its end-of-turn token(s).
"""

import json

import datasets
import pytest

from ds_distill.common import IGNORE_INDEX, UsageError
from ds_distill.data import get_dataset
from ds_distill.ds_config import REPO_CONFIGS
from tests import tiny
from tests.helpers import CONV

datasets.disable_progress_bars()
# CONV's second turn under ChatML: the user's context as rendered, and the supervised reply with its end of turn.
SEA = "<|im_start|>user\nthe sea<|im_end|>\n<|im_start|>assistant\n"
POEM = "<think>\nthe wind\n</think>\n\nhere is a poem<|im_end|>\n"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return tiny.make_qwen_tokenizer(tmp_path_factory.mktemp("qwen"))


def load(tmp_path, tok, convs, **kw):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"id": f"conv-{i}", "messages": c}) + "\n" for i, c in enumerate(convs)))
    return get_dataset(str(path), tok, seq_len=256, **kw)


def targets(example):
    """Positions of the supervised tokens (labels are shifted: label t is the target token t + 1)."""
    return [t + 1 for t, x in enumerate(example["labels"]) if x != IGNORE_INDEX]


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def assert_turn(tok, example, context, reply):
    """example == tokens(context as one text) + tokens of the reply; exactly the reply is supervised."""
    ctx = enc(tok, context)
    ids = example["input_ids"]
    assert ids[: len(ctx)] == ctx, "the context is tokenised as inference tokenises it"
    assert tok.decode(ids[len(ctx) :]) == reply
    assert targets(example) == list(range(len(ctx), len(ids)))
    assert example["labels"][len(ctx) - 1 : -1] == ids[len(ctx) :]


def test_qwen3_history_rewrite_gives_one_example_per_assistant_turn(tmp_path, qwen):
    ds = load(tmp_path, qwen, [CONV])
    assert len(ds) == 2 and ds["id"] == ["conv-0", "conv-0"] and ds["row"] == [0, 0]
    # Turn 1 as inference sees it when it is the last turn: Qwen3 writes an (empty) think block and lstrips "\n".
    assert_turn(
        qwen,
        ds[0],
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
        "<think>\n\n</think>\n\nsure<|im_end|>\n",
    )
    # Turn 3's context holds turn 1 rewritten (no think block, content verbatim: "assistant\n\nsure", with "\n\n"
    # one token, as inference tokenises it).
    context = (
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n\nsure<|im_end|>\n"
        "<|im_start|>user\nthe sea<|im_end|>\n<|im_start|>assistant\n"
    )
    assert qwen.convert_ids_to_tokens(enc(qwen, context)).count("ĊĊ") == 1
    assert_turn(qwen, ds[1], context, "<think>\nthe wind\n</think>\n\nhere is a poem<|im_end|>\n")
    # Without that merge only the history rewrite tells the renderings apart: still one example per reply.
    plain = [CONV[0], {"role": "assistant", "content": "sure"}, *CONV[2:]]
    ds = load(tmp_path, qwen, [plain])
    head = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert len(ds) == 2
    assert_turn(qwen, ds[0], head, "<think>\n\n</think>\n\nsure<|im_end|>\n")
    assert_turn(qwen, ds[1], head + "sure<|im_end|>\n" + SEA, POEM)


def test_chatml_reply_starting_with_newline(tmp_path):
    tok = tiny.make_qwen_tokenizer(tmp_path / "tok", template=tiny.CHATML_TEMPLATE)
    head = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    # "assistant\n" + "\nsure" as one text would merge "\n\n": the reply is cut at the boundary, as generation does.
    assert tok.convert_ids_to_tokens(enc(tok, head + "\nsure"))[len(enc(tok, head)) - 1] == "ĊĊ"
    last_only = [CONV[0], {"role": "assistant", "content": "\nsure"}]
    (ex,) = load(tmp_path, tok, [last_only])
    assert_turn(tok, ex, head, "\nsure<|im_end|>\n")
    assert ex["input_ids"] == enc(tok, head) + enc(tok, "\nsure<|im_end|>\n")
    # When that reply is an earlier turn, the later turn's context (tokenised whole) holds the merged "\n\n": the
    # conversation is no longer one token sequence for both turns, so each turn is its own example.
    ds = load(tmp_path, tok, [CONV])
    assert len(ds) == 2
    assert_turn(tok, ds[0], head, "\nsure<|im_end|>\n")
    assert_turn(tok, ds[1], head + "\nsure<|im_end|>\n" + SEA, POEM)
    # Without the merge, a multi-turn ChatML conversation stays ONE example, every reply supervised.
    plain = [CONV[0], {"role": "assistant", "content": "sure"}, *CONV[2:]]
    (ex,) = load(tmp_path, tok, [plain])
    first = head + "sure<|im_end|>\n<|im_start|>user\nthe sea<|im_end|>\n<|im_start|>assistant\n"
    reply = "<think>\nthe wind\n</think>\n\nhere is a poem<|im_end|>\n"
    assert ex["input_ids"] == enc(tok, first + reply)
    a, b = len(enc(tok, head)), len(enc(tok, head + "sure<|im_end|>\n"))
    assert targets(ex) == list(range(a, b)) + list(range(len(enc(tok, first)), len(ex["input_ids"])))


def test_llama3_template_one_example_every_reply_and_eot(tmp_path):
    tok = tiny.make_llama3_tokenizer(tmp_path / "tok")
    (ex,) = load(tmp_path, tok, [CONV])
    h = "<|start_header_id|>{}<|end_header_id|>\n\n"
    ctx1 = "<|begin_of_text|>" + h.format("user") + "hello<|eot_id|>" + h.format("assistant")
    turn1 = ctx1 + "sure<|eot_id|>"  # Llama 3 trims contents: the leading "\n" is not rendered
    ctx3 = turn1 + h.format("user") + "the sea<|eot_id|>" + h.format("assistant")
    full = ctx3 + "<think>\nthe wind\n</think>\n\nhere is a poem<|eot_id|>"
    assert ex["input_ids"] == enc(tok, full)
    want = list(range(len(enc(tok, ctx1)), len(enc(tok, turn1)))) + list(
        range(len(enc(tok, ctx3)), len(enc(tok, full)))
    )
    assert targets(ex) == want
    assert (
        tok.decode([ex["input_ids"][t] for t in want])
        == "sure<|eot_id|><think>\nthe wind\n</think>\n\nhere is a poem<|eot_id|>"
    )


def test_generation_blocks_match_transformers_assistant_mask(tmp_path):
    tok = tiny.make_qwen_tokenizer(tmp_path / "tok", template=tiny.GENERATION_TEMPLATE)
    plain = [
        CONV[0],
        {"role": "assistant", "content": "sure"},
        CONV[2],
        {"role": "assistant", "content": "\nhere is a poem"},
    ]
    (ex,) = load(tmp_path, tok, [plain])
    # Turn 1 (no merge): exactly transformers' own return_assistant_tokens_mask positions; the "\n" after
    # <|im_end|> is outside the generation block, so it is not supervised.
    mask = tok.apply_chat_template(plain[:2], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)[
        "assistant_masks"
    ]
    first = [t for t, m in enumerate(mask) if m]
    assert tok.decode([ex["input_ids"][t] for t in first]) == "sure<|im_end|>"
    # Turn 3's reply starts with "\n": cut at the boundary, the block's text supervised, the trailing "\n" not.
    ctx3 = (
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nsure<|im_end|>\n"
        "<|im_start|>user\nthe sea<|im_end|>\n<|im_start|>assistant\n"
    )
    third = list(range(len(enc(tok, ctx3)), len(enc(tok, ctx3)) + len(enc(tok, "\nhere is a poem<|im_end|>"))))
    assert targets(ex) == first + third
    assert tok.decode([ex["input_ids"][t] for t in third]) == "\nhere is a poem<|im_end|>"
    assert ex["input_ids"][third[-1] + 1 :] == enc(tok, "\n")


def test_train_on_prompt_and_replacement_template(tmp_path, qwen):
    (ex,) = load(tmp_path, qwen, [CONV], train_on_prompt=True)  # the whole conversation as rendered, all supervised
    full = qwen.apply_chat_template(CONV, tokenize=False)
    assert ex["input_ids"] == enc(qwen, full) and targets(ex) == list(range(1, len(ex["input_ids"])))
    # --chat_template: the run's template replaces the tokenizer's for tokenising; the tokenizer is left as it was.
    ds = load(tmp_path, qwen, [CONV], chat_template=tiny.CHATML_TEMPLATE)
    assert len(ds) == 2 and qwen.decode(ds[0]["input_ids"]).endswith("assistant\n\nsure<|im_end|>\n")
    assert qwen.chat_template == tiny.QWEN3_TEMPLATE


R1_MARKERS = ["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"]


def test_r1_distill_template_supervises_the_reasoning_after_its_generation_prompt(tmp_path):
    # The template renders earlier replies with the reasoning cut and opens the generation prompt with "<think>\n":
    # a rendered turn never extends its context. Each reply is supervised as the model generates it after the prompt:
    # the content minus the "<think>\n" the prompt wrote, then the end-of-turn token.
    tok = tiny.make_qwen_tokenizer(tmp_path / "tok", template=tiny.R1_TEMPLATE)
    tok.add_tokens(R1_MARKERS, special_tokens=True)
    conv = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "<think>\nsay hi\n</think>\n\nsure"},
        *CONV[2:],
    ]
    merge = [CONV[0], {"role": "assistant", "content": "<think>\n\nhmm\n</think>ok"}]  # "\n" + "\nhmm" would merge
    ds = load(tmp_path, tok, [conv, merge])
    assert len(ds) == 3 and ds["id"] == ["conv-0", "conv-0", "conv-1"]
    head = "<｜begin▁of▁sentence｜>be brief<｜User｜>hello<｜Assistant｜>"
    assert_turn(tok, ds[0], head + "<think>\n", "say hi\n</think>\n\nsure<｜end▁of▁sentence｜>")
    # Turn 3's context as inference renders it: turn 1 reduced to its answer, then the prompt opening the reasoning.
    assert_turn(
        tok,
        ds[1],
        head + "\n\nsure<｜end▁of▁sentence｜><｜User｜>the sea<｜Assistant｜><think>\n",
        "the wind\n</think>\n\nhere is a poem<｜end▁of▁sentence｜>",
    )
    assert ds[1]["labels"][-2] == tok.convert_tokens_to_ids("<｜end▁of▁sentence｜>")  # the student learns to stop
    context = "<｜begin▁of▁sentence｜><｜User｜>hello<｜Assistant｜><think>\n"
    assert enc(tok, context + "\nhmm") != enc(tok, context) + enc(tok, "\nhmm")  # one text would merge "\n\n"
    assert_turn(tok, ds[2], context, "\nhmm\n</think>ok<｜end▁of▁sentence｜>")
    assert ds[2]["input_ids"] == enc(tok, context) + enc(tok, "\nhmm\n</think>ok<｜end▁of▁sentence｜>")


def test_template_whose_reply_cannot_be_located_is_refused(tmp_path, qwen):
    # The R1 template's generation prompt writes "<think>\n"; a reply without it has no known generation after it.
    with pytest.raises(
        UsageError,
        match=r"example id 'conv-0', turn 1: .*already writes '<think>\\n', but the reply "
        r"does not start with it.*--chat_template FILE",
    ):
        load(tmp_path, qwen, [CONV[:2]], chat_template=tiny.R1_TEMPLATE)
    # A template that also rewrites the answer: the reply cannot be checked against its rendering, so the run stops.
    upper = tiny.R1_TEMPLATE.replace("content + '<｜end", "content | upper + '<｜end")
    conv = [CONV[0], {"role": "assistant", "content": "<think>\nx\n</think>sure"}]
    with pytest.raises(
        UsageError, match=r"example id 'conv-0', turn 1: .*\('<think>\\n' vs 'SURE<｜end.*--chat_template FILE"
    ):
        load(tmp_path, qwen, [conv], chat_template=upper)


def test_tracked_chat_run_string_ids_template_file_and_tokenizer_round_trip(dist_env, tmp_path, caplog):
    """A Llama-3-style base student: tokenizer without pad token and without chat template; 40 conversations with
    string ids, the default held-out fraction, --chat_template FILE, --track_examples, checkpoints and export.
    alpha = 1 (no teacher engine): nothing checked here depends on the teacher."""
    import csv
    import logging

    from ds_distill import train
    from ds_distill.extras.tracking import hardest_examples, write_subset
    from tests.helpers import ds_json

    tok = tiny.make_llama3_tokenizer(tmp_path / "tok", template=None)
    given = {f.name: f.read_bytes() for f in (tmp_path / "tok").iterdir()}
    teacher = tiny.make_model(tmp_path / "teacher", tok, layers=1, hidden=16, heads=2, seed=1)
    student = tiny.make_model(tmp_path / "student", tok, layers=1, hidden=16, heads=2, seed=2)
    assert {f.name: f.read_bytes() for f in (tmp_path / "student").iterdir() if f.name in given} == given
    words = "the quick brown fox jumps over the lazy dog".split()
    convs = [
        {
            "id": f"conv-{1000 + i}",
            "messages": [
                {"role": "user", "content": words[i % 9]},
                {"role": "assistant", "content": " ".join(words[i % 5 : i % 5 + 3])},
            ],
        }
        for i in range(40)
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
    (tmp_path / "llama3.jinja").write_text(tiny.LLAMA3_TEMPLATE)
    out = tmp_path / "run"
    argv = [
        "--teacher",
        teacher,
        "--student",
        student,
        "--data",
        str(tmp_path / "chat.jsonl"),
        "--output_dir",
        str(out),
        "--chat_template",
        str(tmp_path / "llama3.jinja"),
        "--track_examples",
        "--max_steps",
        "2",
        "--alpha",
        "1",
        "--seq_len",
        "32",
        "--log_steps",
        "1",
        "--chunk_size",
        "16",
        "--deepspeed_config",
        ds_json(tmp_path, train_micro_batch_size_per_gpu=4),
        "--teacher_deepspeed_config",
        str(REPO_CONFIGS / "cpu_teacher_zero3.json"),
    ]
    with caplog.at_level(logging.INFO):
        assert train.main(argv) == 0
    # The default 5% of 40 rows (2) is raised to one micro-batch per rank (4): evaluation ran.
    assert "eval_loss=" in caplog.text and "evaluation off" not in caplog.text

    with open(out / "examples.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and all(r["example_id"].startswith("conv-") for r in rows)
    assert {r["example_id"] for r in rows} <= {c["id"] for c in convs}
    hard = hardest_examples(out / "examples.csv", 0.5)
    assert len(hard) == 4 and all(isinstance(i, str) for i in hard)
    assert write_subset(str(tmp_path / "chat.jsonl"), hard, str(tmp_path / "hard.jsonl")) == 4
    written = [json.loads(line) for line in (tmp_path / "hard.jsonl").read_text().splitlines()]
    assert {r["id"] for r in written} == hard and all(
        r == next(c for c in convs if c["id"] == r["id"]) for r in written
    )

    # The tokenizer round trip: every exported folder holds the student's tokenizer files as given (no pad token
    # added, no chat template added).
    from transformers import AutoTokenizer

    for folder in (out / "final", out / "checkpoints" / "step_00000002" / "hf"):
        assert {f.name: f.read_bytes() for f in folder.iterdir() if f.name in given} == given, folder
        back = AutoTokenizer.from_pretrained(folder)
        assert back.pad_token is None and back.chat_template is None
        assert back.special_tokens_map == tok.special_tokens_map and back.get_vocab() == tok.get_vocab()


# ------------------------------------------------------------------------------------------ tool calling
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Time in a zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}, "fmt": {"type": "string", "enum": ["12h", "24h"]}},
            "required": ["zone"],
        },
    },
}
TOOL_CONV = [
    {"role": "user", "content": "weather in Paris?"},
    {
        "role": "assistant",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "name": "get_weather", "content": "22C"},
    {"role": "assistant", "content": "It is 22C."},
]
CLOCK_CONV = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "time?"},
    {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [{"function": {"name": "get_time", "arguments": {"zone": "UTC", "fmt": "24h"}}}],
    },
    {"role": "tool", "content": "08:00"},
    {"role": "assistant", "content": "08:00."},
]


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    tok = tiny.make_qwen_tokenizer(tmp_path_factory.mktemp("qwen25"), template=tiny.QWEN25_TOOLS_TEMPLATE)
    tok.add_tokens(["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"])  # added, as in Qwen2.5
    return tok


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def assert_tool_conversation(tok, example, conv, tools):
    """The example is the conversation as inference renders it with `tools` (schema in the system turn, tool calls
    and tool results as the template writes them), tokenised as one text; exactly the assistant turns (tool calls
    included, each with its end-of-turn) are supervised."""
    full = tok.apply_chat_template(conv, tools=tools, tokenize=False)
    assert "# Tools" in full and all(json.dumps(t) in full for t in tools)  # the schema the model sees at inference
    assert example["input_ids"] == enc(tok, full)
    want = []
    for i, m in enumerate(conv):
        if m["role"] == "assistant":
            context = tok.apply_chat_template(conv[:i], tools=tools, tokenize=False, add_generation_prompt=True)
            turn = tok.apply_chat_template(conv[: i + 1], tools=tools, tokenize=False)
            want += range(len(enc(tok, context)), len(enc(tok, turn)))
    assert targets(example) == want
    return tok.decode([example["input_ids"][t] for t in want])


def test_tool_calls_tool_results_and_tools_render_as_inference(tmp_path, qwen25):
    # Row 1 calls a tool with a dict of arguments; row 2 has a system turn, content beside the call, a flat call
    # (no "type") and two tools. `datasets` loads such rows as JSON per message and per tool.
    path = write_rows(
        tmp_path / "tools.jsonl",
        [{"messages": TOOL_CONV, "tools": [WEATHER]}, {"messages": CLOCK_CONV, "tools": [WEATHER, CLOCK]}],
    )
    ds = get_dataset(path, qwen25, seq_len=4096)
    assert len(ds) == 2
    said = assert_tool_conversation(qwen25, ds[0], TOOL_CONV, [WEATHER])
    assert said == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "It is 22C.<|im_end|>\n"
    )  # the tool's result ("22C") and the user turn are context, not targets
    said = assert_tool_conversation(qwen25, ds[1], CLOCK_CONV, [WEATHER, CLOCK])
    assert said == (
        'Checking.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC", "fmt": "24h"}}\n</tool_call>'
        "<|im_end|>\n08:00.<|im_end|>\n"
    )


def test_tools_as_json_strings_and_hub_parquet_load_the_same(tmp_path, qwen25):
    """Hub layouts: `tools` as a JSON string per row (xlam, hermes-function-calling) and a parquet file written by
    `datasets` from lists of dicts (every struct then has every key seen in the column, null where absent)."""
    rows = [{"messages": TOOL_CONV, "tools": [WEATHER]}, {"messages": CLOCK_CONV, "tools": [WEATHER, CLOCK]}]
    want = get_dataset(write_rows(tmp_path / "a.jsonl", rows), qwen25, seq_len=4096)["input_ids"]
    as_text = [{"messages": r["messages"], "tools": json.dumps(r["tools"])} for r in rows]
    got = get_dataset(write_rows(tmp_path / "b.jsonl", as_text), qwen25, seq_len=4096)["input_ids"]
    assert got == want
    (tmp_path / "hub").mkdir()
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "hub" / "train-00000-of-00001.parquet")
    assert datasets.load_dataset("parquet", data_dir=str(tmp_path / "hub"), split="train").features["tools"] != (
        datasets.Json()
    )
    got = get_dataset(str(tmp_path / "hub"), qwen25, seq_len=4096)["input_ids"]
    assert got == want
    # No `tools` column and a chat without tool calls: as before (no "# Tools" system turn).
    (ex,) = get_dataset(
        write_rows(tmp_path / "c.jsonl", [{"messages": TOOL_CONV[:1] + TOOL_CONV[3:]}]), qwen25, seq_len=4096
    )
    assert "# Tools" not in qwen25.decode(ex["input_ids"])


@pytest.mark.parametrize(
    "row, field, fix",
    [
        (
            {"messages": [TOOL_CONV[0], {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]},
            r"messages\[1\]\.tool_calls\[0\]",
            "name",
        ),
        (
            {"messages": [TOOL_CONV[0], {"role": "assistant", "tool_calls": "get_weather(Paris)"}]},
            r"messages\[1\]\.tool_calls",
            "list",
        ),
        ({"messages": [TOOL_CONV[0], {"role": "tool", "name": "get_weather"}]}, r"messages\[1\]\.content", "string"),
        ({"messages": TOOL_CONV, "tools": "{not json"}, "'tools'", "JSON"),
        ({"messages": TOOL_CONV, "tools": [{"type": "function"}]}, r"tools\[0\]", "name"),
    ],
)
def test_malformed_tool_message_names_file_line_and_fix(tmp_path, qwen25, row, field, fix):
    good = {"messages": TOOL_CONV, "tools": [WEATHER]}
    path = write_rows(tmp_path / "bad.jsonl", [good, good, row])
    with pytest.raises(UsageError, match=rf"data file '.*bad\.jsonl' line 3: .*{field}.*{fix}") as err:
        get_dataset(path, qwen25, seq_len=4096)
    assert "\n" not in str(err.value)
