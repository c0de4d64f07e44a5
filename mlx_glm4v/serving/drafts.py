"""Speculative drafts in the engine's rows: a row that asks for them verifies its pending token
and a few drafts in the batch's decode step, beside rows that run one token.

Each round a drafting row proposes drafts ("mtp": the checkpoint's multi-token-prediction
layer, chained, all such rows' chained steps batched; "lookup": n-grams of its conversation),
the step runs its columns ([pending token] + drafts, rows padded to the widest, each row's
attention over its own cache and columns only, rows.py), and the row decides each position as
its run alone decides it (speculative.py's `mtp_decode` / `lookup_decode`): greedy keeps a
draft equal to the model's choice; sampling runs speculative sampling with the row's own PRNG
key, drawn in the order the single stream draws from the global one. The row's processors and
its grammar's mask apply at each verified position. Rejected drafts leave the row's cache,
the chained columns the layer's, which then catches up on the kept columns' hidden states.
"""

from typing import Optional

import mlx.core as mx
import numpy as np

from ..generation.constrain import allowed_tokens, fill_masks, step_masks
from ..generation.generate import clear_cache_after
from ..generation.speculative import (
    DraftStats,
    find_draft,
    mtp_drafter,
    sampling_distribution,
    speculative_choice,
)
from ..models.language import text_rope
from .rows import LayerRows, rows_forward


class RowDrafts:
    """A row's drafter ("mtp" or "lookup", `steps` drafts a round) and what its rounds did."""

    def __init__(self, kind: str, steps: int, settings, processed: bool):
        self.kind, self.steps = kind, steps
        top_p = settings.top_p if settings.top_p < 1 else 1.0
        self.distribution = (
            sampling_distribution(settings.temp, top_p, settings.min_p, settings.top_k)
            if kind == "mtp"
            else None
        )
        # greedy MTP drafts without processors stay on the device until the step's one wait
        self.fast = kind == "mtp" and settings.temp == 0 and not processed
        self.stats = DraftStats()
        self.mtp = None  # speculative.MTPDrafter once the prompt is embedded
        self.next = None  # (logits [vocab], output [1, 1, dim]) of the layer for the next draft
        self.ids: list = []  # prompt and reply (prompt lookup's history)
        self.drafts: list = []  # this round's drafts (ints, or device scalars when fast)
        self.qs: list = []  # the draft distributions they were drawn from (sampling)
        # the queued step's verification of them: (logits [n, vocab], hidden [1, width, dim],
        # position of the first column, greedy choices or None), until decided
        self.round = None

    def start(self, model, cache, prompt, ids):
        """The row's prompt is embedded and about to be prefilled into `cache`."""
        if self.kind == "mtp":
            self.mtp = mtp_drafter(model, cache, prompt, ids)
        self.ids = np.asarray(ids).reshape(-1).tolist()

    def prefilled(self, hidden: mx.array, start: int, end: int):
        if self.mtp is not None:
            self.mtp.prefilled(hidden, start, end)

    def first(self, token: int):
        """The prefill's token is out: the layer runs the prompt's columns."""
        self.ids.append(token)
        if self.mtp is not None:
            self.next = self.mtp.catch_up(token)
            mx.async_eval(self.next)


def budget(row) -> int:
    """Drafts the row proposes this round: its steps, fewer near max_tokens, none once a rotating
    cache is full (it cannot drop rejected drafts)."""
    k = min(row.drafts.steps, row.settings.max_tokens - row.sampled - 1)
    cache = row.cache
    if cache.rotating and cache.offset + k + 1 > cache[0].max_size:
        return 0
    return max(k, 0)


def _history(row, extra: list) -> Optional[mx.array]:
    if row.state.history is None:
        return None
    return mx.concatenate([row.state.history, mx.array(extra, dtype=row.state.history.dtype)])


def _draw(row, q_logits: mx.array):
    """One MTP draft from the layer's logits [vocab], as `mtp_decode` draws it."""
    d = row.drafts
    if d.fast:
        return mx.argmax(q_logits, axis=-1)
    q = q_logits[None]
    history = _history(row, [row.token] + d.drafts)
    for p in row.state.processors:
        q = p(history, q)
    if d.distribution is None:
        return mx.argmax(q, axis=-1).item()
    d.qs.append(d.distribution(q - mx.logsumexp(q, axis=-1, keepdims=True)))
    return mx.random.categorical(mx.log(d.qs[-1]), key=row.state.sampler.next_key()).item()


