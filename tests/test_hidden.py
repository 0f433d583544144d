"""Hidden-state losses: float64 invariants of the pure functions, the hooks against the model's own forward, and the
entry point (logged per pair, only the mapped layers kept, refusals in one line)."""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ds_distill import train
from ds_distill.common import IGNORE_INDEX, UsageError
from ds_distill.core import checkpoint
from ds_distill.losses.hidden import HIDDEN_LOSSES, hidden_loss_sums
from ds_distill.models import HiddenStatesLM
from ds_distill.models.capture import LayerCapture, decoder_layers
from ds_distill.models.layer_map import read_provenance
from ds_distill.models.projection import NAME, HiddenProjection
from ds_distill.student_init import make_student
from tests.helpers import ds_json, losses_of, make_cfg, projection_json, run_main, tiny_args


def stepped_cfg(tiny, tmp_path, out: str, **kw):
    """``make_cfg`` with a constant learning rate of 1e-2 (``ds_json``): steps that move the loss."""
    return make_cfg(tiny, tmp_path / out, deepspeed_config=ds_json(tmp_path), **kw)


def ref_hidden(kind, x, y):
    """Per-token reference in float64, written plainly (no shared code with ds_distill.losses.hidden)."""
    d = x - y
    if kind == "mse":
        return (d * d).sum(-1) / x.shape[-1]
    if kind == "cosine":
        return 1 - (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
    if kind == "nmse":
        return (d * d).sum(-1) / (y * y).sum(-1)
    raise AssertionError(kind)


def states(seed, b=3, t=7, h=16, pairs=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, t, h, generator=g, dtype=torch.float64) for _ in range(pairs)]


def labels_of(b=3, t=7, masked=(0, 2)):
    labels = torch.arange(b * t).reshape(b, t) % 5
    labels[masked] = IGNORE_INDEX
    labels[1, :3] = IGNORE_INDEX
    return labels


def test_registry_is_exactly_the_three_kinds():
    assert sorted(HIDDEN_LOSSES) == ["cosine", "mse", "nmse"]


@pytest.mark.parametrize("kind", sorted(HIDDEN_LOSSES))
@pytest.mark.parametrize("chunk_size", [0, 1, 4, 100])
def test_value_and_grad_match_float64_reference_chunked_or_not(kind, chunk_size):
    """Sums over supervised tokens only, per pair; chunked = unchunked = the reference, values and gradients."""
    xs = [x.requires_grad_() for x in states(0)]
    ys, labels = states(1), labels_of()
    got = hidden_loss_sums(xs, ys, labels, loss=kind, chunk_size=chunk_size)
    assert got.dtype == torch.float64 and got.shape == (2,)
    keep = labels != IGNORE_INDEX
    ref = torch.stack([ref_hidden(kind, x[keep], y[keep]).sum() for x, y in zip(xs, ys)])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(got.sum(), xs)
    g_ref = torch.autograd.grad(ref.sum(), xs)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert (a[~keep] == 0).all(), "masked positions get no gradient"


@pytest.mark.parametrize("kind", sorted(HIDDEN_LOSSES))
def test_all_masked_is_a_finite_zero_with_zero_grads(kind):
    xs = [x.requires_grad_() for x in states(0)]
    got = hidden_loss_sums(xs, states(1), torch.full((3, 7), IGNORE_INDEX), loss=kind)
    assert got.tolist() == [0.0, 0.0]
    got.sum().backward()
    assert all((x.grad == 0).all() for x in xs)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown"):
        hidden_loss_sums(states(0), states(1), labels_of(), loss="l1")
    with pytest.raises(ValueError, match="must both be"):
        hidden_loss_sums(states(0), states(1, h=8), labels_of(), loss="mse")


def _wrapped(path):
    return HiddenStatesLM(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64))


