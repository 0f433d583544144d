"""Coverage matrix: every causal LM family a user would distil, as tiny random models from transformers' own configs.

For each family: the chunked loss's head gives the model's own logits; a packed document's logits equal the document
alone under every attention implementation the family supports (documents longer than the sliding windows); a
2-step run through the real entry point exports a folder whose logits equal the engine's. Plus the refusals: a
--seq_len beyond a model's positions, and the Granite logit scale that used to be dropped.
"""

import json
from pathlib import Path

import pytest
import torch
import transformers

from ds_distill import models, train
from ds_distill.common import UsageError
from ds_distill.config import parse_args
from ds_distill.data import collate
from ds_distill.ds_config import REPO_CONFIGS

# Every family: hidden 16, 1-2 layers, 64 positions; sliding windows (4) shorter than the test documents (12 tokens).
DIMS = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
)
MOE = dict(num_experts_per_tok=2, output_router_logits=False)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", dict(sliding_window=4)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=4, max_window_layers=0)),
    "qwen3": ("Qwen3Config", dict(head_dim=8)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=8, num_experts=4, moe_intermediate_size=16, **MOE)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, sliding_window=4, **MOE)),
    "gpt_oss": (
        "GptOssConfig",
        dict(
            head_dim=8,
            num_local_experts=4,
            sliding_window=4,
            num_hidden_layers=2,
            layer_types=["sliding_attention", "full_attention"],
            **MOE,
        ),
    ),
    "gemma": ("GemmaConfig", dict(head_dim=8)),
    "gemma2": (
        "Gemma2Config",
        dict(
            head_dim=8, sliding_window=4, num_hidden_layers=2, final_logit_softcapping=0.5, attn_logit_softcapping=1.0
        ),
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        dict(
            head_dim=8,
            sliding_window=4,
            num_hidden_layers=2,
            layer_types=["sliding_attention", "full_attention"],
            final_logit_softcapping=0.5,
        ),
    ),
    "phi3": ("Phi3Config", dict(sliding_window=4)),
    "granite": ("GraniteConfig", dict(logits_scaling=8.0, initializer_range=1.0)),  # large logits: the scale matters
    "cohere": ("CohereConfig", dict(logit_scale=0.25)),
    "olmo2": ("Olmo2Config", {}),
    "gpt_neox": ("GPTNeoXConfig", dict(use_parallel_residual=True)),
    "gpt2": ("GPT2Config", dict(n_embd=16, n_layer=1, n_head=2, n_positions=64)),
    "starcoder2": ("Starcoder2Config", dict(sliding_window=4)),
}
# Families whose post-projection transform is not the identity: the probe must have found one.
TRANSFORMED = {"gemma2", "gemma3_text", "granite", "cohere"}
# Families whose decoder builds its mask without position_ids (transformers 5.24): packed documents would see each
# other, so --packing is refused for them at start-up (the probe); they train unpacked.
NO_PACKING = {"gpt_oss"}


def make_family(root: Path, name: str, tok, **overrides) -> str:
    """Save a tiny random model of `name` (FAMILIES) plus the tokenizer to root/name; return the path."""
    cls, extra = FAMILIES[name]
    kw = {**DIMS, **extra, **overrides} if cls != "GPT2Config" else {**extra, **overrides}
    config = getattr(transformers, cls)(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **kw,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32)
    path = root / name
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def family_root(tiny, tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.fixture
def family(request, tiny, family_root):
    name = request.param
    path = family_root / name
    return name, (str(path) if path.is_dir() else make_family(family_root, name, tiny["tokenizer"]))


def impls(path: str) -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(transformers.AutoConfig.from_pretrained(path))]
    return ["eager"] + (["sdpa"] if cls._supports_sdpa else [])


def documents(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in (12, 7, 12, 5)]


