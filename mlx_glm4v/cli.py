"""The `mlx-glm4v` command: thin typer commands that parse options and print.

Problems a user can cause end as one line on stderr and a non-zero exit; `--verbose` shows
the traceback instead.
"""

import functools
import sys
from typing import List, Optional

import typer

from .errors import Glm4vError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="GLM-4.1V on Apple silicon with MLX: image and video chat, conversion and quantization.",
)

VERBOSE = typer.Option(False, "--verbose", "-v", help="Show full tracebacks on errors.")


def friendly_errors(command):
    """Turn user errors into one line on stderr (exit 1) unless --verbose asks for the traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            raise typer.Exit(130)
        except (Glm4vError, FileNotFoundError, ValueError) as e:
            if kwargs.get("verbose"):
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1)

    return wrapper


@app.command()
@friendly_errors
def convert(
    hf_path: str = typer.Option(..., "--hf-path", help="Hub repo id or local directory of the source checkpoint."),
    mlx_path: str = typer.Option("mlx_model", "--mlx-path", help="Where to write the MLX checkpoint."),
    quantize: bool = typer.Option(False, "-q", "--quantize", help="Quantize the weights."),
    q_bits: int = typer.Option(4, "--q-bits", help="Bits per weight: 2, 3, 4, 5, 6 or 8."),
    q_group_size: int = typer.Option(64, "--q-group-size", help="Group size: 32, 64 or 128."),
    q_mode: str = typer.Option("affine", "--q-mode", help="affine, mxfp4, nvfp4 or mxfp8."),
    quant_recipe: Optional[str] = typer.Option(None, "--quant-recipe", help="Mixed-precision recipe, e.g. mixed_3_6 or mixed_4_8."),
    quantize_vision: bool = typer.Option(False, "--quantize-vision", help="Quantize the vision tower too."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bfloat16, float16 or float32 (default: the checkpoint's)."),
    dequantize: bool = typer.Option(False, "--dequantize", help="Turn a quantized checkpoint back into floats."),
    upload_repo: Optional[str] = typer.Option(None, "--upload-repo", help="Hub repo to upload the result to."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --mlx-path."),
    verbose: bool = VERBOSE,
):
    """Convert a GLM-V checkpoint to MLX, optionally quantized."""
    from .convert import convert as run_convert

    run_convert(
        hf_path, mlx_path, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size, q_mode=q_mode,
        quant_recipe=quant_recipe, quantize_vision=quantize_vision, dtype=dtype, dequantize=dequantize,
        upload_repo=upload_repo, force=force,
    )


def main():
    app()


if __name__ == "__main__":
    main()
