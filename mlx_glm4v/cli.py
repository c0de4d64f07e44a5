"""The `mlx-glm4v` command: thin typer commands that parse options and print.

Problems a user can cause end as one line on stderr and a non-zero exit; `--verbose` shows
the traceback instead.
"""

import functools
import inspect
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import typer

from .errors import Glm4vError

DEFAULT_MODEL = "zai-org/GLM-4.1V-9B-Thinking"

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="GLM-4.1V on Apple silicon with MLX: image and video chat, conversion and quantization.",
)

VERBOSE = typer.Option(False, "--verbose", "-v", help="Show full tracebacks on errors.")
MODEL = typer.Option(
    None,
    "--model",
    "-m",
    help=f"Hub repo id or local directory (default: $MLX_GLM4V_MODEL, else {DEFAULT_MODEL}).",
)
IMAGES = typer.Option(
    None, "--image", help="An image file, or a PDF (its pages, each an image); repeat for several."
)
VIDEOS = typer.Option(None, "--video", help="A video file; repeat for several.")
SYSTEM = typer.Option(None, "--system", help="A system prompt.")
MAX_TOKENS = typer.Option(
    None,
    "--max-tokens",
    help="Most tokens to generate per reply (default: 256 for generate, 2048 for chat).",
)
TEMP = typer.Option(0.0, "--temp", help="Sampling temperature; 0 is greedy.")
TOP_P = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold; 1 disables it.")
TOP_K = typer.Option(0, "--top-k", help="Sample among the k most likely tokens; 0 disables it.")
MIN_P = typer.Option(0.0, "--min-p", help="Drop tokens below min-p times the top probability.")
REPETITION_PENALTY = typer.Option(
    None, "--repetition-penalty", help="Penalty for repeating recent tokens, e.g. 1.1."
)
SEED = typer.Option(None, "--seed", help="Random seed for sampling.")
MAX_KV_SIZE = typer.Option(
    None,
    "--max-kv-size",
    help="Rotate the KV cache at this many tokens, keeping the system prompt and media.",
)
KV_BITS = typer.Option(None, "--kv-bits", help="Quantize the KV cache to this many bits (2-8).")
PROMPT_CACHE = typer.Option(
    None,
    "--prompt-cache",
    "--prompt-cache-file",
    help="Start from the KV cache `cache-prompt` saved, as far as the prompt starts like its own.",
)
PREFILL_STEP = typer.Option(2048, "--prefill-step-size", help="Prompt tokens per prefill chunk.")
IGNORE_EOS = typer.Option(
    False, "--ignore-eos", help="Keep generating past end-of-sequence tokens."
)
PROMPT_LOOKUP = typer.Option(
    0,
    "--prompt-lookup",
    help=(
        "Draft this many tokens from n-grams of the conversation and verify them in one pass "
        "(pays when the reply copies the input, as in OCR)."
    ),
)
NO_THINKING = typer.Option(
    False, "--no-thinking", help="Ask models with a thinking switch (GLM-4.5V/4.6V) not to think."
)
THINKING_BUDGET = typer.Option(
    None,
    "--thinking-budget",
    help="After this many tokens of thinking, close it (</think>) so the answer follows.",
)
MAX_PIXELS = typer.Option(
    None,
    "--max-pixels",
    help=(
        "Most pixels (height x width after resizing) per image or video frame; fewer pixels, "
        "fewer tokens (28x28 pixels make one token)."
    ),
)
FPS = typer.Option(
    None,
    "--fps",
    help="Video frames sampled per second (default: the checkpoint's, 2 for GLM-4.1V).",
)
MAX_FRAMES = typer.Option(
    None, "--max-frames", help="Most frames sampled per video (spread over the clip; at least 2)."
)
PAGES = typer.Option(
    None, "--pages", help="The pages of each PDF to read, e.g. 1-3,5 (default: all); 4- to the end."
)
PDF_DPI = typer.Option(200.0, "--pdf-dpi", help="Dots per inch PDF pages are rendered at.")
MAX_PDF_PAGES = typer.Option(
    32, "--max-pdf-pages", help="Most pages read from one PDF; more selected is an error."
)
SCHEMA = typer.Option(
    None,
    "--schema",
    help="Answer with JSON valid against this JSON Schema (a file, or the schema itself).",
)
REGEX = typer.Option(
    None, "--regex", help="Answer with text that matches this regular expression whole."
)
CHOICE = typer.Option(
    None, "--choice", help="Answer with exactly one of these comma-separated strings."
)
ADAPTER = typer.Option(
    None,
    "--adapter",
    help="A LoRA/DoRA adapter directory to apply: ours (adapters.safetensors) or PEFT's.",
)
LAZY_LOAD = typer.Option(
    False,
    "--lazy-load",
    help=(
        "Read each weight when first used: the text weights after the vision tower, "
        "for a lower peak memory."
    ),
)


