"""ds_distill.data: sources, formats, exact supervision masks, packing equivalence, sharding, exact resume, bad data."""

import json
import logging

import datasets
import pytest
import torch

from ds_distill import data
from ds_distill.common import IGNORE_INDEX, UsageError
from ds_distill.data import BatchStream, collate, get_dataset, split_eval
from tests import tiny
from tests.helpers import WORDS, as_lists

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny.make_tokenizer(tmp_path_factory.mktemp("tok"))


def sentence(i: int, n: int | None = None) -> str:
    n = n if n is not None else 3 + i % 9
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def texts(n):
    return [{"text": sentence(i)} for i in range(n)]


def expect_text(tok, text):
    ids = tok(text)["input_ids"] + [tok.eos_token_id]  # the tiny tokenizer adds bos, not eos
    return ids, ids[1:] + [IGNORE_INDEX]


# ------------------------------------------------------------------------------------------------------ sources


def check_text_rows(ds, tok, rows):
    assert ds.column_names == ["id", "row", "input_ids", "labels"]
    assert ds["id"] == ds["row"] == list(range(len(rows)))
    for got, row in zip(ds, rows):
        ids, labels = expect_text(tok, row["text"])
        assert got["input_ids"] == ids and got["labels"] == labels


def test_jsonl_json_parquet_save_to_disk(tmp_path, tok):
    rows = texts(6)
    check_text_rows(get_dataset(write_jsonl(tmp_path / "a.jsonl", rows), tok, seq_len=64), tok, rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))  # a JSON array
    check_text_rows(get_dataset(str(tmp_path / "b.json"), tok, seq_len=64), tok, rows)
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "c.parquet")
    check_text_rows(get_dataset(str(tmp_path / "c.parquet"), tok, seq_len=64), tok, rows)
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    check_text_rows(get_dataset(str(tmp_path / "saved"), tok, seq_len=64), tok, rows)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "saved_dict")
    check_text_rows(get_dataset(str(tmp_path / "saved_dict"), tok, seq_len=64, split="train"), tok, rows)


def test_txt_folder_one_example_per_line_and_md_per_file(tmp_path, tok):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "1.txt").write_text(f"{sentence(0)}\n\n{sentence(1)}\n")
    (tmp_path / "txt" / "2.txt").write_text(f"{sentence(2)}\n")
    check_text_rows(get_dataset(str(tmp_path / "txt"), tok, seq_len=64), tok, texts(3))
    (tmp_path / "md").mkdir()
    (tmp_path / "md" / "a.md").write_text("# title\n\nsome text\n")
    ds = get_dataset(str(tmp_path / "md"), tok, seq_len=64)
    assert len(ds) == 1 and tok.decode(ds[0]["input_ids"], skip_special_tokens=True) == "# title\n\nsome text\n"


def test_max_samples_integer_ids_and_filter_keep_ids(tmp_path, tok):
    rows = [{"id": 100 + i, **r} for i, r in enumerate(texts(8))]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    assert get_dataset(path, tok, seq_len=64, max_samples=5)["id"] == [100, 101, 102, 103, 104]
    ds = get_dataset(path, tok, seq_len=64, example_filter=lambda r: r["id"] % 2 == 1)
    assert ds["id"] == [101, 103, 105, 107]
    assert ds[1]["input_ids"] == expect_text(tok, rows[3]["text"])[0]
    assert ds["row"] == [1, 3, 5, 7]  # row numbers in the file: what batches carry as example_ids
    # String ids are kept as given (issue 13), next to the row numbers.
    path = write_jsonl(tmp_path / "s.jsonl", [{"id": f"conv-{1007 + i}", **r} for i, r in enumerate(texts(3))])
    ds = get_dataset(path, tok, seq_len=64, example_filter=lambda r: r["id"] != "conv-1008")
    assert ds["id"] == ["conv-1007", "conv-1009"] and ds["row"] == [0, 2]
    assert data.SourceIds(ds)([2, 0, 2]) == ["conv-1009", "conv-1007", "conv-1009"]
    assert collate(ds[:], pad_token_id=0)["example_ids"].tolist() == [0, 2]