@pytest.mark.parametrize("kind", sorted(HIDDEN_LOSSES))
def test_whole_teacher_copy_has_zero_loss_and_gradient(tiny, tmp_path, kind):
    """A student that is the whole teacher (student_init keeps every layer): with the auto map from its provenance
    file, every hidden loss and its gradient are 0 (float64), and the hooks' states are the model's own."""
    from ds_distill.models.layer_map import hidden_layer_map

    make_student(tiny["teacher"], tmp_path / "s", layers=[0, 1])
    pairs = hidden_layer_map("auto", str(tmp_path / "s"), 2, 2)
    assert pairs == [(0, 0), (1, 1)]
    student, teacher = _wrapped(tmp_path / "s"), _wrapped(tiny["teacher"]).eval()
    student.eval()  # no dropout either way; eval only to match the teacher
    s_cap = LayerCapture(decoder_layers(student, "s"), [s for s, _ in pairs])
    t_cap = LayerCapture(decoder_layers(teacher, "t"), [t for _, t in pairs])
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, 1)
    labels[:, -1] = IGNORE_INDEX
    t_cap.arm()
    with torch.no_grad():
        teacher(input_ids=ids)
    t_states = t_cap.take()
    s_cap.arm()
    student(input_ids=ids)
    s_states = s_cap.take()
    out = hidden_loss_sums(s_states, t_states, labels, loss=kind)
    assert out.abs().max().item() < 1e-12
    out.sum().backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and max(g.abs().max().item() for g in grads) < 1e-12
    # The hooks keep the model's own layer outputs: layer 0's output is hidden_states[1] of its own forward.
    with torch.no_grad():
        own = teacher.lm(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(t_states[0], own[1], rtol=0, atol=0)


def test_train_logs_hidden_per_pair_and_keeps_only_mapped_layers(tiny, dist_env, tmp_path):
    """--hidden_loss on the entry point: `hidden` and one metric per pair in the train log lines, the total moves by
    hidden_weight x hidden, the teacher keeps exactly one tensor per pair and never asks for every hidden state."""
    base = train.run(stepped_cfg(tiny, tmp_path, "a", max_steps=1))
    cfg = stepped_cfg(tiny, tmp_path, "b", max_steps=1, hidden_loss="mse", hidden_weight=0.5, hidden_layers="0:1")
    trainer = train.run(cfg)
    h = trainer.history[0]
    assert {"Train/hidden", "Train/hidden_s0_t1"} <= set(h)
    assert h["Train/hidden"] == pytest.approx(h["Train/hidden_s0_t1"]) and h["Train/hidden"] > 0
    assert h["Train/loss"] == pytest.approx(base.history[0]["Train/loss"] + 0.5 * h["Train/hidden"], rel=1e-5)
    assert h["Train/ce"] == pytest.approx(base.history[0]["Train/ce"], rel=1e-6)

    source = trainer.teachers
    seen = []
    decoder = getattr(source.engines[0].module, source.engines[0].module.decoder_name)
    decoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("output_hidden_states")), with_kwargs=True)
    batch = next(trainer.train).to(trainer.device)
    _, kept = source.targets(batch, "train")
    assert len(kept) == len(source.pairs) == 1 and len(source.teacher_capture.handles) == 1
    assert seen == [None] and not source.engines[0].module.config.output_hidden_states
    assert source.teacher_capture.held == 0, "nothing is held after targets beyond what it returns"


def test_evaluation_runs_with_the_hidden_loss(tiny, dist_env, tmp_path):
    """An evaluation (every run's last, with the default --eval_fraction) computes the hidden term on held-out batches
    too: it crashed when the student ran before the source armed its capture (found by a fresh-user trial)."""
    trainer = train.run(
        make_cfg(tiny, tmp_path / "e", eval_fraction=0.25, max_steps=2, hidden_loss="mse", hidden_layers="even")
    )
    ev = [h for h in trainer.history if "Eval/loss" in h]
    assert ev and all(v == v for v in ev[-1].values()), ev  # the end-of-run evaluation ran and logged finite values


