"""Forward hooks on chosen decoder layers: keeping their outputs or inputs (hidden-state losses read only the mapped
layers, never ``output_hidden_states``, which keeps every layer's state of the whole model), and feeding them given
inputs (the block-local ``--hidden_mode layerwise``)."""

from __future__ import annotations

import torch
from torch import nn

from ds_distill.common import UsageError


def decoder_layers(module: nn.Module, where: str) -> nn.ModuleList:
    """The decoder layers of a ``HiddenStatesLM`` (its decoder's ``layers``), or one UsageError naming ``where``."""
    decoder = getattr(module, getattr(module, "decoder_name", "model"), None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UsageError(
            f"{where}: its decoder has no `layers` list: hidden-state losses need a Llama-like decoder; drop "
            "--hidden_loss"
        )
    return layers


def _hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A decoder layer's hidden-states input: its first positional argument, or the keyword ``hidden_states``."""
    return args[0] if args else kwargs["hidden_states"]


def attention_projections(layer: nn.Module, where: str) -> list[nn.Module]:
    """The query, key and value projections of a decoder layer (``self_attn.q_proj``, ``k_proj``, ``v_proj``, as
    Llama-like families name them), or one UsageError naming ``where``."""
    attn = getattr(layer, "self_attn", None)
    found = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    if not all(isinstance(m, nn.Module) for m in found):
        raise UsageError(
            f"{where}: its attention has no separate q_proj, k_proj and v_proj (a fused projection?): attention "
            "relations need them; drop --attention_relation_weight"
        )
    return found


class LayerCapture:
    """Keeps the output ``[B, T, H]`` (``inputs=True``: the hidden-states input) of each chosen decoder layer on its
    next forward while armed. ``layers`` may be any indexable modules (the attention relations capture a layer's
    query, key and value projections, ``attention_projections``).

    ``arm()`` before the forward whose states are wanted, ``take()`` after it: the states in the order of ``indices``,
    then nothing is held and the capture is disarmed (so on-policy generation and activation-checkpoint recomputation,
    which run the same layers at other times, keep nothing). ``held`` counts the tensors kept now.
    """

    def __init__(self, layers: nn.ModuleList | list[nn.Module], indices: list[int], inputs: bool = False):
        self.indices = list(indices)
        self.states: dict[int, torch.Tensor] = {}
        self.armed = False
        if inputs:
            hooks = [layers[i].register_forward_pre_hook(self._pre_hook(i), with_kwargs=True) for i in self.indices]
        else:
            hooks = [layers[i].register_forward_hook(self._hook(i)) for i in self.indices]
        self.handles = hooks

    def _pre_hook(self, index: int):
        def hook(module: nn.Module, args, kwargs) -> None:
            if self.armed:
                self.states[index] = _hidden_input(args, kwargs)

        return hook

    def _hook(self, index: int):
        def hook(module: nn.Module, args, output) -> None:
            if self.armed:
                # A decoder layer returns its hidden states, or a tuple whose first item they are (older transformers).
                self.states[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def arm(self) -> None:
        self.states.clear()
        self.armed = True

    @property
    def held(self) -> int:
        return len(self.states)

    def take(self) -> list[torch.Tensor]:
        missing = [i for i in self.indices if i not in self.states]
        if missing:
            raise RuntimeError(f"decoder layers {missing} did not run since arm(): nothing captured")
        out = [self.states[i] for i in self.indices]
        self.states.clear()
        self.armed = False
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.armed = [], False
        self.states.clear()


class LayerFeed:
    """Replaces the hidden-states input of each chosen decoder layer, once, on the next forward after ``arm(states)``
    (``states[i]`` ``[B, T, H]`` for ``indices[i]``), then leaves that layer alone again.

    The fed state is detached (nothing flows back into whoever made it) and, with gradients on, made a leaf that
    requires grad, so that the layer's input looks like any other to ZeRO-3 (its hooks release a layer's gathered
    weights once its backward reached its inputs); the hook runs before DeepSpeed's (``prepend``). A layer recomputed
    in the backward (gradient checkpointing) would run unfed: the run refuses that pair of flags.
    """

    def __init__(self, layers: nn.ModuleList, indices: list[int]):
        self.indices = list(indices)
        self.pending: dict[int, torch.Tensor] = {}
        self.handles = [
            layers[i].register_forward_pre_hook(self._hook(i), with_kwargs=True, prepend=True) for i in self.indices
        ]

    def _hook(self, index: int):
        def hook(module: nn.Module, args, kwargs):
            state = self.pending.pop(index, None)
            if state is None:
                return None
            old = _hidden_input(args, kwargs)
            fed = state.detach().to(old.dtype)
            if torch.is_grad_enabled():
                fed.requires_grad_()
            if args:
                return (fed, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fed}

        return hook

    def arm(self, states: list[torch.Tensor]) -> None:
        if len(states) != len(self.indices):
            raise ValueError(f"{len(states)} states for {len(self.indices)} layers")
        self.pending = dict(zip(self.indices, states))

    @property
    def armed(self) -> bool:
        return bool(self.pending)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.pending = [], {}