# -------------------------------------------------------------------------------------------------- supervision


def test_prompt_completion_mask(tmp_path, tok):
    rows = [
        {"prompt": "what is the capital of france?", "completion": " paris."},
        {"prompt": "hello", "completion": " fine"},
    ]
    ds = get_dataset(write_jsonl(tmp_path / "pc.jsonl", rows), tok, seq_len=64)
    for got, row in zip(ds, rows):
        p = tok(row["prompt"])["input_ids"]
        c = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert got["input_ids"] == p + c
        # Positions 0 .. len(p)-2 predict prompt tokens: ignored. Position len(p)-1 predicts the first completion token.
        assert got["labels"] == [IGNORE_INDEX] * (len(p) - 1) + c + [IGNORE_INDEX]
    on_prompt = get_dataset(str(tmp_path / "pc.jsonl"), tok, seq_len=64, train_on_prompt=True)
    assert on_prompt[0]["labels"] == on_prompt[0]["input_ids"][1:] + [IGNORE_INDEX]


def test_messages_mask_assistant_turns_and_end_token(tmp_path, tok):
    conv = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello you"},
        {"role": "user", "content": "and the dog?"},
        {"role": "assistant", "content": "it sleeps"},
    ]
    ds = get_dataset(write_jsonl(tmp_path / "m.jsonl", [{"messages": conv}]), tok, seq_len=128)
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert ids == tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
    targets = [ids[t + 1] for t in range(len(ids) - 1) if labels[t] != IGNORE_INDEX]
    assert all(labels[t] in (IGNORE_INDEX, ids[t + 1]) for t in range(len(ids) - 1)) and labels[-1] == IGNORE_INDEX
    # Exactly the assistant contents, each followed by its <|end|>; no role marker, no user/system text.
    end = tok.convert_tokens_to_ids("<|end|>")
    expected = []
    for answer in ("hello you", "it sleeps"):
        expected += tok(answer, add_special_tokens=False)["input_ids"] + [end]
    assert targets == expected
    assert tok.decode(targets) == "hello you<|end|>it sleeps<|end|>"


def test_messages_without_chat_template(tmp_path, tok):
    plain = tiny.make_tokenizer(tmp_path / "plain")
    plain.chat_template = None
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(UsageError, match="no chat template"):
        get_dataset(path, plain, seq_len=32)


def test_sentencepiece_tokenizer(tmp_path):
    pytest.importorskip("google.protobuf", reason="transformers 5 needs protobuf to read a tokenizer.model")
    sp = tiny.make_sentencepiece_tokenizer(tmp_path / "sp")
    assert not (tmp_path / "sp" / "tokenizer.json").exists()
    rows = texts(3)
    ds = get_dataset(write_jsonl(tmp_path / "t.jsonl", rows), sp, seq_len=64)
    check_text_rows(ds, sp, rows)
    assert ds[0]["input_ids"][0] == sp.bos_token_id and ds[0]["input_ids"][-1] == sp.eos_token_id
    conv = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you"}]
    m = get_dataset(write_jsonl(tmp_path / "m.jsonl", [{"messages": conv}]), sp, seq_len=128)[0]
    targets = [m["input_ids"][t + 1] for t, x in enumerate(m["labels"]) if x != IGNORE_INDEX]
    assert sp.decode(targets) == "hello you</s>"


# ------------------------------------------------------------------------------------------------------ lengths