def test_refusals_are_one_line(tiny, wide, dist_env, tmp_path, capsys):
    """No provenance for auto, unknown loss, a teacher cache, an ensemble, --alpha 1, another tokenizer, another hidden
    size: one line, exit 2."""
    cases = [
        (dict(hidden_loss="mse"), "has no distill_provenance.json"),
        (dict(hidden_loss="l1"), "--hidden_loss 'l1' is unknown"),
        (dict(hidden_loss="mse", teacher=[tiny["teacher"], tiny["teacher"]]), "ambiguous in an ensemble"),
        (dict(hidden_loss="mse", alpha=1.0), "--alpha 1 skips"),
        (dict(hidden_loss="mse", cross_tokenizer="alm"), "another tokenizer (--cross_tokenizer) has other tokens"),
    ]
    for i, (more, message) in enumerate(cases):
        teacher = more.pop("teacher", tiny["teacher"])
        args = tiny_args(tiny, tmp_path / f"o{i}", max_steps=1, seq_len=32, eval_fraction=0, **more)
        if teacher != tiny["teacher"]:
            args += ["--teacher", teacher[1]]
        code, errors = run_main(args, capsys)
        assert code == 2 and len(errors) == 1 and message in errors[0], (more, errors)
    with pytest.raises(UsageError, match="a teacher cache does not store"):
        make_cfg(tiny, tmp_path / "c", teacher=[], teacher_cache=[str(tmp_path)], hidden_loss="mse").validate()
    with pytest.raises(UsageError, match="a served teacher does not send"):
        make_cfg(tiny, tmp_path / "u", teacher=[], teacher_url=["http://127.0.0.1:1"], hidden_loss="mse").validate()
    # A student of another width gets learned projections, but not with LoRA (its export merges the adapters).
    code, errors = run_main(
        tiny_args(
            wide,
            tmp_path / "w",
            max_steps=1,
            seq_len=32,
            eval_fraction=0,
            hidden_loss="cosine",
            hidden_layers="even",
            lora_r=2,
        ),
        capsys,
    )
    assert code == 2 and len(errors) == 1 and "hidden size 48 differs from the teacher's 32" in errors[0], errors
    assert "--lora_r" in errors[0], errors


def test_hidden_off_keeps_the_objective(tiny, dist_env, tmp_path):
    """--hidden_weight 0 adds nothing: the same curve as without --hidden_loss (the golden curve covers off)."""
    a = train.run(stepped_cfg(tiny, tmp_path, "a"))
    b = train.run(stepped_cfg(tiny, tmp_path, "b", hidden_loss="nmse", hidden_weight=0.0, hidden_layers="even"))
    assert losses_of(a) == pytest.approx(losses_of(b), rel=1e-6, abs=1e-7)
    assert all(v > 0 for v in losses_of(b, "Train/hidden"))


HIDDEN_GOLDEN = Path(__file__).resolve().parent / "golden" / "hidden_curve.json"


def test_equal_hidden_sizes_build_no_projection_and_keep_the_golden_curve(tiny, dist_env, tmp_path):
    """Student and teacher of one width: no projection is built (the student engine holds only the model's
    parameters) and a fixed --hidden_loss run gives the curve recorded before projections existed (tests/golden/)."""
    cfg = stepped_cfg(tiny, tmp_path, "g", max_steps=4, hidden_loss="cosine", hidden_weight=2.0, hidden_layers="0:1")
    trainer = train.run(cfg)
    names = [n for n, _ in trainer.student.module.named_parameters()]
    assert not any("projection" in n for n in names), names
    curve = {key: losses_of(trainer, f"Train/{key}") for key in ("loss", "hidden", "grad_norm")}
    if os.environ.get("DS_DISTILL_UPDATE_GOLDEN") == "1":
        HIDDEN_GOLDEN.write_text(json.dumps(curve, indent=1) + "\n")
    golden = json.loads(HIDDEN_GOLDEN.read_text())
    for key, values in golden.items():
        assert curve[key] == pytest.approx(values, rel=1e-4, abs=1e-6), key


# ------------------------------------------------------------------ learned projections (student of another width)
@pytest.fixture(scope="module")
def wide(tiny, tmp_path_factory):
    """A 1-layer student of hidden size 48 beside the tiny teacher's 32 (same tokenizer)."""
    from tests import tiny as tiny_mod

    path = tiny_mod.make_model(tmp_path_factory.mktemp("wide"), tiny["tokenizer"], layers=1, hidden=48, heads=4, seed=3)
    return {**tiny, "student": str(path)}


def projection_weights(engine) -> dict[str, torch.Tensor]:
    """The engine's projections, gathered, fp32 copies by pair key."""
    import deepspeed

    module = getattr(engine.module, NAME)
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {k: v.detach().clone().float() for k, v in params.items()}


