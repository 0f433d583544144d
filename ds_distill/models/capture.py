"""Forward hooks that keep the outputs of chosen decoder layers: hidden-state losses read only the mapped layers,
never ``output_hidden_states`` (which keeps every layer's state of the whole model)."""

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
            f"{where}: its decoder has no `layers` list: hidden-state losses need a Llama-like decoder; drop --hidden_loss"
        )
    return layers


class LayerCapture:
    """Keeps the output ``[B, T, H]`` of each chosen decoder layer on its next forward while armed.

    ``arm()`` before the forward whose states are wanted, ``take()`` after it: the states in the order of ``indices``,
    then nothing is held and the capture is disarmed (so on-policy generation and activation-checkpoint recomputation,
    which run the same layers at other times, keep nothing). ``held`` counts the tensors kept now.
    """

    def __init__(self, layers: nn.ModuleList, indices: list[int]):
        self.indices = list(indices)
        self.states: dict[int, torch.Tensor] = {}
        self.armed = False
        self.handles = [layers[i].register_forward_hook(self._hook(i)) for i in self.indices]

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
