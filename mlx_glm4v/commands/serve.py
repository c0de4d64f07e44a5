"""`serve`: the HTTP server's options, checked before a model is read; under mlx.launch the
ranks other than 0 follow the server's engine."""

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import Glm4vError
from .shared import ADAPTER, DEFAULT_MODEL, NO_DISTRIBUTED_ADAPTER, VERBOSE, resolve_model_name


def serve(
    model: Optional[List[str]] = typer.Option(
        None,
        "--model",
        "-m",
        help=(
            "Hub repo id or local directory (default: $MLX_GLM4V_MODEL, else "
            f"{DEFAULT_MODEL}); repeat to serve several, each loaded on its first request."
        ),
    ),
    models_file: Optional[Path] = typer.Option(
        None,
        "--models",
        help=(
            "A JSON list of models to serve: {name, path, pin, keep_alive, kv_bits} each "
            "(with or instead of --model)."
        ),
    ),
    keep_alive: Optional[str] = typer.Option(
        None,
        "--keep-alive",
        help=(
            'How long an idle model stays loaded: seconds or a duration such as "5m"; -1: '
            "forever (default: 5m; one --model alone is pinned unless this is given)."
        ),
    ),
    max_memory_gb: Optional[float] = typer.Option(
        None,
        "--max-memory-gb",
        help=(
            "Memory the loaded models may take, weights plus KV caches; idle ones unload to make "
            "room (default: 80% of what MLX may use)."
        ),
    ),
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="Address to listen on; anything but loopback needs --api-key or --insecure-no-auth.",
    ),
    port: int = typer.Option(8080, "--port", help="Port to listen on."),
    alias: Optional[str] = typer.Option(
        None, "--alias", help="The model name clients send (default: the last part of --model)."
    ),
    api_key: Optional[str] = typer.Option(
        None,
        "--api-key",
        envvar="MLX_GLM4V_API_KEY",
        help="Require Authorization: Bearer KEY on /v1/* and /metrics.",
    ),
    insecure_no_auth: bool = typer.Option(
        False, "--insecure-no-auth", help="Allow a non-loopback --host without an API key."
    ),
    media_root: Optional[Path] = typer.Option(
        None,
        "--media-root",
        help=(
            "Let requests name image and video files inside this directory (default: "
            "no file is read)."
        ),
    ),
    allow_url_fetch: bool = typer.Option(
        False,
        "--allow-url-fetch",
        help="Fetch http(s) media URLs (public addresses only, size-capped, time-limited).",
    ),
    cors_origin: Optional[List[str]] = typer.Option(
        None,
        "--cors-origin",
        help="Allow browser pages from this origin (repeat; * for any). Default: CORS off.",
    ),
    max_body_mb: float = typer.Option(
        64.0, "--max-body-mb", help="Largest request body, in MB (413 beyond)."
    ),
    max_media_mb: float = typer.Option(
        64.0, "--max-media-mb", help="Largest fetched or read media file, in MB."
    ),
    max_images: int = typer.Option(
        16, "--max-images", help="Most images per request (each PDF page counts as one)."
    ),
    max_videos: int = typer.Option(2, "--max-videos", help="Most videos per request."),
    max_image_pixels: int = typer.Option(
        50_000_000,
        "--max-image-pixels",
        help="Largest decoded image (width x height), read from its header.",
    ),
    max_video_seconds: float = typer.Option(600.0, "--max-video-seconds", help="Longest video."),
    max_video_frames: int = typer.Option(
        640,
        "--max-video-frames",
        help="Most frames the checkpoint's sampling may pick from one video.",
    ),
    pdf_dpi: float = typer.Option(
        200.0,
        "--pdf-dpi",
        help="Dots per inch PDF pages are rendered at, and the most a request may ask for.",
    ),
    max_pdf_pages: int = typer.Option(
        32, "--max-pdf-pages", help="Most PDF pages per request (each page is an image)."
    ),
    max_prompt_tokens: Optional[int] = typer.Option(
        None,
        "--max-prompt-tokens",
        help="Longest prompt in tokens (default: the model's context length).",
    ),
    request_timeout: float = typer.Option(
        600.0, "--request-timeout", help="End a request after this many seconds."
    ),
    keepalive: float = typer.Option(
        10.0,
        "--keepalive",
        help="Seconds between SSE keep-alive comments while a stream waits (a long prompt).",
    ),
    max_queue: int = typer.Option(
        64, "--max-queue", help="Requests that may wait for the engine (429 beyond)."
    ),
    max_concurrency: Optional[int] = typer.Option(
        None,
        "--max-concurrency",
        help=(
            "Requests decoded together as one batch (default: "
            "from the memory the weights leave, at most 32)."
        ),
    ),
    max_stall_ms: float = typer.Option(
        250.0,
        "--max-stall-ms",
        help=(
            "About how much prefill work (prompt chunks, vision pieces) one engine turn does "
            "before running streams get their next token, in ms."
        ),
    ),
    feature_cache_mb: float = typer.Option(
        2048.0,
        "--feature-cache-mb",
        help="Memory for vision features shared across requests, in MB.",
    ),
    max_output_tokens: Optional[int] = typer.Option(
        None,
        "--max-output-tokens",
        help="Clamp every request's token limit to this (agents ask for tens of thousands).",
    ),
    answer_any_model: bool = typer.Option(
        False,
        "--answer-any-model",
        help=(
            "Answer requests naming any model with the served one (agents' side-task models); "
            "default: 404."
        ),
    ),
    drain_timeout: float = typer.Option(
        30.0,
        "--drain-timeout",
        help=(
            "On SIGTERM, seconds running requests get to finish (new ones get 503) before the "
            "rest are cut and the server exits."
        ),
    ),
    adapter: Optional[str] = ADAPTER,
    prompt_cache_dir: Optional[Path] = typer.Option(
        None,
        "--prompt-cache-dir",
        help=(
            "Keep prompts' KV caches in this directory too, so they outlive a restart (and keep "
            "the key that seals reasoning there)."
        ),
    ),
    prompt_cache_size: str = typer.Option(
        "4GB",
        "--prompt-cache-size",
        help="Most the prompt cache directory holds (e.g. 4GB, 512MB); least recently used out.",
    ),
    warm_prompt: Optional[List[Path]] = typer.Option(
        None,
        "--warm-prompt",
        help=(
            "A JSON file with chat-completion `messages` (and optionally `tools`) to prefill at "
            "start-up, so the first request that starts like it starts from its cache (repeat)."
        ),
    ),
    layout_model: Optional[str] = typer.Option(
        None,
        "--layout-model",
        help=(
            "A PP-DocLayoutV3 checkpoint (directory or hub id): serve the GLM-OCR pipeline at "
            "POST /v1/layout_parsing, as the glmocr SDK's hosted mode calls it."
        ),
    ),
    no_ui: bool = typer.Option(False, "--no-ui", help="Do not serve the chat page at /."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    draft: Optional[str] = typer.Option(
        None,
        "--draft",
        help=(
            "Speculative drafts for requests that name none (their `draft` field): mtp (models "
            "with a multi-token-prediction layer, GLM-OCR) or prompt_lookup; replies unchanged."
        ),
    ),
    draft_steps: Optional[int] = typer.Option(
        None, "--draft-steps", help="Drafts a verification pass (default: mtp 3, lookup 3)."
    ),
    verbose: bool = VERBOSE,
):
    """Serve the model over HTTP: OpenAI chat completions and Responses, Anthropic Messages,
    Ollama's API.

    Under mlx.launch, rank 0 serves HTTP and the other ranks run each batch step with it."""
    from ..serving.distributed import launched

    specs = model_specs(model, models_file, alias, adapter)
    if (group := launched()) is not None and adapter is not None:
        raise Glm4vError(NO_DISTRIBUTED_ADAPTER)
    if group is not None and len(specs) > 1:
        raise Glm4vError("under mlx.launch the server runs one model; give one --model.")
    if group is not None and group.rank() != 0:
        return follow_server(group, specs[0].path)
    from ..server.app import serve as run_server
    from ..server.state import ServerConfig
    from ..serving.disk_cache import parse_size

    check_limits(
        positive={
            "--max-body-mb": max_body_mb,
            "--max-media-mb": max_media_mb,
            "--request-timeout": request_timeout,
            "--keepalive": keepalive,
            "--max-video-seconds": max_video_seconds,
            "--max-stall-ms": max_stall_ms,
            "--pdf-dpi": pdf_dpi,
        },
        at_least_one={
            "--max-pdf-pages": max_pdf_pages,
            "--max-concurrency": max_concurrency,
            "--max-output-tokens": max_output_tokens,
        },
    )
    if drain_timeout < 0:
        raise Glm4vError(f"--drain-timeout {drain_timeout} must be 0 or more.")
    if draft not in (None, "mtp", "prompt_lookup"):
        raise Glm4vError(f"--draft {draft} is not a drafter; choose mtp or prompt_lookup.")
    if draft_steps is not None and (draft is None or draft_steps < 1):
        raise Glm4vError("--draft-steps needs --draft and must be at least 1.")
    if max_memory_gb is not None and max_memory_gb <= 0:
        raise Glm4vError(f"--max-memory-gb {max_memory_gb} must be positive.")
    keep = None if keep_alive is None else keep_alive_seconds(keep_alive)
    policy = media_policy(
        media_root,
        allow_url_fetch,
        max_media_mb,
        max_images,
        max_videos,
        max_image_pixels,
        max_video_seconds,
        max_video_frames,
        pdf_dpi,
        max_pdf_pages,
    )
    several = models_file is not None or len(specs) > 1
    config = ServerConfig(
        model=specs[0].path,
        alias=alias,
        api_key=api_key,
        cors_origins=list(cors_origin or []),
        max_body_bytes=megabytes(max_body_mb),
        max_prompt_tokens=max_prompt_tokens,
        request_timeout=request_timeout,
        keepalive=keepalive,
        max_queue=max_queue,
        max_concurrency=max_concurrency,
        max_stall_ms=max_stall_ms,
        feature_cache_bytes=megabytes(feature_cache_mb),
        ui=not no_ui,
        media=policy,
        max_output_tokens=max_output_tokens,
        answer_any_model=answer_any_model,
        drain_timeout=drain_timeout,
        adapter=adapter,
        prompt_cache_dir=prompt_cache_dir,
        prompt_cache_bytes=parse_size(prompt_cache_size),
        warm_prompts=[read_warm_prompt(p) for p in warm_prompt or []],
        layout_model=layout_model,
        models=specs if several else [],
        keep_alive=keep,
        max_memory_bytes=None if max_memory_gb is None else int(max_memory_gb * 1e9),
        draft=None if draft is None else (draft, draft_steps),
    )
    run_server(
        config,
        host=host,
        port=port,
        insecure_no_auth=insecure_no_auth,
        log_level=log_level,
        group=group,
    )


