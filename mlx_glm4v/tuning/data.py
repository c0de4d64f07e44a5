"""Fine-tuning data: conversations -> token ids, labels and pixels, rendered as inference renders
them.

A data file is JSONL, one conversation a line, in the message form the server takes (OpenAI's):

    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": "A cat."}],
     "tools": [...]}

Images and videos by path (relative to the file) or data URL (a Hugging Face dataset's rows,
hf_dataset.py, give images as their bytes); assistant tool calls and tool results as the chat
completions API writes them. A conversation goes through the checkpoint's
chat template and our `Processor`, so its tokens, pixels and (in the model) positions are those
of the same conversation at inference.

Labels (transformers' convention, `IGNORE_INDEX` where nothing is learnt): each assistant turn's
tokens after its `<|assistant|>`, through the token that ends the turn, the next role token (the
model learns to stop there: GLM's stop tokens are `<|user|>` and `<|observation|>`);
after a conversation's last assistant turn `<|user|>` is appended to end it. `train_on_prompt`
labels every token.
"""

import base64
import binascii
import json
import mimetypes
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import Glm4vError
from ..inputs.processor import Processor
from ..models.loss import IGNORE_INDEX

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
ASSISTANT, TURN_END = "<|assistant|>", "<|user|>"
ROLES = ("system", "user", "assistant", "tool")
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


class RecordError(Glm4vError):
    """A record the data cannot use; the message names its file, line and field."""


@dataclass
class Conversation:
    """One record, checked: the template's messages (media as paths or data URL bytes), tools."""

    where: str  # "file line n", for messages about it
    messages: list
    tools: Optional[list] = None
    base: Path = field(default_factory=Path)  # relative media paths start here


@dataclass
class Example:
    """One conversation as model inputs: ids [L], labels [L], and its media's processor outputs."""

    input_ids: np.ndarray
    labels: np.ndarray
    media: dict

    def __len__(self) -> int:
        return len(self.input_ids)


# ---- records -> conversations -------------------------------------------------------------------


