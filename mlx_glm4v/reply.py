"""A reply's parts: the thinking and the answer, without GLM-V's markers.

GLM-4.1V writes `<think>…</think><answer>…</answer>`; GLM-4.5V/4.6V write `<think>…</think>`
and then the answer; all of them wrap grounding coordinates in `<|begin_of_box|>…<|end_of_box|>`.
The CLI, the Python API and the server split a reply the same way, here, streamed or whole.
"""

import re
from dataclasses import dataclass
from typing import Tuple

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THINKING = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)  # a thinking block, closed or still open
MARKERS = (THINK_OPEN, THINK_CLOSE, "<answer>", "</answer>", "<|begin_of_box|>", "<|end_of_box|>")


@dataclass
class ReplyParts:
    reasoning: str  # the text inside <think>…</think> (up to the end if never closed)
    answer: str  # everything else, markers removed


class ReplySplitter:
    """Splits streamed text into (reasoning, answer) pieces as it arrives.

    A marker may arrive split over pieces, so text that could be the start of one is held back
    until the next piece (or `finish`) tells.
    """

    def __init__(self):
        self.thinking = False
        self.pending = ""

    def feed(self, text: str) -> Tuple[str, str]:
        self.pending += text
        reasoning, answer = [], []
        while self.pending:
            at = self.pending.find("<")
            plain = self.pending if at < 0 else self.pending[:at]
            (reasoning if self.thinking else answer).append(plain)
            self.pending = "" if at < 0 else self.pending[at:]
            if not self.pending:
                break
            marker = next((m for m in MARKERS if self.pending.startswith(m)), None)
            if marker:
                self.pending = self.pending[len(marker):]
                if marker in (THINK_OPEN, THINK_CLOSE):
                    self.thinking = marker == THINK_OPEN
            elif any(m.startswith(self.pending) for m in MARKERS):
                break  # maybe the start of a marker: wait for more text
            else:
                (reasoning if self.thinking else answer).append("<")
                self.pending = self.pending[1:]
        return "".join(reasoning), "".join(answer)

    def finish(self) -> Tuple[str, str]:
        """What is still held back, as it stands."""
        rest, self.pending = self.pending, ""
        return (rest, "") if self.thinking else ("", rest)


def split_reply(text: str) -> ReplyParts:
    """A whole reply as its thinking and its answer, each stripped of surrounding white space."""
    splitter = ReplySplitter()
    parts = [splitter.feed(text), splitter.finish()]
    return ReplyParts("".join(p[0] for p in parts).strip(), "".join(p[1] for p in parts).strip())
