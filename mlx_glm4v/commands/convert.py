"""`convert`: a checkpoint to MLX, quantized or not, an adapter fused or not."""

from typing import Optional

import typer

from .shared import VERBOSE


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

    from ..checkpoints.convert import convert as run_convert

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