@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_head_and_packing_give_the_models_own_logits(family):
    name, path = family
    for impl in impls(path):
        lm = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=impl
        ).eval()
        wrapped = models.HiddenStatesLM(lm)
        assert (wrapped.transform is not None) == (name in TRANSFORMED), name
        docs = documents(lm.config.vocab_size)
        # two packed rows of different lengths: [12 + 7] and [12 + 5 + pads]
        rows = {
            "input_ids": [docs[0] + docs[1], docs[2] + docs[3]],
            "labels": [[0] * 19, [0] * 17],
            "row": [0, 1],
            "position_ids": [list(range(12)) + list(range(7)), list(range(12)) + list(range(5))],
        }
        batch = collate(rows, pad_token_id=0)
        assert "attention_mask" not in batch
        with torch.no_grad():
            hidden = wrapped(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
            packed = wrapped.head(hidden.flatten(0, 1)).reshape(2, 19, -1)
            starts = [(0, 0), (0, 12), (1, 0), (1, 12)]
            for (b, start), doc in zip(starts, docs):
                ids = torch.tensor([doc])
                alone = lm(input_ids=ids).logits[0]
                # the head on the document's own hidden states: the model's own logits
                torch.testing.assert_close(wrapped.head(wrapped(input_ids=ids)[0]), alone, atol=1e-5, rtol=1e-5)
                if name in NO_PACKING:
                    continue
                torch.testing.assert_close(
                    packed[b, start : start + len(doc)],
                    alone,
                    atol=1e-5,
                    rtol=1e-5,
                    msg=lambda m: f"{name} {impl}: packed != alone\n{m}",
                )
            if name in NO_PACKING:  # the second document of a row does see the first: hence the refusal
                assert not torch.allclose(packed[0, 12:], lm(input_ids=torch.tensor([docs[1]])).logits[0], atol=1e-3)


def family_argv(path: str, data: str, out: Path, ds: str, *extra: str) -> list[str]:
    return [
        "--teacher",
        path,
        "--student",
        path,
        "--data",
        data,
        "--output_dir",
        str(out),
        "--deepspeed_config",
        ds,
        "--teacher_deepspeed_config",
        str(REPO_CONFIGS / "cpu_teacher_replicated.json"),
        "--max_steps",
        "2",
        "--seq_len",
        "16",
        "--eval_fraction",
        "0",
        "--chunk_size",
        "16",
        "--log_steps",
        "1",
        "--packing",
        *extra,
    ]


@pytest.fixture(scope="module")
def sgd_json(tmp_path_factory):
    d = json.loads((REPO_CONFIGS / "cpu_zero3.json").read_text())
    d.pop("scheduler", None)
    d["optimizer"]["params"]["lr"] = 1e-2
    path = tmp_path_factory.mktemp("ds") / "z3.json"
    path.write_text(json.dumps(d))
    return str(path)


@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_two_steps_export_the_engine_logits(family, tiny, dist_env, tmp_path, sgd_json, capsys, keep_process_group):
    name, path = family
    # A teacher engine (alpha 0.5) where its logits need the model's own post-processing; elsewhere alpha 1 saves time.
    argv = family_argv(
        path,
        tiny["data"],
        tmp_path / "run",
        sgd_json,
        "--export",
        "true",
        "--alpha",
        "0.5" if name in TRANSFORMED else "1",
    )
    if name in NO_PACKING:
        assert train.main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and "a packed document's logits differ from the document alone" in err[0], err
        argv.remove("--packing")
        argv[argv.index("--output_dir") + 1] = str(tmp_path / "unpacked")
    trainer = train.run(parse_args(argv))
    assert trainer.step == 2
    exported = transformers.AutoModelForCausalLM.from_pretrained(
        Path(trainer.cfg.output_dir) / "final", dtype=torch.float32
    ).eval()
    inputs = next(trainer.train).inputs
    with torch.no_grad():
        trainer.student.eval()
        engine_logits = trainer.student.module.head(trainer.student(**inputs))
        torch.testing.assert_close(exported(**inputs).logits, engine_logits, atol=1e-5, rtol=1e-5)
        before = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(**inputs).logits
    assert not torch.allclose(before, engine_logits, atol=1e-4), "the two steps must have changed the student"


def test_seq_len_beyond_positions_is_refused_before_loading(
    tiny, family_root, tmp_path, monkeypatch, capsys, keep_process_group
):
    gpt2 = make_family(family_root, "gpt2", tiny["tokenizer"], n_positions=32)
    loads = []
    monkeypatch.setattr(models.loading, "load_model", lambda *a, **k: loads.append(a))
    argv = family_argv(gpt2, tiny["data"], tmp_path / "run", str(REPO_CONFIGS / "cpu_zero3.json"))
    argv[argv.index("--seq_len") + 1] = "64"
    assert train.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == [
        f"error: --seq_len 64 is longer than model {gpt2!r} supports (32 positions, max_position_embeddings "
        "in its config.json): use --seq_len 32 or less"
    ], err
    assert loads == []


def test_granite_logit_scale_is_in_the_loss(tiny, family_root, dist_env, tmp_path, sgd_json):
    """The issue's case: Granite with logits_scaling 8 as student and teacher, alpha 1, lr 0: the trainer's eval CE
    equals the CE of the model's own forward (ds_distill.evaluate), not that of lm_head alone."""
    from ds_distill.evaluate import perplexity

    path = (
        str(family_root / "granite")
        if (family_root / "granite").is_dir()
        else make_family(family_root, "granite", tiny["tokenizer"])
    )
    d = json.loads(Path(sgd_json).read_text())
    d["optimizer"]["params"]["lr"] = 0.0
    ds = tmp_path / "lr0.json"
    ds.write_text(json.dumps(d))
    argv = family_argv(
        path,
        tiny["data"],
        tmp_path / "run",
        str(ds),
        "--alpha",
        "1",
        "--eval_data",
        tiny["data"],
        "--eval_batches",
        "0",
        "--export",
        "false",
    )
    argv.remove("--packing")
    own = perplexity(path, tiny["data"], seq_len=16)  # before the trainer sets a global ZeRO-3 config for loading
    trainer = train.run(parse_args(argv))
    ce = [h["Eval/ce"] for h in trainer.history if "Eval/ce" in h][-1]
    assert ce == pytest.approx(own["ce"], rel=1e-4), (ce, own)


def test_probe_stops_on_wrong_logits(
    tiny, family_root, dist_env, tmp_path, sgd_json, monkeypatch, capsys, keep_process_group
):
    """A head that drops the model's post-processing (what ds-distill did for Granite) stops the run in one line."""
    path = (
        str(family_root / "granite")
        if (family_root / "granite").is_dir()
        else make_family(family_root, "granite", tiny["tokenizer"])
    )
    monkeypatch.setattr(models.LogitTransform, "of", classmethod(lambda cls, lm: None))
    assert train.main(family_argv(path, tiny["data"], tmp_path / "run", sgd_json)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith(
        f"error: model {path!r}: the chunked loss's head does not give the model's own logits (max abs difference"
    ), err


@pytest.mark.multiprocess
def test_moe_families_under_zero3_on_two_ranks(tiny, family_root, tmp_path):
    """Qwen3-MoE student, Mixtral and gpt-oss teachers, all ZeRO-3 over 2 ranks through the real deepspeed launcher.

    The ranks see different examples, so their tokens pick different experts; each MoE block is one ZeRO-3 leaf, so
    the gathers still match and nothing hangs. Every rank runs the start-up logits probe on every model."""
    from tests.helpers import ds_json, launch_args
    from tests.launch import deepspeed

    paths = {
        n: str(family_root / n) if (family_root / n).is_dir() else make_family(family_root, n, tiny["tokenizer"])
        for n in ("qwen3_moe", "mixtral", "gpt_oss")
    }
    z3 = ds_json(tmp_path, name="z3.json", lr=None, train_micro_batch_size_per_gpu=2)
    out = tmp_path / "moe"
    pair = {**tiny, "student": paths["qwen3_moe"], "teacher": [paths["mixtral"], paths["gpt_oss"]]}
    proc = deepspeed("ds_distill.train", launch_args(pair, out, z3, seq_len=16, chunk_size=8))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for name in ("Qwen3MoeSparseMoeBlock", "MixtralSparseMoeBlock", "GptOssMLP"):
        assert f"ZeRO-3 leaf modules ['{name}']" in log, name
    assert (out / "final" / "config.json").is_file()


# ------------------------------------------------------------------------------- the registry sweep
# Every causal-LM class of transformers' registry, built once from its config class with these sizes (each keyword
# only where the config's __init__ takes it). The model's own forward is the truth: HiddenStatesLM's hidden states
# through its head give the model's own logits, or the derivation stops in one line (UsageError) naming the family.
SWEEP_SIZES = dict(
    DIMS,  # hidden 16, intermediate 32, 1 layer, 2 heads, 1 key/value head, 64 positions; then the other names of each
    vocab_size=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    d_model=16,
    n_embd=16,
    n_embed=16,
    ffn_dim=32,
    n_inner=32,
    n_layer=1,
    num_layers=1,
    decoder_layers=1,
    n_head=2,
    decoder_attention_heads=2,
    head_dim=8,
    rotary_dim=4,
    n_positions=64,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    moe_intermediate_size=16,
    num_experts_per_tok=2,
    output_router_logits=False,
)
# Per family, sizes the generic ones do not satisfy: multi-head latent attention and DiffLlama need as many (or an
# even number of) key/value heads as query heads.
SWEEP_EXTRA: dict[str, dict] = {
    n: dict(num_key_value_heads=2)
    for n in ("deepseek_v2", "deepseek_v3", "minicpm3", "sarvam_mla", "youtu", "axk1", "axk2", "diffllama")
}
SWEEP_MAX_PARAMS = 2_000_000  # counted on the meta device first: a family these sizes do not reach is not built
# Families whose whole model (not only the output layer) cannot be built tiny from the generic sizes: the reason.
# Checked both ways: a family listed here that builds, or one that fails to build and is not listed, fails the test.
SWEEP_SKIP: dict[str, str] = {
    "bamba": "StrictDataclassClassValidationError: Class validation error for validator 'validate_architec...",
    "blt": "4633M parameters at these sizes (sub-configs or fixed dims keep full size)",
    "cohere_compass_text": "KeyError: 'full_attention'",
    "dbrx": "AttributeError: 'DbrxAttentionConfig' object has no attribute 'rope_theta'",
    "deepseek_v32": "13M parameters at these sizes (sub-configs or fixed dims keep full size)",
    "dots1": "TypeError: unsupported operand type(s) for *: 'int' and 'NoneType'",
    "dots3_note": "AttributeError: 'Dots3NoteConfig' object has no attribute 'pad_token_id'",
    "dots3_note_text": (
        "StrictDataclassClassValidationError: Class validation error for validator 'validate_architec..."
    ),
    "emu3": "AttributeError: 'Emu3Config' object has no attribute 'pad_token_id'",
    "fuyu": "9408M parameters at these sizes (sub-configs or fixed dims keep full size)",
    "gemma3": "2723M parameters at these sizes (sub-configs or fixed dims keep full size)",
    "gemma3n": "needs an extra library (ImportError)",
    "gemma3n_text": "ValueError: The set of layer types producing a cache is different than the set of layer type...",
    "gemma4": "5077M parameters at these sizes (sub-configs or fixed dims keep full size)",
    "gemma4_assistant": (
        "StrictDataclassClassValidationError: Class validation error for validator 'validate_architec..."
    ),
    "gemma4_text": "67M parameters at these sizes (sub-configs or fixed dims keep full size)",
    "gemma4_unified": "3011M parameters at these sizes (sub-configs or fixed dims keep full size)",
    "gemma4_unified_assistant": "2872M parameters at these sizes (sub-configs or fixed dims keep full size)",
    "git": "86M parameters at these sizes (sub-configs or fixed dims keep full size)",
    "glm_moe_dsa": "10M parameters at these sizes (sub-configs or fixed dims keep full size)",
    "got_ocr2": "561M parameters at these sizes (sub-configs or fixed dims keep full size)",
    "gpt_neo": "StrictDataclassClassValidationError: Class validation error for validator 'validate_architec...",
    "granitemoehybrid": (
        "StrictDataclassClassValidationError: Class validation error for validator 'validate_architec..."
    ),
    "hy_v4": "4M parameters at these sizes (sub-configs or fixed dims keep full size)",
    "inkling2_loop_text": "3M parameters at these sizes (sub-configs or fixed dims keep full size)",
    "inkling2_text": "4M parameters at these sizes (sub-configs or fixed dims keep full size)",
    "lfm2_moe": "TypeError: 'NoneType' object is not subscriptable",
    "llama4": "AttributeError: 'Llama4Config' object has no attribute 'pad_token_id'",
    "longcat_flash": "20M parameters at these sizes (sub-configs or fixed dims keep full size)",
    "mamba2": "StrictDataclassClassValidationError: Class validation error for validator 'validate_architec...",
    "mllama": "9775M parameters at these sizes (sub-configs or fixed dims keep full size)",
    "moss_transcribe_diarize": "909M parameters at these sizes (sub-configs or fixed dims keep full size)",
    "musicgen": "AttributeError: 'MusicgenConfig' object has no attribute 'dropout'",
    "musicgen_melody": "AttributeError: 'MusicgenMelodyConfig' object has no attribute 'dropout'",
    "olmo_hybrid": "StrictDataclassClassValidationError: Class validation error for validator 'validate_architec...",
    "phi4_multimodal": "870M parameters at these sizes (sub-configs or fixed dims keep full size)",
    "qwen3_5": "AttributeError: 'Qwen3_5Config' object has no attribute 'vocab_size'",
    "qwen3_5_moe": "AttributeError: 'Qwen3_5MoeConfig' object has no attribute 'vocab_size'",
    "qwen4_exp": "AttributeError: 'Qwen4ExpConfig' object has no attribute 'vocab_size'",
    "reformer": "AssertionError: If you want to use `ReformerModelWithLMHead` make sure that `is_decoder=True`.",
    "roc_bert": "13M parameters at these sizes (sub-configs or fixed dims keep full size)",
    "rwkv": "ZeroDivisionError: division by zero",
    "xlm": "605M parameters at these sizes (sub-configs or fixed dims keep full size)",
    "xmod": "ValueError: Input language unknown. Please call `XmodPreTrainedModel.set_default_language()`",
    "zamba": "StrictDataclassClassValidationError: Class validation error for validator 'validate_layer_type'",
    "zamba2": "StrictDataclassClassValidationError: Class validation error for validator 'validate_layer_type'",
    "zaya": "StrictDataclassClassValidationError: Class validation error for validator 'validate_architec...",
}


def _sweep_build(family: str):
    """(lm, input_ids, own logits) of the tiny model of ``family``, or raise with why it cannot be built tiny."""
    import inspect

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[family]
    params = inspect.signature(config_cls.__init__).parameters
    sizes = {**SWEEP_SIZES, **SWEEP_EXTRA.get(family, {})}
    config = config_cls(**{k: v for k, v in sizes.items() if k in params})
    model_cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family])
    with torch.device("meta"):
        n = sum(p.numel() for p in model_cls(config).parameters())
    if n > SWEEP_MAX_PARAMS:
        raise ValueError(f"{n} parameters at the sweep's sizes (sub-configs keep their full sizes)")
    torch.manual_seed(0)
    lm = model_cls(config).to(torch.float32).eval()
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = lm(input_ids=ids, use_cache=False).logits
    return lm, ids, own


