"""The vision tower's attention on large frames: queries in blocks, the same features, bounded
scores."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_glm4v.models.vision
from mlx_glm4v.checkpoints.loader import load_model


@pytest.fixture(scope="module")
def tower(glm4v_checkpoint):
    return load_model(glm4v_checkpoint[0]).visual


def encode(tower, h, w, budget, monkeypatch):
    """Features of one (h, w)-patch frame of random pixels and the tower's peak memory above the
    weights."""
    monkeypatch.setattr(mlx_glm4v.models.vision, "ATTENTION_SCORE_BYTES", budget)
    rows = np.random.default_rng(0).standard_normal((h * w, 1176), dtype=np.float32)
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = tower(rows, np.array([[1, h, w]]))
    mx.eval(out)
    return np.array(out), mx.get_peak_memory() - base


def test_blocked_attention_is_exact_and_bounded(tower, monkeypatch):
    h = w = 48
    heads = tower.config.num_heads
    scores = heads * (h * w) ** 2 * 4  # one frame's [heads, L, L] float32 scores
    whole, whole_peak = encode(tower, h, w, scores, monkeypatch)  # one call
    blocked, blocked_peak = encode(tower, h, w, 1 << 20, monkeypatch)  # 64-row query blocks
    np.testing.assert_array_equal(blocked, whole)
    assert whole_peak > scores
    assert blocked_peak < whole_peak - scores / 2, (blocked_peak, whole_peak, scores)


def test_frames_of_equal_size_share_blocks(tower, monkeypatch):
    """Several same-size frames go through one batched call; blocking splits their queries alike."""
    monkeypatch.setattr(mlx_glm4v.models.vision, "ATTENTION_SCORE_BYTES", 1 << 40)
    rows = np.random.default_rng(1).standard_normal((3 * 8 * 12, 1176), dtype=np.float32)
    grids = np.array([[1, 8, 12]] * 3)
    whole = np.array(tower(rows, grids))
    monkeypatch.setattr(mlx_glm4v.models.vision, "ATTENTION_SCORE_BYTES", 1)
    np.testing.assert_array_equal(np.array(tower(rows, grids)), whole)