def test_truncate_and_drop_long_counts(tmp_path, tok, caplog):
    rows = [{"text": sentence(i, n)} for i, n in enumerate([3, 40, 4, 50])]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="ds_distill.data"):
        ds = get_dataset(path, tok, seq_len=16)
    assert "truncated 2 of 4 examples longer than seq_len=16" in caplog.text
    assert [len(x) for x in ds["input_ids"]] == [
        len(expect_text(tok, rows[0]["text"])[0]),
        16,
        len(expect_text(tok, rows[2]["text"])[0]),
        16,
    ]
    long_ids = expect_text(tok, rows[1]["text"])[0]
    assert ds[1]["input_ids"] == long_ids[:16] and ds[1]["labels"] == long_ids[1:16] + [IGNORE_INDEX]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ds_distill.data"):
        ds = get_dataset(path, tok, seq_len=16, drop_long=True)
    assert "dropped 2 of 4 examples longer than seq_len=16" in caplog.text
    assert ds["id"] == [0, 2]


# ------------------------------------------------------------------------------------------------------ packing


def test_packing_layout(tmp_path, tok):
    rows = [{"text": sentence(i, n)} for i, n in enumerate([3, 4, 12, 2, 5])]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    plain = get_dataset(path, tok, seq_len=24)
    lens = [len(x) for x in plain["input_ids"]]
    packed = get_dataset(path, tok, seq_len=24, packing=True)
    # Greedy next-fit over whole documents, in order.
    blocks, cur = [], []
    for i, n in enumerate(lens):
        if cur and sum(lens[j] for j in cur) + n > 24:
            blocks.append(cur)
            cur = []
        cur.append(i)
    blocks.append(cur)
    assert packed["doc_ids"] == blocks and packed["id"] == [b[0] for b in blocks]
    for row, docs in zip(packed, blocks):
        assert row["input_ids"] == sum((plain[j]["input_ids"] for j in docs), [])
        assert row["labels"] == sum((plain[j]["labels"] for j in docs), [])  # -100 ends every document
        assert row["position_ids"] == sum((list(range(lens[j])) for j in docs), [])
        assert len(row["input_ids"]) <= 24


