"""The layer as a torch.library custom op, so that ``torch.compile(..., fullgraph=True)`` traces a
model that uses DS4MoE: the compiler sees one opaque op with a fake (shape-only) implementation;
the layer's weights stay out of the graph, held in a registry under an integer handle.

Letters: T tokens, H hidden size.
"""

from __future__ import annotations

import itertools

import torch

_LAYERS: dict = {}  # handle -> MoEWeights
_HANDLES = itertools.count()


def register(weights) -> int:
    """A new handle for ``weights`` (a MoEWeights)."""
    handle = next(_HANDLES)
    _LAYERS[handle] = weights
    return handle


def update(handle: int, weights) -> None:
    _LAYERS[handle] = weights


def unregister(handle: int) -> None:
    _LAYERS.pop(handle, None)


@torch.library.custom_op("moetile::ds4_moe", mutates_args=())
def ds4_moe(x: torch.Tensor, token_ids: torch.Tensor | None, layer: int, tile: str, path: str, gate_up: str,
            deterministic: bool, validate: bool, decode_act: str) -> torch.Tensor:
    """f32 [T, H]: moe.moe_forward of the registered layer ``layer``; ``tile`` "auto", "ds4" or a
    width written as a string."""
    from .moe import moe_forward

    width = int(tile) if tile.isdigit() else tile
    return moe_forward(x, _LAYERS[layer], token_ids, tile=width, path=path, gate_up=gate_up,
                       deterministic=deterministic, validate=validate, decode_act=decode_act)


@ds4_moe.register_fake
def _(x, token_ids, layer, tile, path, gate_up, deterministic, validate, decode_act):
    return x.new_empty((x.shape[0], x.shape[1]), dtype=torch.float32)