def layer_outputs(model, index: int, **inputs) -> torch.Tensor:
    """Decoder layer ``index``'s output in a plain forward (a hook written here, not models.capture)."""
    kept = []
    layer = model.model.layers[index]
    handle = layer.register_forward_hook(lambda m, a, out: kept.append(out[0] if isinstance(out, tuple) else out))
    try:
        model(**inputs)
    finally:
        handle.remove()
    return kept[0]


def test_projection_trains_in_the_engine_with_the_float64_gradient(wide, dist_env, tmp_path):
    """A 48-wide student, a 32-wide teacher, --hidden_loss mse: the engine holds one [32, 48] projection (ZeRO-3,
    partitioned), starts from its seeded init, and one plain-SGD step (lr 1, no clipping) moves it by exactly
    -hidden_weight x dL/dW / N, with dL/dW = (2 / 32) sum_tokens (W x - y) x^T computed here in float64 from plain
    Hugging Face forwards of the same global batch (N: its supervised tokens)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from ds_distill import data

    sgd = dict(optimizer={"type": "SGD", "params": {"lr": 1.0}}, zero_allow_untested_optimizer=True)
    sgd.update(gradient_clipping=0.0, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)
    cfg = make_cfg(
        wide,
        tmp_path / "p",
        max_steps=1,
        deepspeed_config=projection_json(tmp_path, **sgd),
        hidden_loss="mse",
        hidden_weight=3.0,
        hidden_layers="0:1",
    )
    trainer = train.build(cfg)
    proj = getattr(trainer.student.module, NAME)
    assert [n for n, _ in proj.named_parameters()] == ["s0_t1.weight"]
    assert proj["s0_t1"].weight.ds_numel == 32 * 48 and proj["s0_t1"].weight.numel() == 0, "partitioned by ZeRO-3"
    opt_params = {id(p) for group in trainer.student.optimizer.fp16_groups for p in group}
    assert id(proj["s0_t1"].weight) in opt_params, "in the student's optimizer"
    before = projection_weights(trainer.student)["s0_t1.weight"]
    torch.testing.assert_close(before, HiddenProjection([(0, 1)], 48, 32, seed=0)["s0_t1"].weight, rtol=0, atol=0)
    trainer.fit()
    after = projection_weights(trainer.student)["s0_t1.weight"]

    unset_hf_deepspeed_config()
    student = AutoModelForCausalLM.from_pretrained(wide["student"], dtype=torch.float64).train()
    teacher = AutoModelForCausalLM.from_pretrained(wide["teacher"], dtype=torch.float64).eval()
    stream = data.BatchStream(
        trainer.train.dataset, batch_size=4, rank=0, world_size=1, seed=0, pad_token_id=wide["tokenizer"].pad_token_id
    )
    batch = next(stream)
    with torch.no_grad():
        x, y = layer_outputs(student, 0, **batch.inputs), layer_outputs(teacher, 1, **batch.inputs)
    keep = batch.labels != IGNORE_INDEX
    x, y, w = x[keep], y[keep], before.double()
    grad = (2 / 32) * (x @ w.t() - y).t() @ x
    torch.testing.assert_close((after - before).double(), -3.0 * grad / keep.sum(), rtol=1e-4, atol=1e-7)
    assert (after - before).abs().max() > 1e-4, "the step must move the projection"
    h = trainer.history[0]
    ref_hidden_mean = ((x @ w.t() - y) ** 2).mean(-1).sum().item() / keep.sum().item()
    assert h["Train/hidden_s0_t1"] == pytest.approx(ref_hidden_mean, rel=1e-4)


def test_shared_projection_step_is_the_gradient_summed_over_pairs(tiny, dist_env, tmp_path):
    """--hidden_projection shared with a 2-layer 48-wide student, pairs 0:0 and 1:1: the engine holds ONE [32, 48]
    projection (partitioned), one plain-SGD step moves it by -hidden_weight x the sum over both pairs of dL/dW / N
    (float64, plain forwards), and the export writes it beside final/ as shared.weight."""
    from safetensors import safe_open
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from ds_distill import data
    from tests import tiny as tiny_mod

    path = tiny_mod.make_model(tmp_path / "wide2", tiny["tokenizer"], layers=2, hidden=48, heads=4, seed=4)
    sgd = dict(optimizer={"type": "SGD", "params": {"lr": 1.0}}, zero_allow_untested_optimizer=True)
    sgd.update(gradient_clipping=0.0, train_micro_batch_size_per_gpu=4)
    kw = dict(hidden_loss="mse", hidden_weight=2.0, hidden_layers="0:0,1:1", hidden_projection="shared")
    cfg = make_cfg(
        tiny,
        tmp_path / "p",
        student=path,
        max_steps=1,
        export=True,
        deepspeed_config=projection_json(tmp_path, **sgd),
        **kw,
    )
    trainer = train.build(cfg)
    proj = getattr(trainer.student.module, NAME)
    assert [n for n, _ in proj.named_parameters()] == ["shared.weight"] and proj["shared"].weight.numel() == 0
    before = projection_weights(trainer.student)["shared.weight"]
    trainer.fit()
    after = projection_weights(trainer.student)["shared.weight"]
    checkpoint.export_final(cfg.output_dir, trainer.last_tag)  # as train.run exports

    unset_hf_deepspeed_config()
    student = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).train()
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"], dtype=torch.float64).eval()
    pad = tiny["tokenizer"].pad_token_id
    batch = next(data.BatchStream(trainer.train.dataset, batch_size=4, rank=0, world_size=1, seed=0, pad_token_id=pad))
    keep, w, grad = batch.labels != IGNORE_INDEX, before.double(), 0
    for layer in (0, 1):
        with torch.no_grad():
            x = layer_outputs(student, layer, **batch.inputs)[keep]
            y = layer_outputs(teacher, layer, **batch.inputs)[keep]
        grad = grad + (2 / 32) * (x @ w.t() - y).t() @ x
    torch.testing.assert_close((after - before).double(), -2.0 * grad / keep.sum(), rtol=1e-4, atol=1e-7)
    with safe_open(str(tmp_path / "p" / "final.hidden_projection.safetensors"), "pt") as fh:
        assert list(fh.keys()) == ["shared.weight"] and fh.metadata()["pairs"] == "shared"
    with pytest.raises(UsageError, match="no projection is learned"):
        train.build(make_cfg(tiny, tmp_path / "eq", **kw))  # equal widths: nothing to share


@pytest.mark.parametrize("kind", sorted(HIDDEN_LOSSES))
def test_projected_value_and_gradients_match_float64(kind):
    """Through a projection W ([32, 48]): the sums are those of the plain reference on ``x W^T``, and the gradients of
    W and of the student states are autograd's of that reference; for mse W's gradient is also the closed form
    (2 / H) sum_tokens (W x - y) x^T (TinyBERT's hidden loss)."""
    xs = [x.requires_grad_() for x in states(0, h=48)]
    ys, labels = states(1, h=32), labels_of()
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(32, 48, generator=g, dtype=torch.float64, requires_grad=True) for _ in xs]
    projections = [lambda v, w=w: v @ w.t() for w in ws]
    got = hidden_loss_sums(xs, ys, labels, loss=kind, chunk_size=4, projections=projections)
    keep = labels != IGNORE_INDEX
    ref = torch.stack([ref_hidden(kind, x[keep] @ w.t(), y[keep]).sum() for x, y, w in zip(xs, ys, ws)])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(got.sum(), [*ws, *xs])
    g_ref = torch.autograd.grad(ref.sum(), [*ws, *xs])
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if kind == "mse":
        for w, x, y, g_w in zip(ws, xs, ys, g_got):
            x, y = x.detach()[keep], y[keep]
            torch.testing.assert_close(g_w, (2 / 32) * (x @ w.detach().t() - y).t() @ x, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="must both be"):
        hidden_loss_sums(xs, ys, labels, loss=kind)  # another width without projections


