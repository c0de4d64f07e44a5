"""Speculative drafting: a drafter guesses the next few tokens cheaply, the model checks them
all in one forward pass and keeps those it would have sampled itself, so the reply is exactly
plain decoding's in fewer, wider passes. Prompt lookup drafts by copying from the conversation;
the MTP drafter runs the checkpoint's multi-token-prediction layer (models/mtp.py), chained.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np

from ..errors import Glm4vError
from ..models.mlxlm import apply_min_p, apply_top_k, apply_top_p


def find_draft(history: np.ndarray, n_draft: int, max_ngram: int = 3) -> list:
    """Tokens that followed the latest earlier occurrence of the history's last n-gram (longest n
    first)."""
    for n in range(min(max_ngram, len(history) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(history[:-1], n)
        hits = np.flatnonzero((windows == history[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return history[start : start + n_draft].tolist()
    return []


def lookup_decode(model, cache, first, sample, history, max_tokens: int, n_draft: int):
    """Prompt-lookup decoding: a draft copied from the prompt or the reply is verified in one pass.

    The model scores the pending token and the draft together; each position is sampled as
    plain decoding would sample it, drafts are kept while they agree, and the first
    disagreement (or the token after a fully accepted draft) comes from the model itself.
    So the output is exactly what plain decoding gives, in fewer, wider forward passes.
    """
    if cache.rotating:
        raise Glm4vError(
            "prompt lookup drops rejected drafts from the cache, "
            "which a rotating cache cannot: drop --max-kv-size."
        )
    y, logprobs = first
    ids = np.asarray(history).tolist()
    emitted = 0
    while True:
        token = y.item()
        yield token, logprobs
        ids.append(token)
        emitted += 1
        if emitted == max_tokens:
            return
        draft = find_draft(np.array(ids), min(n_draft, max_tokens - emitted - 1))
        logits = model(mx.array([[token] + draft]), cache=cache)[0]
        for i in range(len(draft) + 1):
            y, logprobs = sample(logits[i : i + 1], mx.array(ids))  # ids: all accepted so far
            if i == len(draft) or y.item() != draft[i]:
                break
            yield draft[i], logprobs
            ids.append(draft[i])
            emitted += 1
        if len(draft) > i:
            cache.trim(len(draft) - i)


@dataclass
class DraftStats:
    """What drafting did for one reply: drafts proposed and kept, verification passes, tokens."""

    drafted: int = 0
    accepted: int = 0
    steps: int = 0  # verification passes (each a forward pass of the model)
    tokens: int = 0  # tokens those passes gave

    def count(self, drafted: int, kept: int):
        """One verification pass: `drafted` drafts checked, `kept` of them kept, one token more."""
        self.drafted += drafted
        self.accepted += kept
        self.steps += 1
        self.tokens += kept + 1

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    def as_dict(self) -> dict:
        return {
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance": round(self.acceptance, 4),
            "verify_steps": self.steps,
            "tokens_per_step": round(self.tokens_per_step, 4),
        }


def sampling_distribution(temp: float, top_p: float = 1.0, min_p: float = 0.0, top_k: int = 0):
    """log-probabilities [1, vocab] -> the probabilities [vocab] mlx-lm's sampler draws from
    (its filters in its order, then the temperature); None for greedy decoding."""
    if temp == 0:
        return None
    filters = []
    if 0 < top_p < 1:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p != 0:
        filters.append(lambda x: apply_min_p(x, min_p, 1))
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))

    def distribution(logprobs: mx.array) -> mx.array:
        for f in filters:
            logprobs = f(logprobs)
        return mx.softmax(logprobs * (1.0 / temp), axis=-1, precise=True).squeeze(0)

    return distribution


def speculative_choice(p: mx.array, q: mx.array, draft: int, keys=None) -> Optional[int]:
    """Speculative sampling's test of a draft drawn from q: kept (None) with probability
    min(1, p/q), else the token drawn from the residual max(0, p - q), normalised. So the token
    at this position is distributed exactly as p, whatever q is. `keys()` gives each draw's
    PRNG key (an engine row's own); without it the global key sequence draws."""
    keys = keys or (lambda: None)
    pd, qd = p[draft].item(), q[draft].item()
    if mx.random.uniform(key=keys()).item() * qd < pd:
        return None
    residual = mx.maximum(p - q, 0)
    if residual.sum().item() <= 0:  # p == q up to rounding: the draft would always be kept
        residual = p
    return mx.random.categorical(mx.log(residual), key=keys()).item()


DEFAULT_DRAFT_STEPS = 3  # chain depth: never slower than 1 in benchmarks/mtp_bench.py (README)


def mtp_drafter(model, cache, prompt, input_ids) -> "MTPDrafter":
    """A drafter for a prompt about to be prefilled into `cache`: the checkpoint's MTP layer
    with a cache of its own shaped like the model's (rotating alike). A conversation's later
    turn starts the layer's cache afresh at the turn's positions: the layer then sees less
    context (fewer drafts kept), never a different reply."""
    if "mtp" not in model:
        raise Glm4vError(
            "--draft mtp needs a checkpoint with a multi-token-prediction layer "
            "(GLM-OCR's); this one has none: use --prompt-lookup instead."
        )
    first = cache[0]
    rotating = cache.rotating
    mtp_cache = model.make_mtp_cache(
        first.max_size if rotating else None, first.keep if rotating else 0
    )
    mtp_cache.record(prompt)
    return MTPDrafter(model, mtp_cache, prompt, np.asarray(input_ids).reshape(-1))


class MTPDrafter:
    """The MTP layer beside one conversation: its own KV cache (one entry per position of the
    model's cache, computed from the model's hidden state there) and the columns whose hidden
    states are known but whose next token was not when they ran (run by `catch_up`)."""

    def __init__(self, model, cache, prompt, prompt_ids):
        self.model = model
        self.cache = cache
        self.prompt, self.prompt_ids = prompt, prompt_ids  # the prompt being prefilled
        self.pending = []  # (prompt, start, end, hidden [1, n, dim], next tokens known)

    def prefilled(self, hidden: mx.array, start: int, end: int):
        """`prefill`'s hook: a chunk's hidden states, run once the token after it is known."""
        self.add(self.prompt, start, end, hidden, self.prompt_ids[start + 1 : end + 1])

    def add(self, prompt, start: int, end: int, hidden: mx.array, next_tokens):
        self.pending.append((prompt, start, end, hidden, [int(t) for t in next_tokens]))

    def catch_up(self, token: int):
        """Run the pending columns, `token` following the last; (logits [vocab] of the first
        draft, the layer's output [1, 1, dim] there)."""
        for n, (prompt, start, end, hidden, nexts) in enumerate(self.pending):
            if len(nexts) < end - start:
                nexts = nexts + [token]
            last = n == len(self.pending) - 1
            logits, h = self.model.mtp_forward(
                prompt, mx.array([nexts]), hidden, self.cache, start, end, return_hidden=True
            )
            if not last:
                clear = [c.state for c in self.cache]
                mx.eval(clear)
        self.pending = []
        return logits[0, -1], h[:, -1:]


def mtp_decode(
    model,
    cache,
    drafter: MTPDrafter,
    first,
    process,
    distribution,
    history,
    max_tokens: int,
    steps: int,
    stats: DraftStats,
    processed: bool = True,
):
    """Decoding with the model's MTP layer drafting `steps` tokens a pass, chained.

    Each round the layer proposes drafts (greedy: its argmax; sampling: a draw from its
    distribution), the model scores the pending token and the drafts in one pass, and each
    position is decided as plain decoding decides it: greedy keeps a draft equal to the model's
    argmax; sampling runs speculative sampling (`speculative_choice`). `process(logits,
    history, verified)` applies the request's logits processors (the grammar's mask only where
    `verified`: a draft the grammar forbids has probability 0 and is never kept), and
    `distribution` (`sampling_distribution`) makes probabilities of them for draft and model
    alike. The model's cache drops the rejected drafts, the layer's its chained columns, which
    it reruns from the model's own hidden states (`MTPDrafter.catch_up`). A rotating cache
    drafts until it is full, then decodes plainly (a full one cannot drop tokens). Greedy
    decoding without processors (`processed` false) takes `greedy_mtp_decode`'s one wait a round.
    """
    if distribution is None and not processed:
        yield from greedy_mtp_decode(
            model, cache, drafter, first[0], first[1], max_tokens, steps, stats
        )
        return
    token, logprobs = first
    ids = np.asarray(history).reshape(-1).tolist()
    if max_tokens > 1:  # the layer's pass over the prompt is prefill's work, done before it ends
        q_logits, g = drafter.catch_up(token)
        mx.eval(q_logits, g)
    yield token, logprobs
    ids.append(token)
    emitted = 1
    if emitted == max_tokens:
        return
    drafting = True

    def queue(token, q_logits, g):
        """This round's drafts and its verification pass, queued: (drafts proposed, drafts, their
        distributions, the pass's prompt, hidden states, logits)."""
        nonlocal drafting
        k = min(steps, max_tokens - emitted - 1)
        if drafting and cache.rotating and cache.offset + k + 1 > cache[0].max_size:
            drafting = False  # a full rotating cache cannot drop rejected drafts
        k = k if drafting else 0
        drafts, qs = [], []
        for j in range(k):
            q = process(q_logits[None], mx.array(ids + drafts), False)
            if distribution is None:
                d = mx.argmax(q, axis=-1).item()
            else:
                qs.append(distribution(q - mx.logsumexp(q, axis=-1, keepdims=True)))
                d = mx.random.categorical(mx.log(qs[-1])).item()
            drafts.append(d)
            if j + 1 < k:
                q_logits, g = model.mtp_step(
                    mx.array(d).reshape(1, 1), g, drafter.cache, cache.next_position + j
                )
                q_logits = q_logits[0, -1]
        prompt = model.prepare(mx.array([[token] + drafts]), cache=cache)
        cache.record(prompt)
        hidden = model.forward(prompt, cache)
        return k, drafts, qs, prompt, hidden, model.logits(hidden)[0]

    pending = queue(token, q_logits, g)
    while True:
        k, drafts, qs, prompt, hidden, logits = pending
        out, kept = [], 0  # the round's tokens, handed out once the next round is queued
        for i in range(k + 1):
            p = process(logits[i : i + 1], mx.array(ids), True)
            logprobs = (p - mx.logsumexp(p, axis=-1, keepdims=True)).squeeze(0)
            if distribution is None:
                y = mx.argmax(logprobs).item()
                choice = None if i < k and y == drafts[i] else y
            else:
                probs = distribution(p - mx.logsumexp(p, axis=-1, keepdims=True))
                if i < k:
                    choice = speculative_choice(probs, qs[i], drafts[i])
                else:
                    choice = mx.random.categorical(mx.log(probs)).item()
            if choice is not None:
                token = choice
                break
            kept += 1
            out.append((drafts[i], logprobs))
            ids.append(drafts[i])
        out.append((token, logprobs))
        ids.append(token)
        emitted += kept + 1
        stats.count(k, kept)
        if emitted < max_tokens:
            if k > kept:
                cache.trim(k - kept)
            if drafting:
                if k > 1:
                    drafter.cache.trim(k - 1)
                drafter.add(prompt, 0, kept + 1, hidden[:, : kept + 1], drafts[:kept])
                q_logits, g = drafter.catch_up(token)
                mx.async_eval(q_logits, g)  # the layer runs while the pass below is built
            # the next round runs while this one's tokens are handed out (and detokenized,
            # streamed): plain decoding's pipelining, a round at a time
            pending = queue(token, q_logits, g)
        yield from out
        if emitted >= max_tokens:
            return


def greedy_mtp_decode(model, cache, drafter, token, logprobs, max_tokens, steps, stats):
    """`mtp_decode` for greedy decoding without logits processors: a round is one graph and one
    wait. The layer's catch-up runs on every column of the verification pass, fed the model's
    own choices there: a kept column's next token is its draft, which equals the model's choice,
    and the first rejected column's is the model's choice, so the column after the last kept
    draft gives the next round's first draft whatever was kept, computed in the same graph as
    the verification. The columns after it are dropped from both caches (offsets, no copies)."""
    if max_tokens > 1:  # the layer's pass over the prompt is prefill's work, done before it ends
        q_logits, g = drafter.catch_up(token)
        draft = mx.argmax(q_logits, axis=-1)
        mx.eval(draft, g)
    yield token, logprobs
    emitted = 1
    if emitted == max_tokens:
        return
    drafting = True

    def queue(token, draft, g):
        """The round's chained drafts, its pass and the layer's catch-up, queued: (drafts
        proposed, the pass's logits, [choices, drafts, next first drafts], the layer's outputs)."""
        nonlocal drafting
        k = min(steps, max_tokens - emitted - 1)
        if drafting and cache.rotating and cache.offset + k + 1 > cache[0].max_size:
            drafting = False  # a full rotating cache cannot drop rejected drafts
        k = k if drafting else 0
        drafts = [mx.array(draft).reshape(1)]
        for j in range(1, k):
            q_logits, g = model.mtp_step(
                drafts[-1][None], g, drafter.cache, cache.next_position + j - 1
            )
            drafts.append(mx.argmax(q_logits[0], axis=-1))
        column = mx.concatenate([mx.array([token]), *drafts[:k]]) if k else mx.array([token])
        prompt = model.prepare(column[None].astype(mx.int32), cache=cache)
        cache.record(prompt)
        hidden = model.forward(prompt, cache)
        logits = model.logits(hidden)[0]
        choices = mx.argmax(logits, axis=-1)
        wanted, outs = [choices, column[1:]], None
        if drafting:
            if k > 1:
                drafter.cache.trim(k - 1)  # the chain's columns: the catch-up writes them anew
            mtp_logits, outs = model.mtp_forward(
                prompt, choices[None], hidden, drafter.cache, return_hidden=True
            )
            wanted.append(mx.argmax(mtp_logits[0], axis=-1))
        wanted = mx.concatenate(wanted).astype(mx.int32)
        mx.async_eval(wanted, *([outs] if outs is not None and steps > 1 else []))
        return k, logits, wanted, outs

    pending = queue(token, draft, g)
    while True:
        k, logits, wanted, outs = pending
        both = wanted.tolist()
        choices, drafts, nexts = both[: k + 1], both[k + 1 : 2 * k + 1], both[2 * k + 1 :]
        kept = 0
        while kept < k and drafts[kept] == choices[kept]:
            kept += 1
        token = choices[kept]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        out = [(t, logprobs[i]) for i, t in enumerate(choices[: kept + 1])]
        emitted += kept + 1
        stats.count(k, kept)
        if emitted < max_tokens:
            if k > kept:
                cache.trim(k - kept)
                drafter.cache.trim(k - kept)
            g = outs[:, kept : kept + 1] if outs is not None and steps > 1 else None
            # the next round runs while this one's tokens are handed out (and detokenized,
            # streamed): plain decoding's pipelining, a round at a time
            pending = queue(token, nexts[kept] if nexts else 0, g)
        yield from out
        if emitted >= max_tokens:
            return
