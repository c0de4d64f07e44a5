"""`finetune`: LoRA, DoRA or full fine-tuning, its progress on one line."""

from typing import Optional

import typer

from .shared import MODEL, VERBOSE, resolve_model_name


def finetune(
    model: Optional[str] = MODEL,
    data: str = typer.Option(
        ...,
        "--data",
        help="A directory with train.jsonl (and valid.jsonl), a Hugging Face dataset directory "
        "(messages and images columns), or one JSONL file of conversations.",
    ),
    adapter_path: str = typer.Option(
        "adapters", "--adapter-path", help="Where to write the adapter and its checkpoints."
    ),
    fine_tune_type: str = typer.Option("lora", "--fine-tune-type", help="lora, dora or full."),
    num_layers: Optional[int] = typer.Option(
        None, "--num-layers", help="Adapt the last N decoder layers only (default: all)."
    ),
    lora_rank: int = typer.Option(8, "--lora-rank", help="The LoRA rank."),
    lora_alpha: float = typer.Option(
        16.0, "--lora-alpha", help="The LoRA alpha (scale = alpha / rank, as in PEFT)."
    ),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout", help="Dropout before LoRA's A."),
    lora_keys: Optional[str] = typer.Option(
        None,
        "--lora-keys",
        help="Comma-separated decoder projections to adapt (default: all of them).",
    ),
    train_vision: bool = typer.Option(
        False, "--train-vision", help="Adapt the vision tower and merger too."
    ),
    train_on_prompt: bool = typer.Option(
        False, "--train-on-prompt", help="Learn every token, not only the assistant's turns."
    ),
    iters: int = typer.Option(1000, "--iters", help="Optimizer steps to train for."),
    batch_size: int = typer.Option(4, "--batch-size", help="Conversations per micro-batch."),
    grad_accumulation_steps: int = typer.Option(
        1, "--grad-accumulation-steps", help="Micro-batches per optimizer step."
    ),
    learning_rate: float = typer.Option(1e-5, "--learning-rate", help="The peak learning rate."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw, adam or sgd."),
    lr_schedule: str = typer.Option(
        "constant", "--lr-schedule", help="constant, or cosine / linear decay to 0 at --iters."
    ),
    warmup: int = typer.Option(0, "--warmup", help="Steps of linear warm-up from 0."),
    grad_checkpoint: bool = typer.Option(
        False, "--grad-checkpoint", help="Recompute activations in the backward pass: less memory."
    ),
    steps_per_report: int = typer.Option(10, "--steps-per-report", help="Steps between reports."),
    steps_per_eval: int = typer.Option(
        200, "--steps-per-eval", help="Steps between validation losses."
    ),
    val_batches: int = typer.Option(
        25, "--val-batches", help="Validation batches per evaluation; -1 for all."
    ),
    save_every: int = typer.Option(100, "--save-every", help="Steps between checkpoints."),
    resume_adapter_file: Optional[str] = typer.Option(
        None,
        "--resume-adapter-file",
        help="Continue from this adapters.safetensors (and its optimizer state, when beside it).",
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seeds LoRA's initial factors, data order, dropout."
    ),
    max_memory: Optional[float] = typer.Option(
        None,
        "--max-memory",
        help="GB a step may take; records that would need more are refused before training "
        "(default: the device's memory).",
    ),
    verbose: bool = VERBOSE,
):
    """Fine-tune with LoRA, DoRA or fully on conversations (QLoRA on a quantized checkpoint)."""
    from ..terminal import StatusLine
    from ..tuning.adapters import TEXT_TARGETS, LoraSettings
    from ..tuning.finetune import finetune as run_finetune
    from ..tuning.trainer import Interrupted, TrainingArgs

    keys = tuple(k.strip() for k in lora_keys.split(",")) if lora_keys else TEXT_TARGETS
    settings = LoraSettings(
        rank=lora_rank,
        alpha=lora_alpha,
        dropout=lora_dropout,
        targets=keys,
        vision=train_vision,
        fine_tune_type=fine_tune_type,
        num_layers=num_layers,
    )
    args = TrainingArgs(
        iters=iters,
        batch_size=batch_size,
        learning_rate=learning_rate,
        optimizer=optimizer,
        lr_schedule=lr_schedule,
        warmup=warmup,
        grad_accumulation_steps=grad_accumulation_steps,
        grad_checkpoint=grad_checkpoint,
        steps_per_report=steps_per_report,
        steps_per_eval=steps_per_eval,
        val_batches=val_batches,
        save_every=save_every,
        seed=seed,
        max_memory=None if max_memory is None else int(max_memory * 1e9),
    )
    status = StatusLine()

    def checking(n: int, total: int):
        status.show(f"checking the data: {n:,}/{total:,} conversations")

    def report(r):
        line = (
            f"step {r.step}/{iters}: loss {r.loss:.4f}, lr {r.learning_rate:.2e}, "
            f"{r.tokens_per_second:,.0f} tokens/s, peak memory {r.peak_memory_gb:.2f} GB"
        )
        if r.step % steps_per_report == 0 or r.step == iters:
            status.clear()
            typer.echo(line)
        else:
            status.show(line)
        if r.val_loss is not None:
            status.clear()
            typer.echo(f"step {r.step}/{iters}: validation loss {r.val_loss:.4f}")

    try:
        run_finetune(
            resolve_model_name(model),
            data,
            adapter_path,
            settings,
            args,
            train_on_prompt=train_on_prompt,
            resume_adapter_file=resume_adapter_file,
            report=report,
            checking=checking,
        )
    except Interrupted as stop:
        status.clear()
        where = (
            f"step {stop.saved}'s checkpoint is in {adapter_path}"
            if stop.saved
            else ("no checkpoint was saved")
        )
        typer.echo(f"stopped after step {stop.step}; {where}.", err=True)
        raise typer.Exit(130) from None
    status.clear()
    typer.echo(f"adapter saved in {adapter_path}")