def friendly_errors(command):
    """Turn user errors into one line on stderr (exit 1) unless --verbose asks for the traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except (Glm4vError, FileNotFoundError, ValueError) as e:
            if kwargs.get("verbose"):
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        except RuntimeError as e:  # under mlx.launch: another rank stopped
            from .serving.distributed import lost_rank, say_once

            if kwargs.get("verbose") or (lost := lost_rank(e)) is None:
                raise
            say_once(f"error: {lost}")
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@friendly_errors
def convert(
    hf_path: str = typer.Option(
        ..., "--hf-path", help="Hub repo id or local directory of the source checkpoint."
    ),
    mlx_path: str = typer.Option(
        "mlx_model", "--mlx-path", help="Where to write the MLX checkpoint."
    ),
    quantize: bool = typer.Option(False, "-q", "--quantize", help="Quantize the weights."),
    q_bits: Optional[int] = typer.Option(
        None, "--q-bits", help="Bits per weight: 2, 3, 4, 5, 6 or 8 (affine; default 4)."
    ),
    q_group_size: Optional[int] = typer.Option(
        None, "--q-group-size", help="Group size: 32, 64 or 128 (affine; default 64)."
    ),
    q_mode: str = typer.Option(
        "affine", "--q-mode", help="affine, or mxfp4, nvfp4, mxfp8 (these fix bits and group size)."
    ),
    quant_recipe: Optional[str] = typer.Option(
        None,
        "--quant-recipe",
        help=(
            "mixed_LOW_HIGH, e.g. mixed_3_6 or mixed_4_8: LOW bits, HIGH for embeddings, lm_head "
            "and sensitive layers (implies -q)."
        ),
    ),
    quantize_vision: bool = typer.Option(
        False,
        "--quantize-vision",
        help="Quantize the vision tower's linear layers too (default: kept in floats).",
    ),
    dtype: Optional[str] = typer.Option(
        None,
        "--dtype",
        help="bfloat16, float16 or float32 for what is not quantized (default: the checkpoint's).",
    ),
    dequantize: bool = typer.Option(
        False, "--dequantize", help="Turn a quantized checkpoint back into floats."
    ),
    upload_repo: Optional[str] = typer.Option(
        None, "--upload-repo", help="Hub repo to upload the result to."
    ),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --mlx-path."),
    adapter: Optional[str] = typer.Option(
        None,
        "--adapter",
        help="Fuse this LoRA/DoRA adapter directory (ours or PEFT's) into the weights first.",
    ),
    verbose: bool = VERBOSE,
):
    """Convert a GLM-V checkpoint to MLX, optionally quantized (and with an adapter fused)."""
    import warnings

    from .checkpoints.convert import convert as run_convert

    warnings.showwarning = lambda message, *_: typer.echo(f"warning: {message}", err=True)
    run_convert(
        hf_path,
        mlx_path,
        quantize=quantize,
        q_bits=q_bits,
        q_group_size=q_group_size,
        q_mode=q_mode,
        quant_recipe=quant_recipe,
        quantize_vision=quantize_vision,
        dtype=dtype,
        dequantize=dequantize,
        upload_repo=upload_repo,
        force=force,
        adapter=adapter,
    )


def resolve_model_name(model: Optional[str]) -> str:
    return model or os.environ.get("MLX_GLM4V_MODEL") or DEFAULT_MODEL


def existing_files(paths, kind: str) -> list:
    """The files named, `~` expanded and quotes or backslash escapes undone as a terminal pastes
    them."""
    from .serving.distributed import is_follower
    from .terminal import existing_paths

    if is_follower():  # under mlx.launch files exist on rank 0 only; it sends their bytes
        return list(paths or [])
    return [path for p in paths or [] for path in existing_paths(p, kind)]


@dataclass
class Reply:
    """What generate and chat take alike, checked before the model is loaded."""

    model: str
    images: list
    videos: list
    system: Optional[str]
    seed: Optional[int]
    settings: dict  # GenerationSettings keyword arguments
    model_is_default: bool = False
    lazy_load: bool = False
    adapter: Optional[str] = None


def _reply_options(
    image: Optional[List[str]] = IMAGES,
    video: Optional[List[str]] = VIDEOS,
    system: Optional[str] = SYSTEM,
    model: Optional[str] = MODEL,
    max_tokens: Optional[int] = MAX_TOKENS,
    temp: float = TEMP,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    min_p: float = MIN_P,
    repetition_penalty: Optional[float] = REPETITION_PENALTY,
    seed: Optional[int] = SEED,
    max_kv_size: Optional[int] = MAX_KV_SIZE,
    kv_bits: Optional[int] = KV_BITS,
    prefill_step_size: int = PREFILL_STEP,
    ignore_eos: bool = IGNORE_EOS,
    prompt_lookup: int = PROMPT_LOOKUP,
    no_thinking: bool = NO_THINKING,
    thinking_budget: Optional[int] = THINKING_BUDGET,
    max_pixels: Optional[int] = MAX_PIXELS,
    fps: Optional[float] = FPS,
    max_frames: Optional[int] = MAX_FRAMES,
    pages: Optional[str] = PAGES,
    pdf_dpi: float = PDF_DPI,
    max_pdf_pages: int = MAX_PDF_PAGES,
    lazy_load: bool = LAZY_LOAD,
    adapter: Optional[str] = ADAPTER,
    schema: Optional[str] = SCHEMA,
    regex: Optional[str] = REGEX,
    choice: Optional[str] = CHOICE,
    *,
    default_max_tokens: int,
) -> Reply:
    from .generation.settings import GenerationSettings

    media = {"max_pixels": max_pixels, "fps": fps, "max_frames": max_frames, "pages": pages}
    media.update(dpi=pdf_dpi, max_pdf_pages=max_pdf_pages)
    settings = dict(
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        temp=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        max_kv_size=max_kv_size,
        kv_bits=kv_bits,
        prefill_step_size=prefill_step_size,
        ignore_eos=ignore_eos,
        prompt_lookup=prompt_lookup,
        thinking_budget=thinking_budget,
        template_kwargs={"enable_thinking": False} if no_thinking else None,
        media_kwargs={k: v for k, v in media.items() if v is not None},
        constraint=constraint_option(schema, regex, choice),
    )
    GenerationSettings(**settings)
    return Reply(
        resolve_model_name(model),
        existing_files(image, "image"),
        existing_files(video, "video"),
        system,
        seed,
        settings,
        model_is_default=model is None and not os.environ.get("MLX_GLM4V_MODEL"),
        lazy_load=lazy_load,
        adapter=adapter,
    )


def constraint_option(
    schema: Optional[str], regex: Optional[str], choice: Optional[str]
) -> Optional[dict]:
    """--schema, --regex or --choice as a constraint (a dict: it travels to other ranks as JSON)."""
    given = [
        name
        for name, v in (("--schema", schema), ("--regex", regex), ("--choice", choice))
        if v is not None
    ]
    if len(given) > 1:
        raise Glm4vError(
            f"give only one of --schema, --regex and --choice, not {' and '.join(given)}."
        )
    if regex is not None:
        return {"kind": "regex", "spec": regex}
    if choice is not None:
        return {"kind": "choice", "spec": [c.strip() for c in choice.split(",") if c.strip()]}
    if schema is None:
        return None
    text = schema
    if not schema.lstrip().startswith("{"):
        path = Path(schema).expanduser()
        if not path.is_file():
            raise Glm4vError(f"--schema {schema!r} is neither a JSON schema nor a file.")
        text = path.read_text()
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise Glm4vError(
            f"--schema is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}."
        ) from None
    if not isinstance(spec, dict):
        raise Glm4vError("--schema must be a JSON object (a JSON Schema).")
    return {"kind": "json_schema", "spec": spec}


def reply_options(default_max_tokens: int):
    """Give a command the options generate and chat share, declared once in `_reply_options`;
    the command receives them checked, as `reply`."""
    shared = [
        p
        for p in inspect.signature(_reply_options).parameters.values()
        if p.name != "default_max_tokens"
    ]

    def decorate(command):
        own = [p for p in inspect.signature(command).parameters.values() if p.name != "reply"]

        @functools.wraps(command)
        def wrapper(**kwargs):
            options = {p.name: kwargs.pop(p.name) for p in shared}
            return command(
                reply=_reply_options(**options, default_max_tokens=default_max_tokens), **kwargs
            )

        wrapper.__signature__ = inspect.Signature(shared + own)
        return wrapper

    return decorate


NO_DISTRIBUTED_ADAPTER = (
    "--adapter is not supported under mlx.launch; fuse it into a checkpoint with "
    "`mlx-glm4v convert --adapter DIR` and serve that."
)


def load_for_cli(reply: Reply, group=None):
    """(model, processor, seconds): weights read now (or on first use with --lazy-load); a
    default model that cannot be downloaded points at --model. Under mlx.launch (`group`), this
    rank's part."""
    import time

    from .checkpoints.loader import DownloadError, load

    start = time.perf_counter()
    if group is not None:  # under mlx.launch: this rank's part of the model
        from .serving.distributed import load as load_part

        if reply.adapter is not None:
            raise Glm4vError(NO_DISTRIBUTED_ADAPTER)

        model, processor, layout = load_part(reply.model, group)
        typer.echo(layout.describe(), err=True)
        return model, processor, time.perf_counter() - start
    try:
        model, processor = load(reply.model, lazy=reply.lazy_load, adapter_path=reply.adapter)
    except DownloadError as e:
        if not reply.model_is_default:
            raise
        raise DownloadError(
            f"{e} Or give a checkpoint on disk with --model LOCAL_DIR."
        ) from e.__cause__
    return model, processor, time.perf_counter() - start