def propose(model, rows: list):
    """Each row's drafts for this round (`RowDrafts.drafts`); the rows' chained MTP steps run
    batched, each row's layer over its own cache."""
    chains = []
    for row in rows:
        d = row.drafts
        d.drafts, d.qs = [], []
        k = budget(row)
        if k == 0:
            continue
        if d.kind == "lookup":
            d.drafts = find_draft(np.array(d.ids), k)
            continue
        d.drafts.append(_draw(row, d.next[0]))
        if k > 1:
            chains.append((row, k))
    for j in range(1, max((k for _, k in chains), default=1)):
        chains = [(row, k) for row, k in chains if k > j]
        tokens = mx.stack(
            [mx.array(r.drafts.drafts[-1]).reshape(1).astype(mx.int32) for r, _ in chains]
        )
        hidden = mx.concatenate([r.drafts.next[1] for r, _ in chains])
        offsets = [int(np.asarray(r.cache.next_position).reshape(-1)[0]) + j - 1 for r, _ in chains]
        logits, h = _mtp_rows(
            model, tokens, hidden, [r.drafts.mtp.cache for r, _ in chains], offsets
        )
        for b, (row, _) in enumerate(chains):
            row.drafts.next = (logits[b], h[b : b + 1, -1:])
            row.drafts.drafts.append(_draw(row, logits[b]))


def _mtp_rows(model, tokens, hidden, caches, offsets, lengths=None):
    """The MTP layer over rows (tokens [B, n], hidden [B, n, dim], row b's first lengths[b]
    columns real) at positions offsets[b] + column, each row over its own cache: the logits
    [B, vocab] of each row's last real column and the layer's outputs [B, n, dim]."""
    embeds = model.language_model.embed_tokens(tokens)
    rope = text_rope(model.config.text_config, mx.array(np.asarray(offsets)))
    h = model.mtp(embeds, hidden, rope, None, LayerRows([c[0] for c in caches], lengths))
    for c, n in zip(caches, lengths or [tokens.shape[1]] * len(caches)):
        c.next_position = c.next_position + n
    last = [n - 1 for n in lengths] if lengths else [tokens.shape[1] - 1] * len(caches)
    ends = mx.stack([h[b, i] for b, i in enumerate(last)])
    return model.logits(model.mtp.head_input(ends)), h


def fast_choices(row, logits: mx.array) -> mx.array:
    """Greedy choices at every column and the drafts, one array for the step's one wait."""
    both = mx.argmax(logits, axis=-1)
    drafts = row.drafts.drafts
    return mx.concatenate([both, mx.stack(drafts).astype(both.dtype)]) if drafts else both


def verify(model, step: list, sample, stats) -> tuple:
    """Queue the engine's decode step with drafting rows: each runs its pending token and its
    drafts (kept as the row's `round` for `Engine._decide`), the others one token as in
    `Engine._decode`, sampled with `sample` (the engine's per-row sampler); `stats` counts the
    step. Returns the plain rows and their samples."""
    drafting = [r for r in step if r.drafts is not None]
    plain = [r for r in step if r.drafts is None]
    propose(model, drafting)
    cols, lengths = [], []
    for r in step:
        parts = [r.token] + (r.drafts.drafts if r.drafts is not None else [])
        lengths.append(len(parts))
        cols.append(parts)
    width = max(lengths)
    rows = []
    for parts in cols:
        parts = parts + [0] * (width - len(parts))
        rows.append(
            mx.concatenate(
                [
                    (t.reshape(1) if isinstance(t, mx.array) else mx.array([t])).astype(mx.int32)
                    for t in parts
                ]
            )
        )
    hidden = rows_forward(model, [r.cache for r in step], mx.stack(rows), lengths)
    starts = np.cumsum([0] + lengths)
    index = np.concatenate([b * width + np.arange(n) for b, n in enumerate(lengths)])
    flat = hidden.reshape(-1, hidden.shape[-1])
    logits = model.logits(flat[mx.array(index)])
    where = {id(r): b for b, r in enumerate(step)}
    out = []
    if plain:
        tokens = mx.concatenate(
            [
                (r.token.reshape(1) if isinstance(r.token, mx.array) else mx.array([r.token]))
                for r in plain
            ]
        )
        plain_logits = mx.concatenate([logits[int(starts[where[id(r)]])][None] for r in plain])
        masks = step_masks([r.grammar for r in plain], tokens, plain_logits)
        for b, row in enumerate(plain):
            row.state.ran(tokens[b : b + 1])
            out.append(sample(row, plain_logits[b : b + 1], masks.get(b)))
    queued = list(out)
    for row in drafting:
        b = where[id(row)]
        first, end = int(starts[b]), int(starts[b + 1])
        choices = fast_choices(row, logits[first:end]) if row.drafts.fast else None
        position = int(np.asarray(row.cache.next_position).reshape(-1)[0]) - lengths[b]
        row.drafts.round = (logits[first:end], hidden[b : b + 1], position, choices)
        queued.append(choices if choices is not None else logits[first:end])
    mx.async_eval(queued)
    stats.decode_steps += 1
    stats.decode_rows += len(step)
    if stats.decode_steps % 256 == 0:
        clear_cache_after(queued)
    return plain, out