def test_packed_documents_do_not_see_each_other(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    model_dir = tiny.make_model(tmp_path / "model", tok, layers=2, hidden=32, heads=4, seed=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = [{"text": sentence(i, n)} for i, n in enumerate([5, 9, 3, 14, 6, 2, 8])]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    plain = get_dataset(path, tok, seq_len=32)
    packed = get_dataset(path, tok, seq_len=32, packing=True)
    assert any(len(d) > 1 for d in packed["doc_ids"])
    batch = collate(packed[:], pad_token_id=tok.pad_token_id)  # several blocks of different lengths: pads too
    B, T = batch["input_ids"].shape
    assert "attention_mask" not in batch  # transformers finds the documents from position_ids
    with torch.no_grad():
        # use_cache=False, as the trainer runs: transformers reads packed documents from position_ids only
        # without a cache
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        assert torch.isfinite(logits).all()  # pads form their own block: no query row is fully masked
        for b, docs in enumerate(packed["doc_ids"]):
            start = 0
            for doc in docs:
                ids = torch.tensor([plain[doc]["input_ids"]])
                alone = model(input_ids=ids).logits[0]
                torch.testing.assert_close(logits[b, start : start + ids.shape[1]], alone, atol=1e-5, rtol=0)
                start += ids.shape[1]


# ------------------------------------------------------------------------------------------------------ batches


def small_dataset(n=23, lengths=None):
    lengths = lengths or [2 + i % 5 for i in range(n)]
    rows = [
        {
            "id": 1000 + i,
            "row": 1000 + i,
            "input_ids": list(range(1, L + 1)),
            "labels": list(range(2, L + 1)) + [IGNORE_INDEX],
        }
        for i, L in enumerate(lengths)
    ]
    return datasets.Dataset.from_list(rows)


def test_collate_dynamic_padding():
    ds = small_dataset(lengths=[2, 4, 3])
    batch = collate(ds[:], pad_token_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "example_ids"}
    assert batch["input_ids"].tolist() == [[1, 2, 0, 0], [1, 2, 3, 4], [1, 2, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[2, -100, -100, -100], [2, 3, 4, -100], [2, 3, -100, -100]]
    assert batch["example_ids"].dtype == torch.int64 and batch["example_ids"].tolist() == [1000, 1001, 1002]


def take(stream, k):
    return [next(stream) for _ in range(k)]


def test_two_ranks_disjoint_and_cover_each_epoch():
    ds = small_dataset(23)
    streams = [BatchStream(ds, batch_size=3, rank=r, world_size=2, seed=5, pad_token_id=0) for r in range(2)]
    # Micro-steps of 2 x 3 = 6 examples: 3 per epoch, 18 of 23 examples read, 5 dropped.
    for epoch in range(2):
        seen = [sum((b.example_ids.tolist() for b in take(s, 3)), []) for s in streams]
        assert all(s.epoch == epoch for s in streams)
        assert len(seen[0]) == len(seen[1]) == 9 and not set(seen[0]) & set(seen[1])
        shards = [streams[r]._shard_of(epoch) for r in range(2)]  # what each rank reads in the epoch, disjoint
        assert len(set(shards[0]) | set(shards[1])) == 18 and [1000 + i for i in shards[0][:3]] == seen[0][:3]
    assert next(streams[0]).example_ids is not None and streams[0].epoch == 2
    first = [BatchStream(ds, batch_size=3, rank=0, world_size=2, seed=5, pad_token_id=0)._shard_of(e) for e in (0, 1)]
    assert first[0] != first[1]  # a new permutation each epoch
    s = BatchStream(ds, batch_size=3, rank=0, world_size=1, seed=0, pad_token_id=None, shuffle=False)  # no pad token
    assert next(s).example_ids.tolist() == [1000, 1001, 1002]


def test_exact_resume_across_epoch_boundary():
    ds = small_dataset(23)
    kw = dict(batch_size=3, rank=1, world_size=2, seed=7, pad_token_id=0)
    reference = take(BatchStream(ds, **kw), 10)  # 3 batches per epoch: crosses two epoch boundaries
    for k in (0, 2, 3, 5):
        first = BatchStream(ds, **kw)
        take(first, k)
        state = first.state_dict()
        assert set(state) == {"epoch", "consumed"}
        resumed = BatchStream(ds, **kw)
        resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
        for got, want in zip(take(resumed, 10 - k), reference[k:]):
            assert as_lists(got) == as_lists(want)


@pytest.mark.parametrize("k", [0, 2, 3, 5])
def test_resume_on_another_number_of_ranks_reads_the_same_examples(k):
    """2 ranks x 3, a checkpoint after k micro-steps, then 1 rank x 6 (a requeue onto a smaller allocation) and back
    to 2 ranks: per global step, the example ids equal those of an uninterrupted run, none skipped or repeated."""
    ds = small_dataset(23)

    def streams(world, state=None):
        out = [
            BatchStream(ds, batch_size=6 // world, rank=r, world_size=world, seed=7, pad_token_id=0)
            for r in range(world)
        ]
        for s in out:
            s.load_state_dict(json.loads(json.dumps(state))) if state else None
        return out

    def steps(ranks, n):  # the sorted example ids of each of n global steps
        return [sorted(sum((next(s).example_ids.tolist() for s in ranks), [])) for _ in range(n)]

    straight = steps(streams(2), 10)  # 3 steps per epoch: crosses epoch boundaries
    two = streams(2)
    got = steps(two, k)
    one = streams(1, two[0].state_dict())
    assert two[0].state_dict() == two[1].state_dict()  # the position is global: every rank saves the same
    got += steps(one, 3)
    got += steps(streams(2, one[0].state_dict()), 7 - k)
    assert got == straight
    assert len({i for step in straight[:3] for i in step}) == 18  # an epoch reads each example at most once


def test_batch_stream_too_small():
    with pytest.raises(UsageError, match="23 examples.*each of 4 ranks 5.*micro-batch size 8"):
        BatchStream(small_dataset(23), batch_size=8, rank=0, world_size=4, seed=0, pad_token_id=0)


def test_split_eval_deterministic_and_disjoint():
    ds = small_dataset(40)
    train, held = split_eval(ds, 0.1, seed=3)
    assert len(held) == 4 and len(train) == 36
    train_ids, held_ids = list(train["id"]), list(held["id"])
    assert sorted(train_ids + held_ids) == list(ds["id"]) and held_ids == sorted(held_ids)
    assert list(split_eval(ds, 0.1, seed=3)[1]["id"]) == held_ids
    assert list(split_eval(ds, 0.1, seed=4)[1]["id"]) != held_ids
    with pytest.raises(UsageError, match="eval_fraction"):
        split_eval(ds, 1.0, seed=0)


def test_split_eval_small_data_keeps_a_micro_batch_per_rank_or_turns_eval_off(caplog):
    ds = small_dataset(40)
    train, held = split_eval(ds, 0.05, seed=0, min_eval=4)  # round(40 * 0.05) = 2 < one micro-batch per rank
    assert len(held) == 4 and len(train) == 36
    with caplog.at_level(logging.INFO, logger="ds_distill.data"):
        train, held = split_eval(small_dataset(7), 0.05, seed=0, min_eval=4)
    assert held is None and len(train) == 7
    assert "evaluation off: 7 examples are too few to hold out one micro-batch per rank (4)" in caplog.text
    assert len(split_eval(small_dataset(8), 0.05, seed=0, min_eval=4)[1]) == 4


# ------------------------------------------------------------------------------------------------------ bad data


def test_bad_data_errors(tmp_path, tok):
    path = write_jsonl(tmp_path / "cols.jsonl", [{"body": "x", "title": "y"}])
    with pytest.raises(
        UsageError, match=r"columns \['body', 'title'\]; expected 'text', or 'prompt' \+ 'completion', or 'messages'"
    ):
        get_dataset(path, tok, seq_len=16)
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "x"}])
    with pytest.raises(UsageError, match=r"needs \['prompt', 'completion'\]"):
        get_dataset(path, tok, seq_len=16, data_format="prompt_completion")

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UsageError, match="empty.jsonl' is empty"):
        get_dataset(str(tmp_path / "empty.jsonl"), tok, seq_len=16)
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(UsageError, match="has no examples"):
        get_dataset(str(tmp_path / "blank.txt"), tok, seq_len=16)

    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",,}\n')
    with pytest.raises(UsageError, match=r"bad.jsonl' line 3 is not valid JSON"):
        get_dataset(str(tmp_path / "bad.jsonl"), tok, seq_len=16)
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "a"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(UsageError, match=r"latin1.jsonl' line 2 is not valid UTF-8"):
        get_dataset(str(tmp_path / "latin1.jsonl"), tok, seq_len=16)
    (tmp_path / "latin1.txt").write_bytes("ok\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(UsageError, match=r"latin1.txt' line 2 is not valid UTF-8"):
        get_dataset(str(tmp_path / "latin1.txt"), tok, seq_len=16)

    with pytest.raises(UsageError, match="does not exist"):
        get_dataset(str(tmp_path / "missing.jsonl"), tok, seq_len=16)
    with pytest.raises(UsageError, match="data_format 'chat' is unknown"):
        get_dataset(str(tmp_path / "cols.jsonl"), tok, seq_len=16, data_format="chat")


def test_prefix_unstable_template_is_refused(tmp_path, tok):
    # A template that renders the final assistant turn differently from earlier ones (as some "thinking" templates
    # do) cannot be diffed by prefixes: refuse rather than supervise the wrong tokens.
    odd = tiny.make_tokenizer(tmp_path / "odd")
    odd.chat_template = (
        "{% for m in messages %}{% if loop.last %}{{ 'LAST ' }}{% endif %}"
        "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": conv}])
    with pytest.raises(
        UsageError,
        match=r"example id 0, turn 1: the chat template renders the context of this reply .*"
        r"\('LAST <\|user.*' vs '<\|user.*' at character 0\).*--chat_template FILE",
    ):
        get_dataset(path, odd, seq_len=64)


