"""The causal language-model loss, as transformers computes it for training.

transformers' `ForCausalLMLoss`: logits in float32, labels shifted left by one (column j's logits
predict label j + 1, the last column predicts nothing), labels equal to `IGNORE_INDEX` left out,
and the mean of the cross-entropy over the tokens counted, or its sum over `num_items` given (the
count of a whole accumulated batch, as the reference's `num_items_in_batch`).
GLM-4.5V's load-balancing loss joins it in transformers only when the config asks for router
logits (`output_router_logits`, off by default); it has no counterpart here, and the model refuses
labels under a config that asks for it.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    """What the model returns when given labels: the loss (a float32 scalar) and the logits."""

    loss: mx.array
    logits: mx.array


def shift_labels(labels) -> mx.array:
    """Labels [B, L] -> the targets of each column [B, L]: the next column's label, the last
    column's `IGNORE_INDEX`."""
    labels = mx.array(labels)
    tail = mx.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)
    return mx.concatenate([labels[:, 1:], tail], axis=1)


def causal_lm_loss(logits: mx.array, labels, num_items: Optional[int] = None) -> mx.array:
    """Mean cross-entropy of the labelled next tokens (float32), or their sum over `num_items`."""
    targets = shift_labels(labels)
    counted = targets != IGNORE_INDEX
    losses = nn.losses.cross_entropy(logits.astype(mx.float32), mx.where(counted, targets, 0))
    total = mx.where(counted, losses, 0.0).sum()
    count = counted.sum() if num_items is None else num_items
    return total / count
