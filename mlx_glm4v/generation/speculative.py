"""Speculative drafting: a drafter guesses the next few tokens cheaply, the model checks them
all in one forward pass and keeps those it would have sampled itself, so the reply is exactly
plain decoding's in fewer, wider passes. Prompt lookup drafts by copying from the conversation.
"""

import mlx.core as mx
import numpy as np

from ..errors import Glm4vError


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