def read_prompt(prompt: str) -> str:
    """The prompt as given, or standard input's text for `-`."""
    if prompt != "-":
        return prompt
    text = sys.stdin.read().strip()
    if not text:
        raise Glm4vError("the prompt read from standard input (--prompt -) is empty.")
    return text


@app.command()
@friendly_errors
@reply_options(default_max_tokens=256)
def generate(
    reply: Reply,
    prompt: str = typer.Option(
        ..., "--prompt", "-p", help="The user message; - reads it from standard input."
    ),
    hide_thinking: bool = typer.Option(
        False, "--hide-thinking", help="Print only the answer, not the model's thinking."
    ),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="Print one JSON object with the text, its reasoning and answer, statistics and boxes.",
    ),
    draw_boxes: Optional[str] = typer.Option(
        None,
        "--draw-boxes",
        help=(
            "Save the image with the reply's boxes and points drawn (OUT-1.png, OUT-2.png, "
            "... for several images)."
        ),
    ),
    prompt_cache: Optional[Path] = PROMPT_CACHE,
    verbose: bool = VERBOSE,
):
    """Answer one prompt about images and videos, streaming the reply.

    With --schema, --regex or --choice only the answer is printed: the constrained text."""
    if draw_boxes and not reply.images:
        raise Glm4vError("--draw-boxes needs an image (--image) to draw on.")
    from .serving import distributed

    group = distributed.launched()
    check_prompt_cache(prompt_cache, reply, group)
    if group is None or group.rank() == 0:
        prompt = read_prompt(prompt)
    loaded_model, processor, load_s = load_for_cli(reply, group)
    reuse = prompt_cache_reuse(prompt_cache, loaded_model, reply)
    if group is not None:  # rank 0's prompt, options, seed and media bytes on every rank
        prompt, reply = distributed.share_reply(group, prompt, reply)
    responses = stream_reply(loaded_model, processor, prompt, reply, reuse)
    if group is not None:
        responses = distributed.watched(group, responses)
        if group.rank() != 0:
            return distributed.follow(group, responses)
    images = page_images(reply)
    if as_json:
        text, response = read_reply(responses)
        print_json(text, response, load_s, images)
    else:
        hide_thinking = hide_thinking or reply.settings.get("constraint") is not None
        text, response = print_reply(responses, hide_thinking)
        print_stats(response, load_s)
    if draw_boxes:
        save_boxes(draw_boxes, text, images)
    if group is not None:
        distributed.finish(group)