def test_examples_without_targets_are_dropped(tmp_path, tok, caplog):
    rows = [{"prompt": sentence(0, 30), "completion": " fox"}, {"prompt": "hello", "completion": " fine"}]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="ds_distill.data"):
        ds = get_dataset(path, tok, seq_len=8)  # the first prompt alone is longer than 8 tokens
    assert ds["id"] == [1]
    assert "truncated 1 of 2" in caplog.text and "dropped 1 examples with no supervised token" in caplog.text


def _main_process_first_worker(rank: int, init_file: str, log_file: str) -> None:
    import time

    from ds_distill.runtime.distributed import main_process_first

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        with main_process_first():
            with open(log_file, "a") as fh:
                fh.write(f"enter {rank}\n")
            time.sleep(0.3)
            with open(log_file, "a") as fh:
                fh.write(f"exit {rank}\n")
    finally:
        torch.distributed.destroy_process_group()


def test_main_process_first_orders_ranks(tmp_path):
    import torch.multiprocessing as mp

    log_file = tmp_path / "log"
    mp.spawn(_main_process_first_worker, args=(str(tmp_path / "init"), str(log_file)), nprocs=2, join=True)
    assert log_file.read_text().split("\n")[:4] == ["enter 0", "exit 0", "enter 1", "exit 1"]


