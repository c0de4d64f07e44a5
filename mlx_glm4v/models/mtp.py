"""GLM's multi-token-prediction (next-N) layer: a one-block model that guesses the token after
next from the main model's hidden state and the next token.

GLM-OCR stores one after its last decoder layer (`model.language_model.layers.16.*` on the
hub). vLLM (`glm_ocr_mtp.py`) and SGLang (`glm_ocr_nextn.py`) run it as a speculative drafter:
for the column at position i, `eh_proj(concat(enorm(embed(token i+1)), hnorm(h_i)))` goes
through a GLM-4 decoder block (its own KV cache, the main model's position i), then
`shared_head.norm` and the model's head. h_i is the main model's output after its final norm
(what vLLM's target model returns and its proposer is given); the token embedding is zeroed
where the position is 0, as vLLM does. The embeddings and the head are the model's: the
checkpoint's copies of them are not kept. The layer's output is the block's (residual stream,
before `shared_head.norm`): vLLM feeds that, not the normed state, to the next step of a chain.
"""

import mlx.core as mx
import mlx.nn as nn

from .config import TextConfig
from .language import DecoderLayer


class SharedHead(nn.Module):
    """The norm before the head the layer shares with the model."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class MTPLayer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = nn.RMSNorm(dim, eps=eps)
        self.hnorm = nn.RMSNorm(dim, eps=eps)
        self.eh_proj = nn.Linear(2 * dim, dim, bias=False)
        self.mtp_block = DecoderLayer(config)
        self.shared_head = SharedHead(config)

    def __call__(
        self, embeds: mx.array, hidden: mx.array, rope, mask=None, cache=None, at_zero=None
    ) -> mx.array:
        """The block's output [B, L, dim] (before `shared_head.norm`, which `head_input` applies).

        embeds: the embeddings of the tokens after each column's; hidden: the main model's
        hidden states of the columns; rope, mask, cache: as a decoder layer takes them (the
        main model's positions); at_zero: [B, L] true where the column's position is 0."""
        if at_zero is not None:
            embeds = mx.where(at_zero[..., None], mx.zeros_like(embeds), embeds)
        x = self.eh_proj(mx.concatenate([self.enorm(embeds), self.hnorm(hidden)], axis=-1))
        return self.mtp_block(x, rope, mask, cache)

    def head_input(self, h: mx.array) -> mx.array:
        return self.shared_head.norm(h)


# checkpoint tensor of the layer (after its `layers.N.` prefix) -> None: a copy of the model's own
SHARED_COPIES = ("embed_tokens.", "shared_head.head.")
OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.")


def mtp_name(rest: str):
    """Our name under `mtp.` for a tensor the checkpoint stores as `layers.N.<rest>`; None for
    the copies of the embeddings and the head."""
    if rest.startswith(SHARED_COPIES):
        return None
    if rest.startswith(OWN) or rest.startswith("mtp_block."):
        return rest
    return "mtp_block." + rest
