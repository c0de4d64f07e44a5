"""What generate, chat and cache-prompt share: their options, checked into a `Reply` before a
model is read, the model loaded, the prompt read, the reply streamed."""

import functools
import inspect
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import Glm4vError
from .shared import ADAPTER, MODEL, NO_DISTRIBUTED_ADAPTER, existing_files, resolve_model_name

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


DRAFT = typer.Option(
    None,
    "--draft",
    help=(
        "Draft tokens with the checkpoint's multi-token-prediction layer (mtp, GLM-OCR) and "
        "verify them in one pass; the reply is unchanged."
    ),
)


DRAFT_STEPS = typer.Option(
    None, "--draft-steps", help="Tokens the MTP layer drafts a pass, chained (default: 3)."
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


LAZY_LOAD = typer.Option(
    False,
    "--lazy-load",
    help=(
        "Read each weight when first used: the text weights after the vision tower, "
        "for a lower peak memory."
    ),
)


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
    draft: Optional[str] = DRAFT,
    draft_steps: Optional[int] = DRAFT_STEPS,
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
    from ..generation.settings import GenerationSettings

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
        draft=draft,
        **({} if draft_steps is None else {"draft_steps": draft_steps}),
        thinking_budget=thinking_budget,
        template_kwargs={"enable_thinking": False} if no_thinking else None,
        media_kwargs={k: v for k, v in media.items() if v is not None},
        constraint=constraint_option(schema, regex, choice),
    )
    GenerationSettings(**settings)
    images = existing_files(image, "image")
    from ..serving import distributed  # here, so that --help starts without MLX

    group = distributed.launched()
    if group is None or group.rank() == 0:  # the other ranks get rank 0's pages, never the file
        check_pdfs(images, settings["media_kwargs"])
    return Reply(
        resolve_model_name(model),
        images,
        existing_files(video, "video"),
        system,
        seed,
        settings,
        model_is_default=model is None and not os.environ.get("MLX_GLM4V_MODEL"),
        lazy_load=lazy_load,
        adapter=adapter,
    )


def check_pdfs(images: list, media_kwargs: dict):
    """The PDFs among the images opened and their page selection checked, before a model is
    read (chat's later /image PDFs take the same --pages)."""
    from ..inputs.pdf import check_pdf, is_pdf_file
    from ..inputs.processor import split_media_kwargs

    options, _ = split_media_kwargs(media_kwargs)
    for path in images:
        if is_pdf_file(path):
            check_pdf(path, options, path)


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


def load_for_cli(reply: Reply, group=None):
    """(model, processor, seconds): weights read now (or on first use with --lazy-load); a
    default model that cannot be downloaded points at --model. Under mlx.launch (`group`), this
    rank's part."""
    import time

    from ..checkpoints.loader import DownloadError, load

    start = time.perf_counter()
    if group is not None:  # under mlx.launch: this rank's part of the model
        from ..serving.distributed import load as load_part

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


def stream_reply(model, processor, prompt: str, reply: Reply, reuse=None):
    """The reply's responses as they are generated, with the options the command was given
    (`reuse`: a kept prefix to start from, see `generate.prefill`)."""
    from ..generation.generate import stream_generate

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
