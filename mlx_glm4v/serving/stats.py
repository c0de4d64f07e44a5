"""What the engine counts and measures: counters and latency histograms for `/metrics`, and the
running cost of prefill pieces that its time budget per turn is planned with."""

from collections import deque
from dataclasses import dataclass, field


@dataclass
class EngineStats:
    """Counters for a metrics endpoint; `decode_rows / decode_steps` is the mean batch size."""

    requests: int = 0  # admitted
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0
    cancelled: int = 0
    rejected: int = 0  # refused with QueueFull
    errors: int = 0
    decode_steps: int = 0
    decode_rows: int = 0
    # speculative drafts in rows: proposed, kept, verification rounds and the tokens they gave
    drafted: int = 0
    draft_accepted: int = 0
    verify_steps: int = 0
    verify_tokens: int = 0
    prefill_chunks: int = 0
    vision_pieces: int = 0
    vision_items: int = 0  # images and videos the engine put through the vision tower
    vision_seconds: float = 0.0
    # prefill pieces run, by kind: text, vision, attention
    pieces: dict = field(default_factory=dict)
    # seconds, the latest
    time_to_first_token: deque = field(default_factory=lambda: deque(maxlen=1024))
    # seconds from arrival
    ttft: "Histogram" = field(default_factory=lambda: Histogram(LATENCY_BOUNDS))
    # seconds between tokens
    inter_token: "Histogram" = field(default_factory=lambda: Histogram(LATENCY_BOUNDS))
    # vision seconds a turn
    vision_turn: "Histogram" = field(default_factory=lambda: Histogram(LATENCY_BOUNDS))
    # (prefill pieces, prefill seconds) a turn
    turns: deque = field(default_factory=lambda: deque(maxlen=4096))


LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """Counts of observations at or below each bound (Prometheus' cumulative buckets come from
    them)."""

    def __init__(self, bounds):
        self.bounds, self.counts = tuple(bounds), [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float):
        self.counts[
            next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        ] += 1
        self.sum += value
        self.count += 1


class PieceCosts:
    """Seconds a prefill piece will take, from the measured cost of earlier ones: per prompt token
    and decoder layer for text pieces, per patch and tower block for vision pieces, per query-key
    pair and head for pieces of attention heads (running means)."""

    def __init__(self, text: float = 2e-4, vision: float = 2e-5, attention: float = 2e-8):
        self.rate = {"text": text, "vision": vision, "attention": attention}

    def estimate(self, kind: str, size: int) -> float:
        return self.rate[kind] * size

    def measured(self, kind: str, size: int, seconds: float):
        if size > 0:
            self.rate[kind] += 0.3 * (seconds / size - self.rate[kind])
