"""What the routes share (`State`: the config, the models' registry, the Responses store, the
drain, the layout detector) and how it is built: the models loaded on a thread at start-up, a
request's model held while it runs, the disk tier, the warm prompts. `prepare` (media read, the
template rendered, the processor run) is here because warm prompts and requests both take it.
"""

import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from starlette.concurrency import run_in_threadpool

from ..checkpoints.adapters import read_adapter
from ..errors import Glm4vError
from ..inputs.image import load_image
from ..serving.registry import DEFAULT_KEEP_ALIVE, ModelSpec, NoRoom, Registry, default_name
from . import openai, responses
from .drain import Drain
from .media import MediaPolicy, processor_budget, resolve_media
from .metrics import Metrics
from .models import Lease, Slot
from .neutral import ApiError, Served, bad, check_model

log = logging.getLogger("mlx_glm4v.server")


@dataclass
class ServerConfig:
    model: str  # what --model named: a hub id or a local directory
    alias: Optional[str] = None  # the name clients use; default: the last part of `model`
    api_key: Optional[str] = None
    cors_origins: list = field(default_factory=list)
    max_body_bytes: int = 64 << 20
    max_prompt_tokens: Optional[int] = None  # default: the model's context length
    request_timeout: float = 600.0
    keepalive: float = 10.0  # seconds between SSE comment lines while nothing else is sent
    max_queue: int = 64
    max_concurrency: Optional[int] = None  # None: the engine's default (from free memory)
    max_stall_ms: float = 250.0  # prefill work one engine turn may do before running rows decode
    feature_cache_bytes: int = 2 << 30
    ui: bool = True
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_output_tokens: Optional[int] = None  # clamps every request's token limit
    # answer any model name with the served model (agents' side-task models)
    answer_any_model: bool = False
    store_count: int = 1000  # Responses kept for previous_response_id / GET, newest first
    store_bytes: int = 64 << 20
    drain_timeout: float = 30.0  # seconds running requests get to finish after SIGTERM
    adapter: Optional[str] = None  # an adapter directory applied to the model (--adapter)
    # the prefix cache's disk tier (and the sealing key's home), its cap, prompts run at start-up
    prompt_cache_dir: Optional[Path] = None
    prompt_cache_bytes: int = 4 << 30
    warm_prompts: list = field(default_factory=list)  # parsed --warm-prompt files
    # several models (registry.ModelSpec); empty: `model` alone, loaded at start and pinned
    models: list = field(default_factory=list)
    # seconds an idle model stays loaded (None: 5 minutes; given, one --model is not pinned)
    keep_alive: Optional[float] = None
    max_memory_bytes: Optional[int] = None  # the models' budget (None: registry.default_budget)
    # speculative drafts when a request names none (serve --draft): ("mtp", steps), for the
    # models with a multi-token-prediction layer, or ("prompt_lookup", steps)
    draft: Optional[tuple] = None
    layout_model: Optional[str] = None  # PP-DocLayoutV3 for /v1/layout_parsing (--layout-model)

    @property
    def name(self) -> str:
        """The name clients send: the alias, or the model's last part (and the adapter's: the
        adapter is part of what is served)."""
        return self.alias or default_name(self.model, self.adapter)

    def specs(self) -> list:
        if self.models:
            return self.models
        pin = self.keep_alive is None
        return [ModelSpec(self.name, self.model, pin=pin, adapter=self.adapter)]


