"""What several commands take alike: the default model, --model, --adapter and --verbose, and
the files a command is given."""

import os
from typing import Optional

import typer

DEFAULT_MODEL = "zai-org/GLM-4.1V-9B-Thinking"


VERBOSE = typer.Option(False, "--verbose", "-v", help="Show full tracebacks on errors.")


MODEL = typer.Option(
    None,
    "--model",
    "-m",
    help=f"Hub repo id or local directory (default: $MLX_GLM4V_MODEL, else {DEFAULT_MODEL}).",
)


ADAPTER = typer.Option(
    None,
    "--adapter",
    help="A LoRA/DoRA adapter directory to apply: ours (adapters.safetensors) or PEFT's.",
)


NO_DISTRIBUTED_ADAPTER = (
    "--adapter is not supported under mlx.launch; fuse it into a checkpoint with "
    "`mlx-glm4v convert --adapter DIR` and serve that."
)


def resolve_model_name(model: Optional[str]) -> str:
    return model or os.environ.get("MLX_GLM4V_MODEL") or DEFAULT_MODEL


def existing_files(paths, kind: str) -> list:
    """The files named, `~` expanded and quotes or backslash escapes undone as a terminal pastes
    them."""
    from ..serving.distributed import is_follower
    from ..terminal import existing_paths

    if is_follower():  # under mlx.launch files exist on rank 0 only; it sends their bytes
        return list(paths or [])
    return [path for p in paths or [] for path in existing_paths(p, kind)]