def test_projection_resumes_exactly_and_stays_out_of_the_export(wide, dist_env, tmp_path):
    """Stopped at step 2 and resumed, a projected run continues the straight run's curve (loss and hidden terms: the
    projections and their AdamW moments come back from the checkpoint). Its final/ loads with AutoModelForCausalLM
    with no missing or unexpected keys and holds no projection; final.hidden_projection.safetensors beside it holds
    the engine's last projection and names its pair."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    kw = dict(
        deepspeed_config=projection_json(tmp_path),
        hidden_loss="nmse",
        hidden_weight=2.0,
        hidden_layers="0:1",
        export=True,
    )
    straight = train.run(make_cfg(wide, tmp_path / "s", max_steps=4, **kw))
    first = train.run(make_cfg(wide, tmp_path / "r", max_steps=2, save_steps=2, **kw))
    second = train.run(make_cfg(wide, tmp_path / "r", max_steps=4, resume=True, **kw))
    assert second.history[0]["step"] == 3
    for key in ("Train/loss", "Train/hidden_s0_t1"):
        assert losses_of(first, key) + losses_of(second, key) == pytest.approx(
            losses_of(straight, key), rel=1e-5, abs=1e-6
        ), key

    final = tmp_path / "r" / "final"
    model, info = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert not any("projection" in n for n in model.state_dict()), "no projection in the exported model"
    for f in final.glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            assert not any("projection" in k for k in fh.keys()), f
    assert not list(final.rglob("*projection*"))
    beside = tmp_path / "r" / "final.hidden_projection.safetensors"
    saved = load_file(beside)
    assert list(saved) == ["s0_t1.weight"] and saved["s0_t1.weight"].shape == (32, 48)
    torch.testing.assert_close(saved["s0_t1.weight"], projection_weights(second.student)["s0_t1.weight"])
    straight_saved = load_file(tmp_path / "s" / "final.hidden_projection.safetensors")["s0_t1.weight"]
    torch.testing.assert_close(saved["s0_t1.weight"], straight_saved, rtol=1e-5, atol=1e-6)
    with safe_open(beside, "pt") as fh:
        assert json.loads(fh.metadata()["pairs"]) == [[0, 1]]


# ------------------------------------------------------------------ --hidden_mode layerwise (block-local)
def test_layer_feed_makes_each_layer_block_local(tiny, tmp_path):
    """A 2-layer student copied from the 2-layer teacher, its layer 0 perturbed (float64). Fed the teacher's inputs
    (LayerFeed), student layer 1 gives exactly the teacher's last output (pair-1 loss 0, no gradient anywhere) and so
    the teacher's logits; pair 0's gradient stays in layer 0 (nothing flows between layers, none into the
    embeddings). Unfed (--hidden_mode output), the perturbation reaches layer 1."""
    from ds_distill.models.capture import LayerFeed

    make_student(tiny["teacher"], tmp_path / "s", layers=[0, 1])
    student, teacher = _wrapped(tmp_path / "s").eval(), _wrapped(tiny["teacher"]).eval()
    with torch.no_grad():
        for p in decoder_layers(student, "s")[0].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    t_layers, s_layers = decoder_layers(teacher, "t"), decoder_layers(student, "s")
    t_in, t_last = LayerCapture(t_layers, [0, 1], inputs=True), LayerCapture(t_layers, [1])
    feed, s_out = LayerFeed(s_layers, [0, 1]), LayerCapture(s_layers, [0, 1])
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = torch.zeros_like(ids)
    t_in.arm(), t_last.arm()
    with torch.no_grad():
        t_final = teacher(input_ids=ids)
    inputs, last = t_in.take(), t_last.take()
    with torch.no_grad():
        own = teacher.lm(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(inputs[1], own[1], rtol=0, atol=0)  # the input to layer 1 is layer 0's output
    targets = [inputs[1], last[0]]

    feed.arm(inputs), s_out.arm()
    s_final = student(input_ids=ids)
    assert not feed.armed, "each layer is fed once"
    out = hidden_loss_sums(s_out.take(), targets, labels, loss="mse")
    assert out[0].item() > 1e-6 and out[1].abs().item() < 1e-20
    torch.testing.assert_close(student.head(s_final), teacher.head(t_final), rtol=0, atol=1e-12)
    grads = torch.autograd.grad(out[1], list(student.parameters()), allow_unused=True, retain_graph=True)
    assert all(g is None or g.abs().max() < 1e-20 for g in grads)
    named = dict(student.named_parameters())
    grads = dict(zip(named, torch.autograd.grad(out[0], list(named.values()), allow_unused=True)))
    moved = {n for n, g in grads.items() if g is not None and g.abs().max() > 0}
    assert moved and all(".layers.0." in n for n in moved), sorted(moved)

    s_out.arm()  # unfed: the student's own forward
    student(input_ids=ids)
    assert hidden_loss_sums(s_out.take(), targets, labels, loss="mse")[1].item() > 1e-6


def test_layerwise_on_the_entry_point_feeds_the_training_forward(tiny, dist_env, tmp_path):
    """A 1-layer student copied from teacher layer 1 (auto map: 0:1), ZeRO-3 engines: with --hidden_mode layerwise its
    layer is fed the teacher's input to layer 1, so step 1 has hidden loss 0 and the teacher's logits (KD 0), while the
    student's own forward (--hidden_mode output) is far from both; the teacher keeps 2 tensors (1 input, the last
    output) and nothing stays armed after a step. The student's provenance travels with its checkpoint and export."""
    make_student(tiny["teacher"], tmp_path / "s1", layers=[1])
    kw = dict(max_steps=2, deepspeed_config=projection_json(tmp_path), hidden_loss="mse", student=str(tmp_path / "s1"))
    layerwise = train.run(make_cfg(tiny, tmp_path / "lw", hidden_mode="layerwise", **kw))
    output = train.run(make_cfg(tiny, tmp_path / "out", export=True, **kw))
    lw, out = layerwise.history[0], output.history[0]
    assert lw["Train/hidden"] < 1e-10 and lw["Train/kd"] < 1e-6, lw
    assert out["Train/hidden"] > 1e-5 and out["Train/kd"] > 1e-4, out
    assert layerwise.history[1]["Train/hidden"] > lw["Train/hidden"], "then the layer trains (and moves)"
    source = layerwise.teachers
    batch = next(layerwise.train).to(layerwise.device)
    _, kept = source.targets(batch, "eval")
    assert len(kept) == 1 and source.teacher_capture.held == 0 and source.teacher_last.held == 0
    assert not source.feed.armed, "eval steps run the student's own forward"
    # A later run (--rounds starts from the export) maps the layers with --hidden_layers auto from the copy.
    prov = read_provenance(tmp_path / "s1")
    assert prov["teacher_layers"] == [1]
    for folder in (
        checkpoint.ckpt_root(tmp_path / "out") / output.last_tag / "hf",
        checkpoint.final_dir(tmp_path / "out"),
    ):
        assert read_provenance(folder) == prov, folder


