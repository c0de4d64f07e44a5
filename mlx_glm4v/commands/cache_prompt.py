"""Prompt cache files: `cache-prompt` writes one; generate and chat start from one with
--prompt-cache."""

from pathlib import Path
from typing import Optional

import typer

from ..errors import Glm4vError
from .reply import Reply, load_for_cli, read_prompt, reply_options, stream_reply
from .shared import VERBOSE

PROMPT_CACHE = typer.Option(
    None,
    "--prompt-cache",
    "--prompt-cache-file",
    help="Start from the KV cache `cache-prompt` saved, as far as the prompt starts like its own.",
)


def check_prompt_cache(prompt_cache: Optional[Path], reply: Reply, group):
    """--prompt-cache's limits, before a model is read."""
    if prompt_cache is None:
        return
    if group is not None:
        raise Glm4vError("--prompt-cache is for one process; leave it out under mlx.launch.")
    if reply.settings["max_kv_size"] is not None:
        raise Glm4vError("--prompt-cache needs a plain KV cache: leave out --max-kv-size.")
    if reply.settings.get("draft") is not None:
        raise Glm4vError(
            "--draft mtp fills the drafter's cache while the whole prompt is read, which a "
            "--prompt-cache file skips: leave out one of the two."
        )


def prompt_cache_reuse(prompt_cache: Optional[Path], model, reply: Reply):
    """What puts the prompt cache file's prefix into a prompt's cache (None without a file)."""
    if prompt_cache is None:
        return None
    from ..serving.disk_cache import prompt_file_reuse

    return prompt_file_reuse(prompt_cache, cli_cache_key(model, reply), model.config)


def cli_cache_key(model, reply: Reply):
    """What a prompt cache file of generate's must have been made with: these weights, their
    dtype, the adapter and the prefill chunk (its KV is plain; --kv-bits quantizes only after
    the prompt)."""
    from ..checkpoints.adapters import read_adapter
    from ..checkpoints.loader import resolve
    from ..serving.disk_cache import CacheKey

    adapter = read_adapter(reply.adapter).digest if reply.adapter else ""
    return CacheKey.of(
        model, resolve(reply.model), reply.settings["prefill_step_size"], adapter=adapter
    )


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

    from ..serving import distributed
    from ..serving.disk_cache import save_prompt_file

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