def decide(row, logits: mx.array, fast: Optional[list]) -> tuple:
    """Decide the row's verified columns (logits [n, vocab]) as its run alone decides them:
    ([(token, log-probabilities)] to hand out, the drafts kept)."""
    d = row.drafts
    state, grammar = row.state, row.grammar
    k = len(d.drafts)
    if fast is not None:
        choices, d.drafts = fast[: k + 1], fast[k + 1 :]
    out = []
    for i in range(k + 1):
        ran = row.token if i == 0 else d.drafts[i - 1]
        state.ran(mx.array([ran]))
        allowed = None
        if grammar is not None:
            grammar.feed(int(ran))
            allowed = allowed_tokens(fill_masks([grammar]), logits.shape[-1])
        if fast is not None:
            y = choices[i]
            p = logits[i]
            logprobs = p - mx.logsumexp(p, axis=-1, keepdims=True)
            choice = None if i < k and y == d.drafts[i] else y
        elif d.distribution is None:  # greedy, or prompt lookup: the row's own sampler
            token, logprobs = state.sample(logits[i : i + 1], allowed)
            y = token.item()
            choice = None if i < k and y == d.drafts[i] else y
        else:
            processed = state.process(logits[i : i + 1], allowed)
            probs, logprobs = d.distribution(processed), processed.squeeze(0)
            keys = state.sampler.next_key
            if i < k:
                choice = speculative_choice(probs, d.qs[i], d.drafts[i], keys)
            else:
                choice = mx.random.categorical(mx.log(probs), key=keys()).item()
        if choice is not None:
            out.append((choice, logprobs))
            break
        out.append((d.drafts[i], logprobs))
    kept = len(out) - 1
    d.stats.count(k, kept)
    d.ids.extend(t for t, _ in out)
    return out, kept


def catch_up(model, rounds: list):
    """After the step: each MTP row's layer runs its kept columns (rounds: (row, hidden
    [1, n, dim] of its verified columns, kept, the position of its first column)), batched."""
    rows = [r for r in rounds if r[0].drafts.mtp is not None]
    if not rows:
        return
    width = max(kept + 1 for _, _, kept, _ in rows)
    tokens, hiddens, lengths = [], [], []
    for row, hidden, kept, _ in rows:
        nexts = row.drafts.ids[-(kept + 1) :]  # the tokens after each kept column
        n = kept + 1
        tokens.append(nexts + [0] * (width - n))
        h = hidden[:, :n]
        if n < width:
            h = mx.concatenate([h, mx.zeros((1, width - n, h.shape[-1]), h.dtype)], axis=1)
        hiddens.append(h)
        lengths.append(n)
        k = len(row.drafts.drafts)
        if k > 1:
            row.drafts.mtp.cache.trim(k - 1)
    logits, h = _mtp_rows(
        model,
        mx.array(tokens),
        mx.concatenate(hiddens),
        [r.drafts.mtp.cache for r, *_ in rows],
        [start for *_, start in rows],
        lengths,
    )
    for b, (row, *_) in enumerate(rows):
        n = lengths[b]
        row.drafts.next = (logits[b], h[b : b + 1, n - 1 : n])
    mx.async_eval([r.drafts.next for r, *_ in rows])