def read_warm_prompt(path: Path) -> dict:
    """A --warm-prompt file: a JSON object with a list of `messages` and optionally `tools`."""
    try:
        body = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise Glm4vError(f"--warm-prompt {path} could not be read as JSON: {e}.") from None
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise Glm4vError(f"--warm-prompt {path} is not a JSON object with a list of messages.")
    return {k: body[k] for k in ("messages", "tools") if k in body}


def model_specs(
    models: Optional[List[str]], models_file: Optional[Path], alias, adapter: Optional[str]
) -> list:
    """The models `serve` runs: each --model (--adapter applied to the one), then the models
    file's."""
    from ..serving.registry import ModelSpec, check_specs, default_name, read_models_file

    paths = list(models or [])
    if not paths and models_file is None:
        paths = [resolve_model_name(None)]
    if alias is not None and len(paths) + (models_file is not None) > 1:
        raise Glm4vError("--alias names one model; with several, give names in a --models file.")
    if adapter is not None and len(paths) + (models_file is not None) > 1:
        raise Glm4vError(
            "--adapter applies to one --model; with several, give adapters in a --models file."
        )
    specs = [ModelSpec(alias or default_name(p, adapter), p, adapter=adapter) for p in paths]
    if models_file is not None:
        specs += read_models_file(models_file)
    check_specs(specs)
    return specs


