"""The student's and teachers' forward stops before the output layer (``HiddenStatesLM``); the loss calls the head
(``OutputHead``: the projection plus the model's own ``LogitTransform``) chunk by chunk. ``check_logits`` proves at
start-up that this gives the model's own logits; ``check_output_rows`` that the heads cover the shared vocabulary."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from ds_distill.common import UsageError
from ds_distill.losses import LossSums, OutputHead


class HiddenStatesLM(nn.Module):
    """A causal LM whose forward stops before the lm_head.

    Args:
        lm: a Hugging Face ``*ForCausalLM`` whose children are its decoder (``lm.base_model_prefix``) and its head.
        lora: the ``models.lora.LoraStudent`` when PEFT adapters were injected into ``lm`` (``--lora_r``), else None.
    forward(**model_inputs) -> final hidden states ``[B, T, H]`` (after the final norm).
    head -> ``losses.OutputHead``: the projection plus whatever ``lm.forward`` does to its output (see
    ``LogitTransform``), so ``head(forward(x))`` are the model's own logits.
    """

    def __init__(self, lm: nn.Module, lora: Any = None):
        super().__init__()
        for name, child in lm.named_children():
            self.add_module(name, child)
        self.decoder_name = decoder_name(lm)
        # Not submodules: the children above already hold every parameter once.
        object.__setattr__(self, "lm", lm)
        object.__setattr__(self, "lora", lora)
        self.transform = LogitTransform.of(lm)
        self.router_loss: RouterLoss | None = None  # set by use_router_loss() (MoE students)
        self.router_aux: torch.Tensor | None = None  # the last forward's load-balancing loss, until with_router_loss
        self.grad_into_weight = False  # set by sparse_tied_embedding(): the head adds its gradient into weight.grad

    def use_router_loss(self) -> bool:
        """Compute the router's load-balancing loss in every forward when the model has one (MoE); True if so."""
        self.router_loss = RouterLoss.of(self.lm)
        return self.router_loss is not None

    def with_router_loss(self, out: LossSums) -> LossSums:
        """``out`` plus ``coef * aux * n_tokens`` in ``total`` (the trainer divides by the global token count, so a step
        adds the token-weighted mean of its micro-batches' ``coef * aux``, as the model adds ``coef * aux`` to its mean
        loss), and ``router_aux`` (``aux * n_tokens``) in ``extra`` for the log. Unchanged when off."""
        aux, self.router_aux = self.router_aux, None
        if aux is None:
            return out
        weighted = aux.float() * out.n_tokens
        total = out.total + self.router_loss.coef * weighted
        return dataclasses.replace(out, total=total, extra={**out.extra, "router_aux": weighted.detach()})

    @property
    def head(self) -> OutputHead:
        """The output layer ``[n, H] -> [n, V_model]``; its projection is called (never .weight read) so ZeRO-3 gathers
        it."""
        return OutputHead(self.lm.get_output_embeddings(), self.transform, self.grad_into_weight)

    @property
    def config(self) -> Any:
        return self.lm.config

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        decoder = getattr(self, self.decoder_name)
        if self.router_loss is None:
            return decoder(**inputs, use_cache=False).last_hidden_state
        out = decoder(**inputs, use_cache=False, output_router_logits=True)
        self.router_aux = self.router_loss(out.router_logits, inputs.get("attention_mask"))
        return out.last_hidden_state