def stream_reply(model, processor, prompt: str, reply: Reply, reuse=None):
    """The reply's responses as they are generated, with the options the command was given
    (`reuse`: a kept prefix to start from, see `generate.prefill`)."""
    from .generation.generate import stream_generate

    return stream_generate(
        model,
        processor,
        prompt,
        reply.images,
        reply.videos,
        system=reply.system,
        seed=reply.seed,
        reuse=reuse,
        **reply.settings,
    )


def check_prompt_cache(prompt_cache: Optional[Path], reply: Reply, group):
    """--prompt-cache's limits, before a model is read."""
    if prompt_cache is None:
        return
    if group is not None:
        raise Glm4vError("--prompt-cache is for one process; leave it out under mlx.launch.")
    if reply.settings["max_kv_size"] is not None:
        raise Glm4vError("--prompt-cache needs a plain KV cache: leave out --max-kv-size.")


def prompt_cache_reuse(prompt_cache: Optional[Path], model, reply: Reply):
    """What puts the prompt cache file's prefix into a prompt's cache (None without a file)."""
    if prompt_cache is None:
        return None
    from .serving.disk_cache import prompt_file_reuse

    return prompt_file_reuse(prompt_cache, cli_cache_key(model, reply), model.config)


def cli_cache_key(model, reply: Reply):
    """What a prompt cache file of generate's must have been made with: these weights, their
    dtype, the adapter and the prefill chunk (its KV is plain; --kv-bits quantizes only after
    the prompt)."""
    from .checkpoints.adapters import read_adapter
    from .checkpoints.loader import resolve
    from .serving.disk_cache import CacheKey

    adapter = read_adapter(reply.adapter).digest if reply.adapter else ""
    return CacheKey.of(
        model, resolve(reply.model), reply.settings["prefill_step_size"], adapter=adapter
    )