# ------------------------------------------------------------------------------------- messy files (issue 13)
BAD_ROWS = [  # (file content, error naming the file's line and the field)
    ('{"text": "a"}\n\n{"text": null}\n', r"bad.jsonl' line 3: field 'text' is null, not a string"),
    ('{"text": "a"}\n{"text": 5}\n', r"bad.jsonl' line 2: field 'text' is a JSON 5, not a string"),
    ('{"text": 5}\n{"text": 6}\n', r"bad.jsonl' line 1: field 'text' is of type int64, not a string"),
    (
        '{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": null}\n',
        r"bad.jsonl' line 2: field 'completion' is null",
    ),
    ('{"prompt": null, "completion": "b"}\n', r"bad.jsonl' line 1: field 'prompt' is null"),
    (
        '{"messages": [{"role": "user", "content": "hi"}]}\n'
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null}]}\n',
        r"bad.jsonl' line 2: field 'messages\[1\].content' is null",
    ),
    (
        '{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "user", "content": ["x"]}]}\n',
        r"bad.jsonl' line 2: field 'messages\[0\].content' is a JSON \[\"x\"\], not a string",
    ),
    (
        '{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": null}\n',
        r"bad.jsonl' line 2: field 'messages' is null",
    ),
    ('{"id": 1, "text": "a"}\n{"id": null, "text": "b"}\n', r"bad.jsonl' line 2: field 'id' is null"),
    (
        '{"id": 1, "text": "a"}\n{"id": "conv-2", "text": "b"}\n',
        r"bad.jsonl' line 2: field 'id' is 'conv-2' but the first row's id is 1: use one id type",
    ),
    ('{"id": "a", "text": "a"}\n{"id": "a", "text": "b"}\n', r"duplicate values in its 'id' column"),
]


@pytest.mark.parametrize("content, error", BAD_ROWS)
def test_bad_rows_one_line_before_training(tmp_path, tok, content, error):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(UsageError, match=error):
        get_dataset(str(tmp_path / "bad.jsonl"), tok, seq_len=32)