def test_layerwise_refusals_are_one_line(tiny, wide, dist_env, tmp_path, capsys):
    """Layerwise with gradient checkpointing, with a student of another width, with pairs that skip a student layer
    or do not increase, and --hidden_mode without --hidden_loss: one line, exit 2."""
    make_student(tiny["teacher"], tmp_path / "s2", layers=[0, 1])
    two = {**tiny, "student": str(tmp_path / "s2")}
    common = dict(max_steps=1, seq_len=32, eval_fraction=0)
    cases = [
        (
            tiny,
            dict(hidden_loss="mse", hidden_mode="layerwise", gradient_checkpointing=True),
            "drop --gradient_checkpointing",
        ),
        (wide, dict(hidden_loss="mse", hidden_mode="layerwise", hidden_layers="0:1"), "hidden size 48 differs"),
        (two, dict(hidden_loss="mse", hidden_mode="layerwise", hidden_layers="1:1"), "must be paired, in order"),
        (two, dict(hidden_loss="mse", hidden_mode="layerwise", hidden_layers="0:1,1:0"), "must be paired, in order"),
        (tiny, dict(hidden_mode="layerwise"), "needs --hidden_loss"),
        (tiny, dict(hidden_projection="shared"), "--hidden_projection shared needs --hidden_loss"),
        (tiny, dict(attention_relation_heads=2), "--attention_relation_heads 2 needs --attention_relation_weight"),
        (tiny, dict(attention_relation_layer=0), "--attention_relation_layer 0 needs --attention_relation_weight"),
    ]
    for i, (models, more, message) in enumerate(cases):
        code, errors = run_main(tiny_args(models, tmp_path / f"o{i}", **common, **more), capsys)
        assert code == 2 and len(errors) == 1 and message in errors[0], (more, errors)