def sparse_tied_embedding(module: HiddenStatesLM, zero_stage: int, device: str) -> bool:
    """Make the gradient of a tied input embedding sparse, and have the head add its own into ``weight.grad``
    (``OutputHead.grad_into_weight``); True if done.

    A student whose output layer is its input embedding (``tie_word_embeddings``) gets two ``[V, H]`` gradients for
    that weight in every backward: the head's, from the loss, and the embedding's, a dense ``[V, H]`` of zeros with
    the batch's rows added (``torch.nn.functional.embedding``'s backward), which autograd then sums. With
    ``nn.Embedding.sparse`` the embedding's gradient is only the batch's rows (``[tokens, H]`` values and their ids),
    and as the head's gradient is already in ``weight.grad``, autograd's ``AccumulateGrad`` adds those rows into it in
    place: one ``[V, H]`` buffer instead of two at the end of backward, and no ``[V, H]`` zero-fill and sum
    (docs/performance.md, issue 28: the on-policy step's peak). The gradient is the same sum, in another order (float
    rounding). A backward the head took no part in would leave the sparse rows alone in ``.grad``; a hook makes them
    dense then, so the optimizer and DeepSpeed always see a dense gradient.

    Called before ``deepspeed.initialize``, so the hook runs before any gradient hook of DeepSpeed's (ZeRO-1's
    ``contiguous_gradients``). Only where nothing else owns the weight's gradient or adds sparse rows
    nondeterministically: ZeRO stage 0 or 1 (ZeRO-2 and 3 partition gradients in their own buffers), ``device``
    (the accelerator's name) ``cpu`` (CUDA adds sparse rows with atomics, so run-to-run bits could change), the weight
    trainable (not a LoRA student's frozen embedding), and an ``nn.Embedding`` (another module's forward may not read
    ``.sparse``; then nothing changes but the saving). The fused path's direct write is for ``backward()`` (what
    ``engine.backward`` calls): a ``torch.autograd.grad`` over the weight would not see the head's part.
    """
    lm = module.lm
    emb, out = lm.get_input_embeddings(), lm.get_output_embeddings()
    if not (isinstance(emb, nn.Embedding) and isinstance(out, nn.Linear) and emb.weight is out.weight):
        return False
    weight = emb.weight
    if zero_stage > 1 or device != "cpu" or not weight.requires_grad:
        return False
    emb.sparse = True
    module.grad_into_weight = True

    def dense(param: torch.Tensor) -> None:
        if param.grad is not None and param.grad.is_sparse:
            param.grad = param.grad.to_dense()

    weight.register_post_accumulate_grad_hook(dense)
    return True


class RouterLoss:
    """An MoE model's router load-balancing loss as its own forward computes it: the modeling module's
    ``load_balancing_loss_func(router_logits, num_experts, num_experts_per_tok, attention_mask)`` (Switch Transformer
    eqs. 4-6), weighed by ``config.router_aux_loss_coef``. ``of(lm)`` is None for a model without one."""

    def __init__(self, fn, num_experts: int, top_k: int, coef: float):
        self.fn, self.num_experts, self.top_k, self.coef = fn, num_experts, top_k, coef

    @classmethod
    def of(cls, lm: nn.Module) -> "RouterLoss | None":
        fn = getattr(sys.modules.get(type(lm).__module__), "load_balancing_loss_func", None)
        params = inspect.signature(lm.forward).parameters
        experts, top_k = getattr(lm, "num_experts", None), getattr(lm, "num_experts_per_tok", None)
        coef = getattr(lm.config, "router_aux_loss_coef", None)
        if fn is None or "output_router_logits" not in params or None in (experts, top_k, coef):
            return None
        return cls(fn, experts, top_k, coef)

    def __call__(self, router_logits, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.fn(router_logits, self.num_experts, self.top_k, attention_mask)


def decoder_name(lm: nn.Module) -> str:
    """The name of ``lm``'s decoder child: ``lm.base_model_prefix`` (Llama's ``model``), else the one child besides
    the output projection (Llama 4's ``model`` under the prefix ``language_model``).
    Errors: UsageError naming the family when neither exists."""
    head = lm.get_output_embeddings()
    if isinstance(lm._modules.get(lm.base_model_prefix), nn.Module):
        return lm.base_model_prefix
    others = [n for n, m in lm.named_children() if m is not head]
    if len(others) == 1:
        return others[0]
    raise UsageError(
        f"{_family(lm)}: no decoder child {lm.base_model_prefix!r} (children {[n for n, _ in lm.named_children()]}): "
        "ds-distill needs a *ForCausalLM laid out as decoder + output projection"
    )


def _family(lm: nn.Module) -> str:
    return f"{type(lm).__name__} (model_type {getattr(lm.config, 'model_type', '?')!r})"


class _Output(BaseModelOutputWithPast):
    """A decoder output holding only ``last_hidden_state``; any other field a head reads (router_logits,
    cross_attentions, ...) is None."""

    def __getattr__(self, name: str) -> None:
        if name.startswith("__"):
            raise AttributeError(name)
        return None


class _Returns(nn.Module):
    """Stands in for a decoder: returns the given tensor as its last hidden state, whatever the inputs. A head's
    forward may read attributes off its decoder (Falcon-H1's ``model.lm_head_multiplier``) or call a submodule of it
    (Bart's ``model.decoder``): plain attributes are the real decoder's, submodules are stubs like this one."""

    def __init__(self, z: torch.Tensor, real: nn.Module):
        super().__init__()
        self.z = z
        object.__setattr__(self, "real", real)  # not a submodule: the stub holds no parameters

    def forward(self, *args: Any, **kwargs: Any) -> _Output:
        return _Output(last_hidden_state=self.z)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.__dict__["real"], name)
        return _Returns(self.z, value) if isinstance(value, nn.Module) else value


