"""Counters for `/metrics` in Prometheus' text format; the engine's own statistics are read when
scraped."""

import time

import mlx.core as mx

from ..serving.stats import Histogram


class Metrics:
    """What the server counts itself; `render` adds the engine's statistics and its vision
    cache's."""

    def __init__(self):
        self.responses: dict = {}  # HTTP status -> count, chat completions only
        self.running = 0
        self.vision_runs = 0
        self.vision_seconds = 0.0

    def instrument_vision(self, model):
        """Count and time the vision tower's passes (features evaluated there, as prefill would)."""
        encode = model.encode_frames

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = encode(*args, **kwargs)
            mx.eval(out)
            self.vision_runs += 1
            self.vision_seconds += time.perf_counter() - start
            return out

        model.encode_frames = timed

    def render(self, state) -> str:
        lines = []

        def metric(name, kind, help_, samples):
            lines.extend([f"# HELP mlx_glm4v_{name} {help_}", f"# TYPE mlx_glm4v_{name} {kind}"])
            lines.extend(f"mlx_glm4v_{name}{labels} {value}" for labels, value in samples)

        def histogram(name, help_, h):
            """Prometheus' cumulative buckets of a stats.Histogram."""
            cumulative = [sum(h.counts[: i + 1]) for i in range(len(h.bounds))]
            metric(
                name,
                "histogram",
                help_,
                [(f'_bucket{{le="{b:g}"}}', n) for b, n in zip(h.bounds, cumulative)]
                + [('_bucket{le="+Inf"}', h.count), ("_sum", round(h.sum, 6)), ("_count", h.count)],
            )

        metric(
            "http_responses_total",
            "counter",
            "Chat-completion responses by HTTP status.",
            [(f'{{code="{code}"}}', n) for code, n in sorted(self.responses.items())] or [("", 0)],
        )
        engines = state.engines()
        if engines:
            s = Summed([e.stats for e in engines])
            metric("requests_total", "counter", "Requests the engine ran.", [("", s.requests)])
            metric(
                "requests_cancelled_total",
                "counter",
                "Requests ended early (client gone, timeout).",
                [("", s.cancelled)],
            )
            metric(
                "prompt_tokens_total",
                "counter",
                "Prompt tokens of the requests run.",
                [("", s.prompt_tokens)],
            )
            metric(
                "cached_prompt_tokens_total",
                "counter",
                "Prompt tokens read from a cached prefix.",
                [("", s.cached_tokens)],
            )
            disks = [e.prefixes.disk for e in engines if e.prefixes.disk is not None]
            if disks:  # the loaded models' disk tiers together
                for name, field, what in (
                    ("prompt_cache_disk_reads_total", "reads", "Prompts read from disk."),
                    (
                        "prompt_cache_disk_tokens_total",
                        "read_tokens",
                        "Prompt tokens read from disk.",
                    ),
                    ("prompt_cache_disk_writes_total", "writes", "Prompts written to disk."),
                    (
                        "prompt_cache_disk_skipped_total",
                        "skipped",
                        "Prompt cache files skipped (damaged, truncated, foreign).",
                    ),
                ):
                    metric(name, "counter", what, [("", sum(getattr(d, field) for d in disks))])
            metric(
                "generated_tokens_total", "counter", "Tokens generated.", [("", s.generated_tokens)]
            )
            for name, what, value in (
                ("draft_tokens_total", "Speculative drafts proposed by rows.", s.drafted),
                ("draft_accepted_tokens_total", "Drafts the model kept.", s.draft_accepted),
                ("verify_steps_total", "Drafting rows' verification passes.", s.verify_steps),
                ("verify_tokens_total", "Tokens those passes gave.", s.verify_tokens),
            ):
                metric(name, "counter", what, [("", value)])
            metric(
                "draft_acceptance",
                "gauge",
                "Drafts kept over drafts proposed, since start.",
                [("", round(s.draft_accepted / s.drafted, 4) if s.drafted else 0.0)],
            )
            metric(
                "tokens_per_verify_step",
                "gauge",
                "Tokens each verification pass of a drafting row gave, since start.",
                [("", round(s.verify_tokens / s.verify_steps, 4) if s.verify_steps else 0.0)],
            )
            histogram(
                "time_to_first_token_seconds",
                "From a request's arrival at the engine to its first token.",
                s.ttft,
            )
            histogram("inter_token_seconds", "Between two tokens of one reply.", s.inter_token)
            histogram(
                "vision_turn_seconds",
                "Vision tower time in each engine turn that prefilled.",
                s.vision_turn,
            )
            metric(
                "prefill_pieces_total",
                "counter",
                "Prefill pieces run: prompt chunks through whole decoder layers (text), frames "
                "through tower blocks (vision), a few attention heads of either (attention).",
                [(f'{{kind="{k}"}}', s.pieces.get(k, 0)) for k in ("text", "vision", "attention")],
            )
            metric(
                "prefill_rows",
                "gauge",
                "Requests being prefilled (prompt chunks or vision pieces to run).",
                [("", sum(e.prefilling for e in engines))],
            )
            memo = Summed([e.vision_memo for e in engines])
            metric(
                "vision_cache_hits_total",
                "counter",
                "Images and videos whose features were cached.",
                [("", getattr(memo, "hits", 0))],
            )
            metric(
                "vision_cache_misses_total",
                "counter",
                "Images and videos the vision tower had to encode.",
                [("", getattr(memo, "misses", 0))],
            )
            metric(
                "vision_cache_bytes",
                "gauge",
                "Bytes of cached vision features.",
                [("", getattr(memo, "bytes", 0))],
            )
            metric(
                "queue_depth",
                "gauge",
                "Requests waiting for the engine.",
                [("", sum(e.queue_depth for e in engines))],
            )
        items = sum(e.stats.vision_items for e in engines)
        seconds = sum(e.stats.vision_seconds for e in engines)
        metric(
            "vision_encodes_total",
            "counter",
            "Images and videos through the vision tower (whole or in pieces).",
            [("", self.vision_runs + items)],
        )
        metric(
            "vision_encode_seconds_total",
            "counter",
            "Time in the vision tower.",
            [("", round(self.vision_seconds + seconds, 6))],
        )
        metric("requests_running", "gauge", "Chat completions in progress.", [("", self.running)])
        metric(
            "mlx_active_memory_bytes",
            "gauge",
            "MLX's memory in arrays now (every loaded model's weights and caches).",
            [("", mx.get_active_memory())],
        )
        metric(
            "mlx_cache_memory_bytes",
            "gauge",
            "MLX's buffer cache: memory freed by arrays, kept for reuse.",
            [("", mx.get_cache_memory())],
        )
        registry = state.registry
        if registry is not None:
            metric("models_loaded", "gauge", "Models in memory.", [("", len(registry.loaded()))])
            metric(
                "models_memory_bytes",
                "gauge",
                "What the loaded models count against the budget: weights and KV caches.",
                [("", registry.used())],
            )
            metric(
                "models_unloaded_total",
                "counter",
                "Models unloaded (idle past their keep-alive, or to make room).",
                [("", registry.unloads)],
            )
            metric(
                "models_memory_budget_bytes",
                "gauge",
                "The models' memory budget (--max-memory-gb).",
                [("", registry.budget)],
            )
        return "\n".join(lines) + "\n"


class Summed:
    """Several engines' statistics read as one: numbers and histograms added, dicts by key."""

    def __init__(self, parts: list):
        self.parts = parts

    def __getattr__(self, name):
        values = [getattr(p, name, 0) for p in self.parts]
        first = values[0]
        if isinstance(first, Histogram):
            total = Histogram(first.bounds)
            for h in values:
                total.counts = [a + b for a, b in zip(total.counts, h.counts)]
                total.sum += h.sum
                total.count += h.count
            return total
        if isinstance(first, dict):
            return {k: sum(v.get(k, 0) for v in values) for k in set().union(*values)}
        return sum(values)