@app.command("cache-prompt")
@friendly_errors
@reply_options(default_max_tokens=1)
def cache_prompt(
    reply: Reply,
    prompt: str = typer.Option(
        ..., "--prompt", "-p", help="The user message; - reads it from standard input."
    ),
    prompt_cache_file: Path = typer.Option(
        ...,
        "--prompt-cache-file",
        "--prompt-cache",
        help="Where to save the prompt's KV cache (safetensors).",
    ),
    verbose: bool = VERBOSE,
):
    """Run a prompt (its system prompt, images and videos too) once and save its KV cache, so that
    `generate --prompt-cache FILE` with a prompt that starts the same way starts from it (as
    mlx-lm's cache_prompt)."""
    import dataclasses

    from .serving import distributed
    from .serving.disk_cache import save_prompt_file

    if distributed.launched() is not None:
        raise Glm4vError("cache-prompt runs in one process; leave out mlx.launch.")
    if reply.settings["max_kv_size"] is not None or reply.settings["kv_bits"] is not None:
        raise Glm4vError(
            "a prompt cache file holds a plain KV cache: leave out --max-kv-size and --kv-bits."
        )
    prompt = read_prompt(prompt)
    loaded_model, processor, load_s = load_for_cli(reply)
    ran = {}

    def keep(inputs, cache):  # the prompt and its cache, run from the start
        ran.update(inputs=inputs, cache=cache)
        return 0

    once = dataclasses.replace(reply, settings={**reply.settings, "max_tokens": 1})
    for _ in stream_reply(loaded_model, processor, prompt, once, keep):
        pass
    key = cli_cache_key(loaded_model, reply)
    path = save_prompt_file(
        prompt_cache_file, key, loaded_model.config, ran["inputs"], ran["cache"]
    )
    n = int(ran["inputs"]["input_ids"].shape[-1])
    typer.echo(f"saved the KV cache of the prompt's {n} tokens to {path}", err=True)


def page_images(reply: Reply) -> list:
    """The images as the model saw them, for boxes: a PDF's pages in its place."""
    from .inputs.processor import expand_pdfs, split_media_kwargs

    pdf, _ = split_media_kwargs(reply.settings["media_kwargs"])
    message = {"role": "user", "content": [{"type": "image", "image": i} for i in reply.images]}
    return [item["image"] for item in expand_pdfs([message], pdf)[0]["content"]]