class _Identity(nn.Module):
    """Stands in for the output projection: returns its input. Attribute reads are the real projection's (Mamba's
    forward casts to ``lm_head.weight.dtype``)."""

    def __init__(self, real: nn.Module):
        super().__init__()
        object.__setattr__(self, "real", real)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["real"], name)


class LogitTransform:
    """What a model's own ``forward`` does after its output projection (Gemma 2 softcapping, Granite's
    ``logits / logits_scaling``, Cohere's ``logit_scale``, ...), taken from the model itself, not from a list of config
    keys: ``lm.forward`` runs with its decoder replaced by a stub that returns ``z`` and its projection replaced by
    the identity, so whatever comes out as ``.logits`` is ``transform(z)``. ``[n, V] -> [n, V]``, differentiable.
    """

    def __init__(self, lm: nn.Module):
        self.lm = lm
        head = lm.get_output_embeddings()
        names = [n for n, m in lm.named_children() if m is head]
        if head is None or not names:
            raise UsageError(
                f"{_family(lm)} is not laid out as decoder + output projection (children "
                f"{[n for n, _ in lm.named_children()]}): "
                "ds-distill needs a *ForCausalLM whose logits come from its get_output_embeddings() module"
            )
        self.head_name, self.decoder_name = names[0], decoder_name(lm)
        params = inspect.signature(lm.forward).parameters
        # MoE heads add a router loss when asked for router logits; the stub has none to give.
        self.kwargs = {"output_router_logits": False} if "output_router_logits" in params else {}

    @classmethod
    def of(cls, lm: nn.Module) -> "LogitTransform | None":
        """The model's transform, or None where it leaves the projection's output unchanged (checked on values
        up to +-100, bit for bit: the chunked loss then calls the projection alone)."""
        transform = cls(lm)
        # As wide as the projection's output: a forward that reshapes or slices the logits gives them back unchanged.
        width = getattr(lm.get_output_embeddings(), "out_features", None) or lm.config.get_text_config().vocab_size
        z = torch.linspace(-100.0, 100.0, 2 * width).reshape(2, width)
        try:
            out = transform(z)
        except (RuntimeError, AttributeError, TypeError, ValueError, IndexError, KeyError) as exc:
            # e.g. Electra's forward runs a dense layer on the hidden states before the projection: not a function of
            # the projection's output, so the chunked loss cannot reproduce it.
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise UsageError(
                f"{_family(lm)}: its forward does more than a transform of the output projection's logits "
                f"({type(exc).__name__}: {first[:120]}): this family's output layer is not supported; please report it"
            ) from None
        if out.shape != z.shape:
            raise UsageError(
                f"{_family(lm)}: its forward turns [n, {width}] projection outputs into {list(out.shape)} logits: "
                "this family's output layer is not supported; please report it"
            )
        return None if torch.equal(out.to(z.dtype), z) else transform

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        lm, prefix = self.lm, self.decoder_name
        decoder, head = lm._modules[prefix], lm._modules[self.head_name]
        lm._modules[prefix], lm._modules[self.head_name] = _Returns(z[None], decoder), _Identity(head)
        try:
            ids = torch.zeros(1, z.shape[0], dtype=torch.long, device=z.device)
            logits = lm(input_ids=ids, use_cache=False, **self.kwargs).logits[0]
        finally:
            lm._modules[prefix], lm._modules[self.head_name] = decoder, head
        return logits


