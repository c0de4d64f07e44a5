"""`chat`: the terminal's conversation (terminal.py), on one process or under mlx.launch."""

from pathlib import Path
from typing import Optional

import typer

from .cache_prompt import PROMPT_CACHE, check_prompt_cache, prompt_cache_reuse
from .reply import Reply, load_for_cli, reply_options
from .shared import VERBOSE


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

    from ..serving import distributed
    from ..terminal import run_chat

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