def keep_alive_seconds(value: str) -> float:
    from ..serving.registry import duration

    try:
        return duration(value)
    except ValueError:
        raise Glm4vError(
            f'--keep-alive {value!r} is not seconds or a duration such as "5m" or "1h30m".'
        ) from None


def check_limits(positive: dict, at_least_one: dict):
    """A limit that can never be met ends `serve` before a model is read, named as typed; the
    `at_least_one` limits may be left out (None)."""
    for name, value in positive.items():
        if value <= 0:
            raise Glm4vError(f"{name} {value} must be positive.")
    for name, value in at_least_one.items():
        if value is not None and value < 1:
            raise Glm4vError(f"{name} {value} must be at least 1.")


def megabytes(mb: float) -> int:
    """Bytes in `mb` MB as the options count them (MiB)."""
    return int(mb * (1 << 20))


def media_policy(
    media_root: Optional[Path],
    allow_url_fetch: bool,
    max_media_mb: float,
    max_images: int,
    max_videos: int,
    max_image_pixels: int,
    max_video_seconds: float,
    max_video_frames: int,
    pdf_dpi: float,
    max_pdf_pages: int,
):
    """What the server may read for a request: which files and URLs, how large, how many."""
    from ..server.media import MediaPolicy

    return MediaPolicy(
        media_root=media_root,
        allow_url_fetch=allow_url_fetch,
        max_media_bytes=megabytes(max_media_mb),
        max_images=max_images,
        max_videos=max_videos,
        max_image_pixels=max_image_pixels,
        max_video_seconds=max_video_seconds,
        max_video_frames=max_video_frames,
        pdf_dpi=pdf_dpi,
        max_pdf_pages=max_pdf_pages,
    )


def follow_server(group, model: str):
    """A rank other than 0 under `serve`: its part of the model, running every step rank 0's engine
    runs, until rank 0's server stops. Ctrl-C reaches every rank; rank 0 decides."""
    import signal

    from ..serving.distributed import load as load_part
    from ..serving.lockstep import serving_engine

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loaded, processor, layout = load_part(model, group)
    typer.echo(layout.describe(), err=True)
    serving_engine(group, loaded, processor)
    # done: mlx.launch ending this rank now is no error
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