def check_output_rows(vocab_size: int, engines: list, paths: list[str]) -> None:
    """Every model must score at least the tokenizer's tokens (extra padding rows are fine and ignored)."""
    for engine, path in zip(engines, paths):
        head = engine.module.head.linear
        rows = getattr(head, "out_features", None) or engine.module.config.vocab_size
        if rows < vocab_size:
            raise UsageError(
                f"model {path!r} has {rows} output rows but the tokenizer has {vocab_size} tokens: resize its "
                "embeddings (model.resize_token_embeddings)"
            )


# Largest |head logits - own logits| accepted, relative to max(1, max |own logits|): the two paths run the same ops
# on differently shaped matmuls, so they differ by rounding only (~1e-6 in fp32, a few bf16 ulps).
_PROBE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@torch.no_grad()
def check_logits(engine, path: str, vocab_size: int, *, packing: bool, doc_len: int = 8) -> None:
    """Start-up probe: the logits the loss uses equal the model's own forward, on two rows of random tokens.

    1. ``head(engine(ids))`` against ``lm(ids).logits`` (the model's own forward, projection and post-processing).
    2. With packing: each row as two packed documents (``position_ids`` restarting at 0, no attention mask) against
       each document alone, through the model's own forward.
    Every rank must call this (under ZeRO-3 each module call is a collective gather); all use the same tokens.
    Raises UsageError naming the model and the largest difference.
    """
    module = engine.module
    was_training = module.training
    engine.eval()
    try:
        # Two rows of two documents: flash attention, for one, finds packed documents only in a single row.
        ids = torch.randint(0, vocab_size, (2, 2 * doc_len), generator=torch.Generator().manual_seed(0)).to(
            engine.device
        )
        dtype = next(module.parameters()).dtype
        own = module.lm(input_ids=ids, use_cache=False).logits.float()
        ours = module.head(engine(input_ids=ids)).float()
        _compare(
            ours,
            own,
            dtype,
            f"model {path!r}: the chunked loss's head does not give the model's own logits",
            "this model's output layer is not supported; please report it",
        )
        if packing:
            position_ids = torch.arange(doc_len, device=ids.device).repeat(2, 2)
            packed = module.head(engine(input_ids=ids, position_ids=position_ids)).float()
            alone = module.lm(input_ids=ids.reshape(4, doc_len), use_cache=False).logits.float()
            attn = getattr(module.config, "_attn_implementation", "?")
            _compare(
                packed.reshape(alone.shape),
                alone,
                dtype,
                f"model {path!r} with attn_implementation={attn}: a packed document's logits differ from the document "
                "alone",
                "drop --packing or pick another --attn_implementation",
            )
    finally:
        engine.train(was_training)


def _compare(ours: torch.Tensor, own: torch.Tensor, dtype: torch.dtype, what: str, fix: str) -> None:
    v = min(ours.shape[-1], own.shape[-1])
    diff = (ours[:, :v] - own[:, :v]).abs().max().item()
    tol = _PROBE_RTOL.get(dtype, 1e-2) * max(1.0, own.abs().max().item())
    if not diff <= tol:  # also catches NaN
        raise UsageError(f"{what} (max abs difference {diff:.3g}, tolerance {tol:.3g}): {fix}")