def read_reply(responses) -> tuple:
    """(text, last response): the whole reply, nothing printed while it comes (for --json)."""
    text, response = "", None
    for response in responses:
        text += response.text
    return text, response


def print_reply(responses, hide_thinking: bool) -> tuple:
    """Print the reply as it streams, the answer alone with `hide_thinking`, then end the line;
    returns (text, last response)."""
    from .generation.reply import ReplySplitter

    text, shown, response = "", "", None
    splitter = ReplySplitter()
    for response in responses:
        text += response.text
        piece = response.text
        if hide_thinking:
            piece = splitter.feed(piece)[1]
            # the answer alone starts with its first word
            piece = piece if shown else piece.lstrip()
        shown += piece
        sys.stdout.write(piece)
        sys.stdout.flush()
    if hide_thinking:
        rest = splitter.finish()[1]
        sys.stdout.write(rest if shown else rest.lstrip())
    print()
    return text, response


def print_stats(response, load_s: float):
    """Token counts, speeds and memory on stderr, so that stdout holds the reply alone."""
    from .generation.generate import stats_line

    print(stats_line(response, load_s), file=sys.stderr)


def print_json(text: str, response, load_s: float, images: list):
    """The reply as one JSON object on stdout: text, reasoning and answer, statistics, boxes."""
    from .generation.grounding import boxes_of
    from .generation.reply import split_reply

    parts = split_reply(text)
    print(
        json.dumps(
            {
                "text": text,
                "reasoning": parts.reasoning,
                "answer": parts.answer,
                "prompt_tokens": response.prompt_tokens,
                "generation_tokens": response.generation_tokens,
                "load_s": load_s,
                "prompt_tps": response.prompt_tps,
                "generation_tps": response.generation_tps,
                "peak_memory_gb": response.peak_memory,
                "finish_reason": response.finish_reason,
                "boxes": boxes_of(text, images),
            }
        )
    )


def save_boxes(out: str, text: str, images: list):
    """--draw-boxes: each image with the reply's boxes and points drawn; where it went on
    stderr."""
    from .generation.grounding import draw_reply

    for line in draw_reply(out, text, images):
        typer.echo(line, err=True)


@app.command()
@friendly_errors
@reply_options(default_max_tokens=2048)
def chat(
    reply: Reply,
    hide_thinking: bool = typer.Option(
        False, "--hide-thinking", help="Do not show the model's thinking."
    ),
    prompt_cache: Optional[Path] = PROMPT_CACHE,
    verbose: bool = VERBOSE,
):
    """Chat about images and videos in the terminal. /image PATH, /video PATH, /reset, /help,
    /exit."""
    import mlx.core as mx

    from .serving import distributed
    from .terminal import run_chat

    group = distributed.launched()
    check_prompt_cache(prompt_cache, reply, group)
    loaded_model, processor, _ = load_for_cli(reply, group)
    reuse = prompt_cache_reuse(prompt_cache, loaded_model, reply)
    if group is not None:
        reply = distributed.share_options(group, reply)
    if reply.seed is not None:
        mx.random.seed(reply.seed)
    if group is not None and group.rank() != 0:
        return distributed.follow_chat(group, loaded_model, processor, reply)
    run_chat(
        loaded_model,
        processor,
        system=reply.system,
        images=reply.images,
        videos=reply.videos,
        settings=reply.settings,
        hide_thinking=hide_thinking,
        group=group,
        reuse=reuse,
    )
    if group is not None:
        distributed.share_turn(group, "exit")
        distributed.finish(group)


