"""The `mlx-glm4v` command: the typer app, its commands (each in commands/) registered, and
problems a user can cause ended as one line on stderr and a non-zero exit; `--verbose` shows
the traceback instead.
"""

import functools

import typer

from .commands.cache_prompt import cache_prompt
from .commands.chat import chat
from .commands.convert import convert
from .commands.finetune import finetune
from .commands.generate import generate
from .commands.ocr import ocr
from .commands.serve import serve
from .errors import Glm4vError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="GLM-4.1V on Apple silicon with MLX: image and video chat, conversion and quantization.",
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


app.command()(friendly_errors(convert))
app.command()(friendly_errors(generate))
app.command("cache-prompt")(friendly_errors(cache_prompt))
app.command()(friendly_errors(chat))
app.command()(friendly_errors(finetune))
app.command()(friendly_errors(serve))
app.command()(friendly_errors(ocr))


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
