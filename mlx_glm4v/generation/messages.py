"""Chat messages from a plain prompt and its images and videos."""

from typing import Optional, Sequence

from ..errors import Glm4vError


def user_message(text: str = "", images: Sequence = (), videos: Sequence = ()) -> dict:
    """A user turn with its images and videos first, in the order given, then the text."""
    content = [{"type": "image", "image": i} for i in images] + [
        {"type": "video", "video": v} for v in videos
    ]
    if text:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def build_messages(prompt, images=(), videos=(), system: Optional[str] = None) -> list:
    """Chat messages from a plain prompt (media go into its user turn) or messages as given."""
    if isinstance(prompt, str):
        messages = [{"role": "system", "content": system}] if system else []
        return messages + [user_message(prompt, images or (), videos or ())]
    if images or videos or system:
        raise Glm4vError(
            "with chat messages, put images, videos and the system prompt into the messages."
        )
    return list(prompt)