def _text(content, where: str) -> str:
    """A message's text: a string, or text parts joined."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") in ("text", "input_text")):
                raise RecordError(f"{where}.content[{i}]: only text parts are allowed here.")
            if not isinstance(part.get("text"), str):
                raise RecordError(f"{where}.content[{i}]: a text part needs a string `text`.")
            texts.append(part["text"])
        return "".join(texts)
    raise RecordError(f"{where}.content must be a string or a list of text parts.")


def _media_source(part: dict, kind: str, where: str):
    """The path or data URL a media part names, in any of the forms the server reads."""
    value = part.get(kind if kind in ("image", "video") else None)
    for key in ("image_url", "video_url", "url", "path"):
        if value is None and key in part:
            value = part[key]
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, (str, bytes)) or not value:
        raise RecordError(f"{where}: a {kind} part needs a path or data URL.")
    return value


def _user_content(content, where: str):
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RecordError(f"{where}.content must be a string or a list of content parts.")
    parts = []
    for i, part in enumerate(content):
        at = f"{where}.content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text"):
            parts.append({"type": "text", "text": _text([part], where)})
        elif kind in ("image", "image_url", "input_image"):
            parts.append({"type": "image", "source": _media_source(part, kind, at), "at": at})
        elif kind in ("video", "video_url"):
            parts.append({"type": "video", "source": _media_source(part, kind, at), "at": at})
        else:
            raise RecordError(
                f"{at}: content part type {kind!r} is not one of text, image_url, video_url."
            )
    return parts


def _tool_calls(calls, where: str) -> list:
    if not isinstance(calls, list):
        raise RecordError(f"{where}.tool_calls must be a list.")
    out = []
    for i, call in enumerate(calls):
        at = f"{where}.tool_calls[{i}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RecordError(f"{at} needs a function with a name.")
        arguments = fn.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise RecordError(f"{at}.function.arguments is not valid JSON.") from None
        if not isinstance(arguments, dict):
            raise RecordError(f"{at}.function.arguments must be a JSON object.")
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": arguments}})
    return out


def parse_record(record, where: str, base: Path = Path()) -> Conversation:
    """A JSON record -> a `Conversation`, or a `RecordError` naming `where` and the field."""
    try:
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            raise RecordError("the record needs a `messages` list.")
        messages = []
        for i, m in enumerate(record["messages"]):
            at = f"messages[{i}]"
            if not isinstance(m, dict):
                raise RecordError(f"{at} must be an object.")
            role = {"developer": "system"}.get(m.get("role"), m.get("role"))
            if role not in ROLES:
                raise RecordError(f"{at}.role {m.get('role')!r} is not one of {', '.join(ROLES)}.")
            if role == "user":
                messages.append({"role": role, "content": _user_content(m.get("content"), at)})
                continue
            message = {"role": role, "content": _text(m.get("content"), at)}
            if role == "assistant":
                reasoning = m.get("reasoning_content", m.get("reasoning"))
                if isinstance(reasoning, str):
                    message["reasoning_content"] = reasoning
                if m.get("tool_calls"):
                    message["tool_calls"] = _tool_calls(m["tool_calls"], at)
            messages.append(message)
        if not any(m["role"] == "assistant" for m in messages):
            raise RecordError("`messages` holds no assistant turn to learn from.")
        for message in messages:
            for part in message["content"] if isinstance(message["content"], list) else []:
                if part["type"] in ("image", "video"):
                    _check_source(part["source"], base, part["at"])
        tools = record.get("tools")
        if tools is not None and not (
            isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
        ):
            raise RecordError("`tools` must be a list of tool objects.")
    except RecordError as e:
        raise RecordError(f"{where}: {e}") from None
    return Conversation(where, messages, tools or None, base)


def _check_source(source, base: Path, at: str):
    if isinstance(source, bytes):  # an image's own bytes (a dataset row's)
        return
    if source.startswith("data:"):
        if ";base64," not in source.partition(",")[0] + ",":
            raise RecordError(f"{at}: only base64 data URLs are read.")
    elif not (base / source.removeprefix("file://")).is_file():
        raise RecordError(f"{at}: {source} is not a file.")


def read_jsonl(path) -> list:
    """Every record of a JSONL file as a `Conversation`; the first bad one refused in a sentence
    naming the file, line and field."""
    path = Path(path)
    if path.is_dir():
        raise Glm4vError(f"{path} is a directory; give a JSONL file of conversations.")
    if not path.is_file():
        raise Glm4vError(f"{path}: no such data file.")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}: not valid JSON ({e.msg}).") from None
            out.append(parse_record(record, where, path.parent))
    if not out:
        raise Glm4vError(f"{path} holds no conversation.")
    return out


# ---- conversations -> examples ------------------------------------------------------------------


def _data_url_bytes(url: str, where: str) -> tuple:
    """(bytes, file suffix) of a base64 data URL."""
    head, _, payload = url.partition(",")
    if ";base64" not in head:
        raise RecordError(f"{where}: only base64 data URLs are read.")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RecordError(f"{where}: the data URL is not valid base64.") from None
    mime = head[len("data:") :].split(";")[0]
    return data, mimetypes.guess_extension(mime) or ""


def _template_messages(conversation: Conversation, files: Path) -> list:
    """The messages with each media part as the file it names (data URLs written under
    `files`), as the template and processor take them."""
    out = []
    for message in conversation.messages:
        content = message["content"]
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for part in content:
            if part["type"] not in ("image", "video"):
                parts.append(part)
                continue
            source, at = part["source"], f"{conversation.where}: {part['at']}"
            if isinstance(source, bytes) or source.startswith("data:"):
                data, suffix = (
                    (source, "") if isinstance(source, bytes) else _data_url_bytes(source, at)
                )
                path = files / f"{len(list(files.iterdir()))}{suffix}"
                path.write_bytes(data)
            else:
                path = conversation.base / source.removeprefix("file://")
            parts.append({"type": part["type"], part["type"]: str(path)})
        out.append({**message, "content": parts})
    return out


def label_turns(ids: np.ndarray, role_ids, assistant_id: int) -> np.ndarray:
    """Labels of a rendered conversation: each assistant turn's tokens after its `<|assistant|>`
    through the next role token; the rest `IGNORE_INDEX`."""
    labels = np.full_like(ids, IGNORE_INDEX)
    roles = np.flatnonzero(np.isin(ids, list(role_ids)))
    for at, following in zip(roles, list(roles[1:]) + [None]):
        if ids[at] == assistant_id:
            end = len(ids) if following is None else following + 1
            labels[at + 1 : end] = ids[at + 1 : end]
    return labels


def encode(
    processor: Processor,
    conversation: Conversation,
    train_on_prompt: bool = False,
    media_kwargs: Optional[dict] = None,
) -> Example:
    """One conversation's ids, labels and media outputs, through the chat template and processor
    as at inference; a problem with its media named by file, line and field."""
    with tempfile.TemporaryDirectory(prefix="mlx-glm4v-data-") as files:
        messages = _template_messages(conversation, Path(files))
        text = processor.apply_chat_template(
            messages, add_generation_prompt=False, tools=conversation.tools
        )
        if messages[-1]["role"] == "assistant":
            text += TURN_END
        images, videos = processor.media_from_messages(messages)
        try:
            out = processor(text, images=images, videos=videos, **(media_kwargs or {}))
        except Glm4vError as e:
            raise RecordError(f"{conversation.where}: {e}") from None
    ids = out["input_ids"][0].astype(np.int64)
    if train_on_prompt:
        labels = ids.copy()
    else:
        role_ids = [processor.convert_tokens_to_ids(t) for t in ROLE_TOKENS]
        labels = label_turns(ids, [i for i in role_ids if i is not None], _id(processor, ASSISTANT))
    return Example(ids, labels, {k: out[k] for k in MEDIA_KEYS if k in out})


def _id(processor: Processor, token: str) -> int:
    found = processor.convert_tokens_to_ids(token)
    if found is None:
        raise Glm4vError(f"the tokenizer has no {token} token; it is not a GLM-V checkpoint's.")
    return found


class ConversationData:
    """A data file's conversations (or conversations read elsewhere), checked when read and
    encoded when asked for; the last `cache_size` encoded are kept (their pixels with them), so a
    small data set is encoded once."""

    def __init__(
        self,
        source,
        processor: Processor,
        train_on_prompt: bool = False,
        media_kwargs: Optional[dict] = None,
        cache_size: int = 32,
    ):
        self.conversations = source if isinstance(source, list) else read_jsonl(source)
        self.processor = processor
        self.train_on_prompt = train_on_prompt
        self.media_kwargs = media_kwargs
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, i: int) -> Example:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        example = encode(
            self.processor, self.conversations[i], self.train_on_prompt, self.media_kwargs
        )
        if self.cache_size > 0:
            self._cache[i] = example
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return example


def collate(examples: list, pad_token_id: int) -> dict:
    """Several examples as one batch of model inputs and labels, padded on the right as trainers
    pad for training (TRL, LlamaFactory): input_ids, attention_mask, labels [B, L] and the media
    of all examples in batch order (the order the model takes their grids in)."""
    longest = max(len(e) for e in examples)
    batch = {
        "input_ids": np.full((len(examples), longest), pad_token_id, np.int64),
        "attention_mask": np.zeros((len(examples), longest), np.int64),
        "labels": np.full((len(examples), longest), IGNORE_INDEX, np.int64),
    }
    for row, e in enumerate(examples):
        batch["input_ids"][row, : len(e)] = e.input_ids
        batch["attention_mask"][row, : len(e)] = 1
        batch["labels"][row, : len(e)] = e.labels
    for key in MEDIA_KEYS:
        parts = [e.media[key] for e in examples if key in e.media]
        if parts:
            batch[key] = np.concatenate(parts)
    return batch
