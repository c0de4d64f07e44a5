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
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    """What the model returns when given labels: the loss (a float32 scalar) and the logits
    [B, L, vocab]. The loss takes the head at the labelled columns alone; the logits of every
    column are a lazy array, computed only if the caller evaluates them (a training step that
    differentiates the loss alone never makes them)."""

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


def labelled_lm_loss(
    hidden: mx.array, head: Callable, labels, num_items: Optional[int] = None
) -> mx.array:
    """`causal_lm_loss(head(hidden), labels, num_items)` with the head applied to the columns
    that predict a label only: the [B, L, vocab] float32 logits, their softmax and their gradient
    never exist whole (with a real vocabulary the largest arrays of a training step, where the
    labelled columns are often a small part). Which columns those are is read from the labels
    on the host; the per-token losses are the same, the sum is over the same terms."""
    targets = np.asarray(shift_labels(labels)).reshape(-1)
    (rows,) = np.nonzero(targets != IGNORE_INDEX)
    count = len(rows) if num_items is None else num_items
    if not len(rows):  # nothing labelled: 0 / 0, as the whole-logits loss gives
        return mx.sum(hidden[:, :0, :1].astype(mx.float32)) / count
    picked = hidden.reshape(-1, hidden.shape[-1])[mx.array(rows)]
    logits = head(picked).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, mx.array(targets[rows]))
    return losses.sum() / count