from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402


@pytest.mark.parametrize("family", list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
def test_every_registry_family_gives_its_own_logits_or_one_line(family):
    import logging
    import warnings

    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm, ids, own = _sweep_build(family)
    except Exception as exc:  # noqa: BLE001 - any failure of transformers' own build/forward: the family is skipped
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        assert family in SWEEP_SKIP, f"{family} cannot be built tiny ({why}): list it in SWEEP_SKIP with the reason"
        pytest.skip(f"{family}: {SWEEP_SKIP[family]}")
    assert family not in SWEEP_SKIP, f"{family} builds tiny now: remove it from SWEEP_SKIP"
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        wrapped = models.HiddenStatesLM(lm)
        with torch.no_grad():
            ours = wrapped.head(wrapped(input_ids=ids).flatten(0, 1)).reshape(own.shape)
    except UsageError as exc:
        msg = str(exc)
        assert "\n" not in msg and family in msg, msg
        return
    torch.testing.assert_close(ours, own, atol=1e-5, rtol=1e-5, msg=lambda m: f"{family}: head != own logits\n{m}")


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_moe_router_loss_is_in_the_total_as_the_model_computes_it(name, tiny, dist_env, tmp_path, sgd_json):
    """An MoE student adds coef x its own load_balancing_loss_func (on by default), logged as router_aux: the first
    step's loss is the loss without it plus coef x router_aux, and router_aux is the model's own aux_loss."""
    path = make_family(tmp_path, name, tiny["tokenizer"], router_aux_loss_coef=0.5)
    runs = {}
    for on in ("true", "false"):
        argv = family_argv(path, tiny["data"], tmp_path / on, sgd_json, "--alpha", "1", "--router_aux_loss", on)
        argv[argv.index("--max_steps") + 1] = "1"
        argv.remove("--packing")
        runs[on] = train.run(parse_args(argv)).history[0]
    aux = runs["true"]["Train/router_aux"]
    assert "Train/router_aux" not in runs["false"]
    assert aux > 0.5, "top-2 of 4 experts: the balanced loss is 1, a collapsed one 2"
    assert runs["true"]["Train/loss"] == pytest.approx(runs["false"]["Train/loss"] + 0.5 * aux, rel=1e-5)
    # One micro-batch of one sequence per rank here? No: the logged value is the token-weighted mean of the model's
    # own aux loss over the step's micro-batches; check it on one batch against the model's own forward instead.
    lm = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    wrapped = models.HiddenStatesLM(lm)
    assert wrapped.use_router_loss()
    ids = torch.randint(4, lm.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    wrapped(input_ids=ids, attention_mask=mask)
    own = lm(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    torch.testing.assert_close(wrapped.router_aux, own)


def expert_load(wrapped, ids) -> torch.Tensor:
    """Fraction of top-k assignments each expert gets, over the layers (the model's own router logits)."""
    with torch.no_grad():
        decoder = getattr(wrapped, wrapped.decoder_name)
        logits = decoder(input_ids=ids, output_router_logits=True).router_logits
    k = wrapped.router_loss.top_k
    picks = torch.cat([layer.topk(k, dim=-1).indices.flatten() for layer in logits])
    return torch.bincount(picks, minlength=wrapped.router_loss.num_experts).float() / picks.numel()


@pytest.mark.parametrize("name", ["qwen3_moe"])
def test_router_loss_keeps_expert_load_balanced(name, tiny, tmp_path):
    """A router biased onto experts 0 and 1 (every token's state shares one direction u that their gates favour): 30
    plain-SGD steps on CE plus the router loss spread the load over all 4 experts; on CE alone it stays collapsed."""
    from ds_distill import losses

    path = make_family(tmp_path, name, tiny["tokenizer"], router_aux_loss_coef=1.0)
    ids = torch.randint(4, len(tiny["tokenizer"]), (4, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    loads = {}
    for on in (True, False):
        lm = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        wrapped = models.HiddenStatesLM(lm).train()
        assert wrapped.use_router_loss()
        u = torch.nn.functional.normalize(torch.ones(lm.config.hidden_size), dim=0)
        with torch.no_grad():
            emb = lm.get_input_embeddings().weight
            emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(2)) + 2 * u)
            noise = 0.3 * torch.randn(4, lm.config.hidden_size, generator=torch.Generator().manual_seed(1)) / 4
            for layer in getattr(wrapped, wrapped.decoder_name).layers:
                layer.mlp.gate.weight.copy_(torch.stack([u, u, -u, -u]) + noise)
        before = expert_load(wrapped, ids)
        assert before[:2].sum() > 0.95, f"the construction must collapse the load: {before}"
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.5)
        for _ in range(30):
            out = losses.loss_sums(wrapped.head(wrapped(input_ids=ids)), [], labels, alpha=1.0)
            out = wrapped.with_router_loss(out) if on else out
            wrapped.router_aux = None
            opt.zero_grad()
            (out.total / out.n_tokens).backward()
            opt.step()
        loads[on] = expert_load(wrapped, ids)
    assert loads[True].min() > 0.15, f"with the router loss every expert gets about a quarter: {loads[True]}"
    assert loads[False][:2].sum() > 0.85, f"without it the load stays collapsed: {loads[False]}"
