"""Token ids -> the text a reply shows: incremental detokenization (control tokens but GLM-V's
reply markers left out), stop strings held back and cut, and where a reply ends (`ReplyText`, for
`stream_generate` and the engine's rows alike)."""

from typing import Optional, Sequence

from tokenizers.decoders import DecodeStream

from ..inputs.processor import REPLY_MARKERS


class StopStrings:
    """Holds back text that may be the start of a stop string, and cuts at the first one found."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple:
        """(text safe to show, the stop string reached or None): where two are in the text, the
        one that starts first."""
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            cut, found = min(hits)
            out, self.pending = self.pending[:cut], ""
            return out, found
        hold = max(
            (k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])),
            default=0,
        )
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, None

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def hidden_tokens(tokenizer) -> frozenset:
    """The added tokens a reply's text leaves out: all but GLM-V's reply markers
    (processor.REPLY_MARKERS), so a turn or media marker the model emits never becomes text a
    client sends back."""
    return frozenset(
        i for i, t in tokenizer.get_added_tokens_decoder().items() if t.content not in REPLY_MARKERS
    )


class StreamingText:
    """Incremental detokenization that never splits a character; in the end equal to
    `decode(tokens)` of the tokens shown (`hidden_tokens` left out)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stream = DecodeStream(skip_special_tokens=False)
        self.hidden = hidden_tokens(tokenizer)
        self.tokens, self.text = [], ""

    def add(self, token: int) -> str:
        if token in self.hidden:
            return ""
        self.tokens.append(token)
        piece = self.stream.step(self.tokenizer, token) or ""
        self.text += piece
        return piece

    def finish(self) -> str:
        """What the stream still holds back (an unfinished character decodes as the tokenizer
        decodes it)."""
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=False)
        rest = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += rest
        return rest


class ReplyText:
    """A reply's tokens -> the text it shows, and whether a token ends it: a stop token ends it
    after what the decoder still holds, a stop string where the string starts (`stop` then says
    which). The one place `stream_generate` and the engine's rows decide both."""

    def __init__(self, tokenizer, stop_ids=(), stops: Sequence[str] = ()):
        self.decoder = StreamingText(tokenizer)
        self.stops = StopStrings(stops)
        self.stop_ids = stop_ids
        self.stop: Optional[str] = None  # the stop string that ended the reply, if one did

    def add(self, token: int) -> tuple:
        """(text to show, "stop" when the token ends the reply, else None); after a stop string,
        `stop` names it for the reply's finish."""
        if token in self.stop_ids:
            return self.finish(), "stop"
        text, self.stop = self.stops.feed(self.decoder.add(token))
        return text, "stop" if self.stop is not None else None

    def finish(self) -> str:
        """The text still held back, shown when the reply ends (a stop token, or its length)."""
        text, _ = self.stops.feed(self.decoder.finish())
        return text + self.stops.flush()
