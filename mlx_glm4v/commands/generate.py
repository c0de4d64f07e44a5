"""`generate`: one prompt answered, the reply streamed (or printed as JSON), its statistics on
stderr, its boxes drawn."""

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import Glm4vError
from .cache_prompt import PROMPT_CACHE, check_prompt_cache, prompt_cache_reuse
from .reply import Reply, load_for_cli, read_prompt, reply_options, stream_reply
from .shared import VERBOSE


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
    from ..serving import distributed

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


def page_images(reply: Reply) -> list:
    """The images as the model saw them, for boxes: a PDF's pages in its place."""
    from ..inputs.processor import expand_pdfs, split_media_kwargs

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
    from ..generation.reply import ReplySplitter

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
    from ..generation.generate import stats_line

    print(stats_line(response, load_s), file=sys.stderr)


def print_json(text: str, response, load_s: float, images: list):
    """The reply as one JSON object on stdout: text, reasoning and answer, statistics, boxes."""
    from ..generation.grounding import boxes_of
    from ..generation.reply import split_reply

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
                **({"drafts": response.drafts} if response.drafts else {}),
            }
        )
    )


def save_boxes(out: str, text: str, images: list):
    """--draw-boxes: each image with the reply's boxes and points drawn; where it went on
    stderr."""
    from ..generation.grounding import draw_reply

    for line in draw_reply(out, text, images):
        typer.echo(line, err=True)