class State:
    """What the routes share: the config, the models' registry (once built), the Responses
    store, the drain."""

    def __init__(self, config: ServerConfig, group=None):
        self.config, self.group = config, group
        self.metrics = Metrics()
        self.registry = None
        self.layout = None  # the layout detector of /v1/layout_parsing (--layout-model)
        self.ready = threading.Event()
        self.specs = config.specs()
        self.store = responses.Store(config.store_count, config.store_bytes)
        # what a request naming no model, or an unknown one, is checked against
        names = set().union(*(s.names for s in self.specs))
        self.served = Served(self.specs[0].name, names, answer_any_model=config.answer_any_model)
        self.drain = Drain(config.drain_timeout)
        self.started = datetime.now(timezone.utc)

    def engines(self) -> list:
        return [e.loaded.engine for e in self.registry.loaded()] if self.registry else []

    def flush(self):
        """Every loaded model's disk-tier writes (the drain's last step)."""
        for engine in self.engines():
            engine.flush()

    def load(self, loader=None):
        """Build the registry and load the pinned models (on a thread at start-up)."""
        from ..checkpoints.loader import resolve

        if self.config.layout_model is not None:
            from ..documents.layout import load_layout

            self.layout = load_layout(self.config.layout_model)
        keep = DEFAULT_KEEP_ALIVE if self.config.keep_alive is None else self.config.keep_alive
        self.registry = Registry(
            self.specs,
            functools.partial(self._load, loader),
            resolve,
            self.config.max_memory_bytes,
            keep,
        )
        for spec in self.specs:
            if spec.pin:
                self.registry.release(self.registry.acquire(spec.name))
        for i, body in enumerate(self.config.warm_prompts):
            self.warm(body, i)
        self.drain.flushers.append(self.flush)
        self.ready.set()

    def _load(self, loader, spec: ModelSpec, directory) -> Slot:
        """One model, its processor and its engine (under mlx.launch: this rank's part, the
        other ranks following this engine)."""
        from ..checkpoints.loader import load
        from ..serving.engine import Engine

        if self.group is not None:
            from ..serving.distributed import load as load_part

            model, processor, layout = load_part(spec.path, self.group)
            log.info("%s", layout.describe())
        elif spec.adapter is not None:
            model, processor = (loader or load)(spec.path, adapter_path=spec.adapter)
        else:
            model, processor = (loader or load)(spec.path)
        self.metrics.instrument_vision(model)
        options = dict(
            prompt_cache=self.prompt_cache(model, spec),
            max_queue=self.config.max_queue,
            max_concurrency=self.config.max_concurrency,
            feature_cache_bytes=self.config.feature_cache_bytes,
            max_stall_ms=self.config.max_stall_ms,
            identity=identity(spec),
        )
        if self.group is not None:
            from ..serving.lockstep import serving_engine

            engine = serving_engine(self.group, model, processor, **options)
        else:
            engine = Engine(model, processor, **options)
        log.info("model %s loaded; serving it as %r", spec.path, spec.name)
        return Slot(spec, model, processor, engine, self.config, self.store)

    async def hold(self, body, key: str = "model") -> Lease:
        """The model a request names, loaded if it is not (off the event loop) and held until
        the lease is given back; a name no model has is refused as the dialects refuse it."""
        registry = self.registry
        name = body.get(key) if isinstance(body, dict) else None
        entry = registry.find(name) if isinstance(name, str) else None
        if entry is None:
            first = registry.entries[self.specs[0].name]
            several = len(self.specs) > 1
            if several and not isinstance(body, dict):
                raise bad("the request body must be a JSON object.")
            if several and not (isinstance(name, str) and self.config.answer_any_model):
                if not isinstance(name, str) or not name:
                    check_model(name, self.served, key)  # the 400 every dialect gives
                listed = ", ".join(repr(s.name) for s in self.specs)
                raise ApiError(
                    404,
                    f"the model {name!r} does not exist; this server runs {listed}.",
                    key,
                    "model_not_found",
                )
            entry = first  # one model checks the name as before (or any name is answered)
        try:
            entry = await run_in_threadpool(registry.acquire, entry.spec.name)
        except NoRoom as e:
            raise ApiError(
                503, str(e), code="no_memory", headers={"Retry-After": str(e.retry_after)}
            ) from None
        except Glm4vError as e:
            log.error("could not load %s: %s", entry.spec.path, e)
            raise ApiError(
                500, f"the model {entry.spec.name!r} could not be loaded; the log says why."
            ) from None
        return Lease(registry, entry)

    def prompt_cache(self, model, spec: ModelSpec):
        """The disk tier for this model and the engine's settings, or None."""
        from ..checkpoints.loader import resolve
        from ..serving.disk_cache import CacheKey, DiskCache
        from ..serving.engine import PREFILL_CHUNK

        if self.config.prompt_cache_dir is None:
            return None
        if self.group is not None:
            log.warning("--prompt-cache-dir is not used under mlx.launch: each rank holds a part")
            return None
        adapter = read_adapter(spec.adapter).digest if spec.adapter else ""
        key = CacheKey.of(model, resolve(spec.path), PREFILL_CHUNK, adapter=adapter)
        return DiskCache(self.config.prompt_cache_dir, self.config.prompt_cache_bytes, key)

    def warm(self, body: dict, i: int):
        """Prefill a --warm-prompt (its prompt kept like any other) on the first model, loaded
        for it if it is not pinned, before serving."""
        from ..generation.settings import GenerationSettings
        from ..serving.engine import Request as EngineRequest

        started = time.monotonic()
        entry = self.registry.acquire(self.specs[0].name)
        try:
            slot = entry.loaded
            try:
                neutral = openai.parse({**body, "model": slot.name}, slot.served)
                inputs = prepare(slot, self.config, neutral)
            except ApiError as e:
                raise Glm4vError(f"--warm-prompt number {i + 1} is refused: {e.message}") from None
            settings = GenerationSettings(**{**neutral.settings, "max_tokens": 1})
            for event in slot.engine.submit(EngineRequest(inputs, settings)):
                if event.finish_reason is not None:
                    usage = event.usage
        finally:
            self.registry.release(entry)
        log.info(
            "warm prompt %d: %d tokens (%d from the cache) in %.1f s",
            i + 1,
            usage.prompt_tokens,
            usage.cached_tokens,
            time.monotonic() - started,
        )


def identity(spec: ModelSpec) -> str:
    """What a model's outputs depend on: the checkpoint and the adapter's bytes (the prefix
    cache keys its entries by it)."""
    if spec.adapter is None:
        return spec.path
    return f"{spec.path}+{read_adapter(spec.adapter).digest}"


def prepare(slot: Slot, config: ServerConfig, neutral) -> dict:
    """Media read and checked, the template rendered, the processor run: the engine's inputs."""
    processor = slot.processor
    media_kwargs = processor_budget(neutral.media_budget, config.media, processor)
    messages, resolved = resolve_media(
        neutral.messages, config.media, processor, neutral.media_budget
    )
    try:
        kwargs = dict(neutral.template_kwargs)
        if neutral.tools:
            kwargs.update(tools=neutral.tools, tool_choice=neutral.tool_choice)
        inputs = processor.process_messages(messages, kwargs, media_kwargs)
        neutral.image_sizes = [
            getattr(i, "info", {}).get("original_size") or load_image(i).shape[1::-1]
            for i in processor.media_from_messages(messages)[0]
        ]
    except Glm4vError as e:
        hide = [p for p in (resolved.dir and resolved.dir.name, config.media.media_root) if p]
        message = str(e)
        for path in hide:
            message = message.replace(str(Path(path).resolve()), "<media>").replace(
                str(path), "<media>"
            )
        raise bad(message, "messages") from None
    finally:
        resolved.close()
    n = int(inputs["input_ids"].shape[-1])
    if n > slot.max_prompt_tokens:
        raise bad(
            f"the prompt is {n} tokens, "
            f"over the limit of {slot.max_prompt_tokens} (--max-prompt-tokens).",
            "messages",
            "context_length_exceeded",
        )
    return inputs