def test_bad_row_in_a_folder_names_its_file_and_line(tmp_path, tok):
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "a.jsonl", texts(3))
    write_jsonl(tmp_path / "d" / "b.jsonl", [*texts(2), {"text": None}])
    with pytest.raises(UsageError, match=r"d/b.jsonl' line 3: field 'text' is null"):
        get_dataset(str(tmp_path / "d"), tok, seq_len=32)
    datasets.Dataset.from_list([*texts(2), {"text": None}]).to_parquet(tmp_path / "c.parquet")
    with pytest.raises(UsageError, match=r"c.parquet' row 3: field 'text' is null"):
        get_dataset(str(tmp_path / "c.parquet"), tok, seq_len=32)
    (tmp_path / "e.json").write_text(json.dumps([*texts(1), {"text": None}]))
    with pytest.raises(UsageError, match=r"e.json' entry 2: field 'text' is null"):
        get_dataset(str(tmp_path / "e.json"), tok, seq_len=32)


def test_bom_is_dropped_from_every_text_source(tmp_path, tok):
    rows = texts(2)
    plain = get_dataset(write_jsonl(tmp_path / "plain.jsonl", rows), tok, seq_len=64)["input_ids"]
    bom = "\ufeff"
    (tmp_path / "a.txt").write_text(bom + "".join(r["text"] + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "a.jsonl").write_text(bom + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "a.json").write_text(bom + json.dumps(rows), encoding="utf-8")
    for name in ("a.txt", "a.jsonl", "a.json"):
        assert get_dataset(str(tmp_path / name), tok, seq_len=64)["input_ids"] == plain, name
    (tmp_path / "md").mkdir()
    (tmp_path / "md" / "a.md").write_text(bom + "# title\n", encoding="utf-8")
    assert get_dataset(str(tmp_path / "md"), tok, seq_len=64)[0]["input_ids"] == expect_text(tok, "# title\n")[0]


def test_a_file_of_only_empty_rows_is_refused_and_empty_rows_are_dropped(tmp_path, tok, caplog):
    """Empty texts would train on <s></s> pairs (and empty completions on prompt-then-eos) without a word (issue 30)."""
    for rows, field in (([{"text": ""}, {"text": "  "}], "text"), ([{"prompt": "a", "completion": ""}], "completion")):
        with pytest.raises(UsageError, match=f"every row's '{field}' is empty, so there is nothing to supervise"):
            get_dataset(write_jsonl(tmp_path / "empty.jsonl", rows), tok, seq_len=64)
    rows = [{"text": ""}, *texts(3), {"text": "\n"}]
    with caplog.at_level(logging.WARNING, logger="ds_distill.data"):
        ds = get_dataset(write_jsonl(tmp_path / "some.jsonl", rows), tok, seq_len=64)
    assert ds["row"] == [1, 2, 3] and "dropped 2 of 5 rows whose 'text' is empty" in caplog.text
    for got, row in zip(ds, rows[1:4]):
        assert got["input_ids"] == expect_text(tok, row["text"])[0]


def test_hub_layout_folder_reads_the_asked_split(tmp_path, tok):
    """A dataset folder as the Hub lays it out (README.md, data/train-00000-of-00001.parquet, data/test-...): --data
    reads the --data_split files only (the README is no data, the test split is not mixed into training)."""
    (tmp_path / "hub" / "data").mkdir(parents=True)
    (tmp_path / "hub" / "README.md").write_text("---\nlicense: mit\n---\n# a dataset card\n")
    train_rows, test_rows = texts(5), [{"text": "held out " + sentence(i)} for i in range(3)]
    datasets.Dataset.from_list(train_rows).to_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    datasets.Dataset.from_list(test_rows).to_parquet(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet")
    check_text_rows(get_dataset(str(tmp_path / "hub"), tok, seq_len=64), tok, train_rows)
    check_text_rows(get_dataset(str(tmp_path / "hub"), tok, seq_len=64, split="test"), tok, test_rows)
    with pytest.raises(UsageError, match=r"has splits \['test', 'train'\], not 'validation'"):
        get_dataset(str(tmp_path / "hub"), tok, seq_len=64, split="validation")