@app.command()
@friendly_errors
def serve(
    model: Optional[str] = MODEL,
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
    max_images: int = typer.Option(16, "--max-images", help="Most images per request."),
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
    verbose: bool = VERBOSE,
):
    """Serve the model over HTTP: OpenAI chat completions and Responses, Anthropic Messages,
    Ollama's API.

    Under mlx.launch, rank 0 serves HTTP and the other ranks run each batch step with it."""
    from .serving.distributed import launched

    if (group := launched()) is not None and adapter is not None:
        raise Glm4vError(NO_DISTRIBUTED_ADAPTER)
    if group is not None and group.rank() != 0:
        return follow_server(group, resolve_model_name(model))
    from .server.app import ServerConfig
    from .server.app import serve as run_server
    from .serving.disk_cache import parse_size

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
    config = ServerConfig(
        model=resolve_model_name(model),
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


@app.command()
@friendly_errors
def ocr(
    files: List[str] = typer.Argument(..., help="Images and PDFs to read."),
    out: Optional[Path] = typer.Option(
        None, "-o", "--output", help="Write NAME.md / NAME.json here (default: Markdown to stdout)."
    ),
    format: str = typer.Option("both", "--format", help="markdown, json or both (with -o)."),
    layout: bool = typer.Option(
        True, "--layout/--no-layout", help="Find regions first, or read each page whole."
    ),
    pages: Optional[str] = typer.Option(None, "--pages", help="PDF pages, e.g. 1-3,5."),
    model: str = typer.Option("zai-org/GLM-OCR", "--model", help="GLM-OCR: hub id or directory."),
    layout_model: str = typer.Option(
        "PaddlePaddle/PP-DocLayoutV3_safetensors", "--layout-model", help="The layout detector."
    ),
    pdf_dpi: float = typer.Option(200.0, "--pdf-dpi", help="PDF rendering resolution."),
    threshold: float = typer.Option(0.3, "--threshold", help="Layout score threshold."),
    max_tokens: int = typer.Option(8192, "--max-tokens", help="Longest answer per region."),
    temperature: float = typer.Option(0.0, "--temperature"),
    top_p: float = typer.Option(0.00001, "--top-p"),
    top_k: int = typer.Option(1, "--top-k"),
    repetition_penalty: float = typer.Option(1.1, "--repetition-penalty"),
    polygon: bool = typer.Option(False, "--polygon", help="Cut regions by their outline."),
    raw_crops: bool = typer.Option(
        False, "--raw-crops", help="Send crops as pixels, not JPEG-encoded as the SDK does."
    ),
    verbose: bool = typer.Option(False, "--verbose", help="Tracebacks for errors."),
):
    """Documents to Markdown and JSON: GLM-OCR's layout pipeline in one process."""
    from .documents.pipeline import OcrSettings, Reader, save
    from .documents.progress import ProgressBar

    if format not in ("markdown", "json", "both"):
        raise Glm4vError(f"--format {format!r} must be markdown, json or both.")
    settings = OcrSettings(
        layout=layout,
        threshold=threshold,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        polygon=polygon,
        image_format=None if raw_crops else "JPEG",
        pdf_dpi=pdf_dpi,
        pages=pages,
    )
    paths = existing_files(files, "document")
    from .checkpoints.loader import load
    from .documents.layout import load_layout

    loaded, processor = load(model)
    detector = load_layout(layout_model) if layout else None
    formats = ("markdown", "json") if format == "both" else (format,)
    failed = False
    with (
        ProgressBar() as bar,
        Reader(loaded, processor, detector, settings, progress=bar) as reader,
    ):
        for document in reader.stream(paths):
            for error in document.errors:
                bar.write(f"error: {error}")
                failed = True
            if not document.pages:  # nothing of it could be read: reported, nothing written
                continue
            if out is not None:
                save(document, out, formats)
            elif format == "json":
                typer.echo(json.dumps(document.pages, ensure_ascii=False))
            else:
                typer.echo(document.markdown)
    if failed:
        raise typer.Exit(1)


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
    from .server.media import MediaPolicy

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

    from .serving.distributed import load as load_part
    from .serving.lockstep import serving_engine

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loaded, processor, layout = load_part(model, group)
    typer.echo(layout.describe(), err=True)
    serving_engine(group, loaded, processor)
    # done: mlx.launch ending this rank now is no error
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def show_version(value: bool):
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ours = version("mlx-glm4v")
        except PackageNotFoundError:
            ours = "(not installed)"
        typer.echo(f"mlx-glm4v {ours} (mlx {version('mlx')})")
        raise typer.Exit()


@app.callback()
def options(
    version: bool = typer.Option(
        False, "--version", callback=show_version, is_eager=True, help="Print the version and exit."
    ),
):
    """GLM-4.1V on Apple silicon with MLX: image and video chat, conversion and quantization."""


def main():
    app(prog_name="mlx-glm4v")


if __name__ == "__main__":
    main()
