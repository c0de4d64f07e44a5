"""Gradient checkpointing for training: what the backward pass keeps.

mlx-lm's way (a class's call wrapped in `mx.checkpoint`) at two depths: each decoder layer and
vision block keeps only its input for the backward pass and runs again in it; inside that rerun
the attention is checkpointed again, so the MLP's backward never meets the attention's kept
arrays. Undone on leaving, so inference is untouched.
"""

import contextlib

import mlx.core as mx
import mlx.nn as nn


def _checkpointed(call):
    """`call(module, *args)` keeping only the module's trainable parameters and the arguments
    for the backward pass, and running again in it."""

    def checkpointed(module, *args):
        def inner(params, *args):
            module.update(params)
            return call(module, *args)

        return mx.checkpoint(inner)(module.trainable_parameters(), *args)

    return checkpointed


@contextlib.contextmanager
def grad_checkpointing(model: nn.Module, enabled: bool = True):
    """While training, decoder layers and vision blocks checkpointed, and within the decoder
    layers their attention; the same gradients, less memory. Undone on leaving."""
    if not enabled:
        yield
        return
    layer = model.layers[0]
    kinds = {type(layer), type(model.visual.blocks[0]), type(layer.self_attn)}
    saved = {kind: kind.__call__ for kind in kinds}
    for kind in kinds:
        kind.__call__ = _checkpointed(saved[kind])
    try:
        yield
    finally:
        for kind, call in saved.items():
            kind.__call__ = call
