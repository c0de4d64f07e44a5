"""The server's models: a loaded one as the routes use it (`Slot`), how the registry loads one,
and what `/v1/models` and Ollama's `/api/tags` and `/api/ps` say of each.

A `Slot` is one model, its processor, its engine (its own MLX thread) and what the dialects must
know to check a request for it (`Served`). The registry (serving/registry.py) decides when a slot
is built and dropped; a request holds its model through a `Lease`, given back once, when its
reply is over.
"""

import json
import logging
import weakref
from datetime import datetime, timedelta, timezone
from pathlib import Path

from mlx.utils import tree_flatten

from ..serving.registry import ModelSpec, Registry, weight_file_bytes
from . import ollama
from .neutral import Served

log = logging.getLogger("mlx_glm4v.server")


class Slot:
    """A loaded model as the routes use it."""

    def __init__(self, spec: ModelSpec, model, processor, engine, config, store):
        from jinja2 import Environment, meta

        self.spec, self.name = spec, spec.name
        self.model, self.processor, self.engine = model, processor, engine
        self.weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        template = processor.chat_template
        self.tools_supported = "tools" in meta.find_undeclared_variables(
            Environment().parse(template)
        )
        self.context = model.config.text_config.max_position_embeddings
        self.max_prompt_tokens = config.max_prompt_tokens or self.context
        self.served = Served(
            spec.name,
            spec.names,
            self.tools_supported,
            "</think>" in template,
            "enable_thinking" in template,
            config.answer_any_model,
            store,
        )

    def close(self):
        """Stop the engine's thread (what is still running ends as cancelled)."""
        self.engine.close(cancel=True)


class Lease:
    """A request's hold on its model, given back once (with its keep_alive wish); an unstarted
    stream that is dropped gives it back when collected."""

    def __init__(self, registry: Registry, entry):
        self.registry, self.entry = registry, entry
        self.keep_alive = None  # seconds the model should stay loaded after this request
        self.done = False

    @property
    def slot(self) -> Slot:
        return self.entry.loaded

    def release(self):
        if not self.done:
            self.done = True
            self.registry.release(self.entry, self.keep_alive)

    def held_by(self, stream):
        """`stream` (an async generator) with the lease given back when it ends."""

        async def held():
            try:
                async for item in stream:
                    yield item
            finally:
                self.release()

        wrapped = held()
        weakref.finalize(wrapped, self.release)
        return wrapped


def on_disk(spec: ModelSpec) -> tuple:
    """(config.json as a dict, weight bytes) of a model not loaded, when it is a local directory
    (a hub model not loaded yet is not looked up: that could download it)."""
    path = Path(spec.path).expanduser()
    try:
        return json.loads((path / "config.json").read_text()), weight_file_bytes(path)
    except (OSError, ValueError):
        return {}, 0


def model_entry(name: str, loaded: bool) -> dict:
    """One model as both SDKs read it: OpenAI's fields and Anthropic's (and whether it is
    loaded now)."""
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "mlx-glm4v",
        "type": "model",
        "display_name": name,
        "created_at": "1970-01-01T00:00:00Z",
        "loaded": loaded,
    }


def tags(registry: Registry, started: datetime) -> list:
    """Every model the server may run, as /api/tags lists them."""
    out = []
    for entry in registry.entries.values():
        slot, name = entry.loaded, entry.spec.name
        if slot is not None:
            out.append(ollama.entry(name, slot.model, started))
        else:
            out.append(ollama.entry_on_disk(name, *on_disk(entry.spec), started))
    return out


def ps(registry: Registry) -> list:
    """The loaded models, as /api/ps lists them, with when each unloads if left idle."""
    now, clock = datetime.now(timezone.utc), registry.clock()
    out = []
    for entry in registry.loaded():
        slot = entry.loaded
        if entry.spec.pin or (entry.expires is None and entry.users == 0):
            expires = now + ollama.PINNED
        elif entry.expires is None:  # in use: its time-to-live starts when the last reply ends
            expires = now + timedelta(seconds=max(0.0, registry.keep_alive))
        else:
            expires = now + timedelta(seconds=max(0.0, entry.expires - clock))
        out.append(ollama.running(entry.spec.name, slot.model, slot.context, expires))
    return out
