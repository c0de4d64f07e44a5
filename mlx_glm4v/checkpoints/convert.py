"""Convert a GLM-V checkpoint to MLX: another float dtype, quantized, or dequantized.

    from mlx_glm4v import convert
    convert("zai-org/GLM-4.1V-9B-Thinking", "glm41v-4bit", quantize=True, q_bits=4)

A float source is streamed: one source shard is read at a time, its tensors renamed and laid
out as our modules want them (`Model.sanitize`), cast, quantized one by one and written to
output shards of at most `MAX_SHARD_BYTES`. An MLX-quantized source (ours or mlx-vlm's) is
small: it is loaded whole, then written again (other dtype, our names) or dequantized.

The output is ours: tensors under our module names (`visual.*`, `language_model.*`,
`lm_head.*`), convolutions channels-last, quantization recorded in `config.json` the way
mlx-lm does (global settings plus an entry per layer that differs). Everything is written to
a hidden sibling directory that replaces `mlx_path` only once complete.
"""

import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import Glm4vError
from ..models.config import ModelConfig, MoeTextConfig
from ..models.model import Model
from ..models.moe import expert_slot
from .adapters import Adapter, apply_adapter, check_adapter, fuse, fused_weight, read_adapter
from .loader import (
    QUANT_KEYS,
    cast,
    check_shapes,
    load_model,
    read_shard,
    resolve,
    stored_quantization,
    weight_files,
)

MAX_SHARD_BYTES = 5 * 10**9
DTYPES = ("bfloat16", "float16", "float32")
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)
# mode -> (group size, bits) it fixes; affine takes any of the above (default 64, 4).
FIXED_MODES = {"mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
# Source files copied beside the weights: tokenizer, chat template, processor and generation
# configs.
COPIED = ("*.json", "*.jinja", "*.txt", "tokenizer*", "*.tiktoken")
NOT_COPIED = {"config.json", "model.safetensors.index.json"}


class TensorStream:
    """Source tensors -> tensors under our names and layouts, a shard at a time.

    The seam for a model's own rewrites while streaming. `push` takes one source shard's
    tensors (lazy arrays) and yields (name, array) pairs; a subclass may hold tensors back
    across shards and yield them later, e.g. GLM-4.5V's per-expert matrices of one layer
    stacked once the last expert has arrived, as long as everything is out by `finish`.
    Arrays are yielded unevaluated; the writer evaluates them one at a time.
    """

    def __init__(self, model: Model):
        self.model = model

    def push(self, tensors: dict) -> Iterator[tuple[str, mx.array]]:
        renamed = self.model.sanitize(tensors)
        tensors.clear()  # the writer keeps what it needs; drop the source's references
        for name in list(renamed):
            yield name, renamed.pop(name)

    def finish(self) -> Iterable[tuple[str, mx.array]]:
        return ()


class ExpertStream(TensorStream):
    """A mixture-of-experts text model (GLM-4.5V, GLM-4.6V): each expert's matrix is held back
    until the last expert of its layer's projection has arrived, shards later if need be, then
    the projection goes out stacked. Checkpoints store the layers in order, so only what a shard
    boundary cuts is ever held: part of one layer's experts. transformers 5's fused tensors
    already hold every expert and go straight through; `Model.sanitize` drops the
    multi-token-prediction layer.
    """

    def __init__(self, model: Model):
        super().__init__(model)
        self.num_experts = model.config.text_config.n_routed_experts
        # stacked name -> {source name: array} of the experts read so far
        self.held: dict[str, dict] = {}

    def push(self, tensors: dict) -> Iterator[tuple[str, mx.array]]:
        complete = {}
        for name in list(tensors):
            if slot := expert_slot(name):
                experts = self.held.setdefault(slot[0], {})
                experts[name] = tensors.pop(name)
                if len(experts) == self.num_experts:
                    complete.update(self.held.pop(slot[0]))
        tensors.update(complete)
        yield from super().push(tensors)

    def finish(self) -> Iterable[tuple[str, mx.array]]:
        """An incomplete projection is named as missing experts (unless in the dropped MTP
        layer)."""
        rest = {name: value for experts in self.held.values() for name, value in experts.items()}
        self.held.clear()
        return self.model.sanitize(rest).items()


# text config class -> its stream; a text model not listed uses the plain one.
STREAMS: dict[type, type] = {MoeTextConfig: ExpertStream}


@dataclass(frozen=True)
class Quantization:
    """Which layers to quantize and how: one setting for all, more bits for sensitive layers in a
    mixed recipe."""

    group_size: int
    bits: int
    mode: str = "affine"
    # mixed recipes: bits of the embeddings, lm_head, sensitive layers
    high_bits: Optional[int] = None
    vision: bool = False
    num_layers: int = 0

    @property
    def default(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def settings(self, path: str, module: nn.Module) -> Optional[dict]:
        """`to_quantized` arguments for the layer at `path`, or None to keep it in floats."""
        if not hasattr(module, "to_quantized"):
            return None
        # In the vision tower only linear layers: the position table is resampled, not looked up.
        if path.startswith("visual.") and not (self.vision and isinstance(module, nn.Linear)):
            return None
        if module.weight.shape[-1] % self.group_size:
            return None
        if self.high_bits and self.sensitive(path):
            return {**self.default, "bits": self.high_bits}
        return self.default

    def sensitive(self, path: str) -> bool:
        """The layers a mixed recipe keeps at more bits, after llama.cpp's Q4_K_M choice: the
        vision tower, embeddings and lm_head, and v_proj/down_proj in the first and last eighth
        of the text layers and every third layer between."""
        if path.startswith("visual.") or path.endswith(("embed_tokens", "lm_head")):
            return True
        layer = re.match(r"language_model\.layers\.(\d+)\.", path)
        if not layer or not path.endswith(("v_proj", "down_proj")):
            return False
        i, n = int(layer[1]), self.num_layers
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def quantization_options(
    q_bits, q_group_size, q_mode, quant_recipe, quantize_vision
) -> Quantization:
    """Check the quantization options as a user gave them; raise a Glm4vError naming the bad one."""
    if q_mode in FIXED_MODES:
        group_size, bits = FIXED_MODES[q_mode]
        if q_bits not in (None, bits) or q_group_size not in (None, group_size):
            raise Glm4vError(
                f"--q-mode {q_mode} fixes --q-bits {bits} and --q-group-size {group_size}; "
                "leave them out."
            )
        if quant_recipe:
            raise Glm4vError(
                f"--quant-recipe mixes affine bit widths and cannot be used with --q-mode {q_mode}."
            )
        return Quantization(group_size, bits, q_mode, vision=quantize_vision)
    if q_mode != "affine":
        raise Glm4vError(f"--q-mode {q_mode!r} is not one of affine, {', '.join(FIXED_MODES)}.")
    bits = 4 if q_bits is None else q_bits
    group_size = 64 if q_group_size is None else q_group_size
    if bits not in AFFINE_BITS:
        raise Glm4vError(
            f"--q-bits {bits} is not supported; use one of {', '.join(map(str, AFFINE_BITS))}."
        )
    if group_size not in AFFINE_GROUP_SIZES:
        raise Glm4vError(
            f"--q-group-size {group_size} is not supported; use one of "
            f"{', '.join(map(str, AFFINE_GROUP_SIZES))}."
        )
    high = None
    if quant_recipe:
        match = re.fullmatch(r"mixed_(\d)_(\d)", quant_recipe)
        low, high = (int(match[1]), int(match[2])) if match else (0, 0)
        if not (low in AFFINE_BITS and high in AFFINE_BITS and low < high):
            raise Glm4vError(
                f"--quant-recipe {quant_recipe!r} is not mixed_LOW_HIGH with bits from "
                f"{', '.join(map(str, AFFINE_BITS))}, e.g. mixed_3_6 or mixed_4_8."
            )
        if q_bits not in (None, low):
            raise Glm4vError(
                f"--quant-recipe {quant_recipe} sets the bits; leave out --q-bits {q_bits}."
            )
        bits = low
    return Quantization(group_size, bits, "affine", high, quantize_vision)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000


def _save_shard(file: Path, tensors: dict):
    mx.save_safetensors(str(file), tensors, metadata={"format": "mlx"})


class ShardWriter:
    """Collects evaluated tensors and writes them in shards of at most `max_bytes`, then the
    index."""

    def __init__(self, directory: Path, progress):
        self.directory, self.progress, self.max_bytes = directory, progress, MAX_SHARD_BYTES
        self.pending, self.pending_bytes = {}, 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, value: mx.array):
        mx.eval(value)
        if self.pending and self.pending_bytes + value.nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = value
        self.pending_bytes += value.nbytes
        self.total_bytes += value.nbytes

    def _flush(self):
        self.shards.append(sorted(self.pending))
        self.progress.set_description(f"writing shard {len(self.shards)}")
        _save_shard(self.directory / f"shard-{len(self.shards)}.safetensors", self.pending)
        self.pending, self.pending_bytes = {}, 0

    def close(self, total_parameters: int):
        """Name the shards model-0000i-of-0000n (model.safetensors if one) and write the index."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards, 1):
            final = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            (self.directory / f"shard-{i}.safetensors").rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {
            "metadata": {"total_size": self.total_bytes, "total_parameters": total_parameters},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


@contextmanager
def _atomic_directory(out: Path):
    """A fresh hidden sibling of `out` to write into; it becomes `out` only if the block
    succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    # mkdtemp's 0700 is for the temporary; the output is like any directory made
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
        old = None
        if out.exists() or out.is_symlink():
            old = tmp.with_suffix(".old")
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old is not None:
                old.rename(out)
            raise
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_destination(out: Path, force: bool):
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not force:
        raise Glm4vError(f"{out} already exists and is not empty; pass --force to replace it.")


@dataclass
class _Source:
    """What a conversion reads: tensors under our names, and the layers the output stores
    quantized."""

    # for a float source a skeleton, never evaluated: its modules tell names, shapes and kinds
    model: Model
    tensors: Iterator[tuple[str, mx.array]]
    layers: dict  # module path -> its quantization settings in the output
    default: Optional[dict]  # the global quantization settings of the output
    quantize: bool  # whether `layers` are still to be quantized here (or are read quantized)


def _read_source(
    src: Path, raw: dict, source_quantization, plan, target, dequantize: bool, adapter, progress
) -> _Source:
    """A quantized source loaded whole (written again, or dequantized); a float one streamed,
    to be quantized by `plan`. An `adapter` is fused into either."""
    if source_quantization:
        return _read_quantized(src, source_quantization, target, dequantize, adapter, progress)
    return _read_floats(src, raw, plan, adapter, progress)


def _read_floats(
    src: Path, raw: dict, plan: Optional[Quantization], adapter: Optional[Adapter], progress
) -> _Source:
    model = Model(ModelConfig.from_dict(raw))
    layers, default = {}, None
    if plan:
        plan = replace(plan, num_layers=len(model.layers))
        layers = {p: s for p, m in model.named_modules() if (s := plan.settings(p, m))}
        default = plan.default
    tensors = _streamed(src, model, progress)
    if adapter is not None:
        check_adapter(model, adapter)
        tensors = _fused(tensors, adapter)
    return _Source(model, tensors, layers, default, quantize=True)


def _fused(tensors: Iterator, adapter: Adapter) -> Iterator[tuple[str, mx.array]]:
    """The stream with the adapter folded in, tensor by tensor, in each tensor's own dtype."""
    for name, value in tensors:
        low = adapter.layers.get(name.removesuffix(".weight"))
        if low is not None and name.endswith(".weight"):
            value = fused_weight(value, low)
        elif name in adapter.tensors:
            value = adapter.tensors[name].astype(value.dtype)
        yield name, value


def _streamed(src: Path, model: Model, progress) -> Iterator[tuple[str, mx.array]]:
    """A float checkpoint one shard at a time, through its text model's TensorStream; checked at
    the end."""
    stream = STREAMS.get(type(model.config.text_config), TensorStream)(model)
    files = weight_files(src)
    progress.reset(total=sum(len(read_shard(f)) for f in files))
    found = {}
    for f in files:
        progress.set_description(f"reading {f.name}")
        tensors = read_shard(f)
        count = len(tensors)
        for name, value in stream.push(tensors):
            found[name] = value.shape
            yield name, value
        progress.update(count)
    for name, value in stream.finish():
        found[name] = value.shape
        yield name, value
    check_shapes({k: v.shape for k, v in tree_flatten(model.parameters())}, found, src)


def _read_quantized(
    src: Path, quantization: dict, target, dequantize: bool, adapter, progress
) -> _Source:
    """An MLX-quantized checkpoint, small enough to load whole; an adapter fused into it
    (quantized layers dequantized, fused, quantized again); dequantized if asked."""
    model = load_model(src, target)  # scales in the target dtype: dequantizing rounds once, to it
    if adapter is not None:
        fuse(apply_adapter(model, adapter))
    if dequantize:
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
    layers = {
        path: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
        for path, m in model.named_modules()
        if hasattr(m, "scales")
    }
    default = {"mode": "affine", **{k: quantization[k] for k in QUANT_KEYS if k in quantization}}
    return _Source(model, _loaded(model, progress), layers, default, quantize=False)


def _loaded(model: Model, progress) -> Iterator[tuple[str, mx.array]]:
    params = tree_flatten(model.parameters())
    progress.reset(total=len(params))
    progress.set_description("reading")
    for name, value in params:
        yield name, value
        progress.update()


def _write_weights(directory: Path, source: _Source, dtype, progress) -> tuple[ShardWriter, int]:
    """Cast, quantize and write every tensor; returns the writer (closed) and the number of
    weights."""
    keep = source.model.cast_predicate
    writer = ShardWriter(directory, progress)
    parameters = 0
    for name, value in source.tensors:
        value = cast(name, value, dtype, keep)
        path = name[: -len(".weight")]
        outputs = [(name, value)]
        if source.quantize and name.endswith(".weight") and path in source.layers:
            s = source.layers[path]
            parts = mx.quantize(value, group_size=s["group_size"], bits=s["bits"], mode=s["mode"])
            outputs = zip((name, f"{path}.scales", f"{path}.biases"), parts)
        for out_name, out_value in outputs:
            parameters += _parameters(out_name, out_value, source.layers)
            writer.add(out_name, out_value)
    writer.close(int(parameters))
    return writer, int(parameters)


def _quantization_config(layers: dict, default: Optional[dict]) -> Optional[dict]:
    """mlx-lm's `quantization` entry: the global settings, then each layer whose settings differ;
    None when no layer is stored quantized."""
    if not layers:
        return None
    return {**default, **{path: s for path, s in sorted(layers.items()) if s != default}}


def _parameters(name: str, value: mx.array, layers: dict) -> float:
    """How many weights a stored tensor holds: packed ones count unpacked; scales and biases
    none."""
    path, _, leaf = name.rpartition(".")
    if path in layers:
        return value.size * 32 / layers[path]["bits"] if leaf == "weight" else 0
    return value.size


def _copy_side_files(src: Path, dst: Path):
    for pattern in COPIED:
        for f in src.glob(pattern):
            if f.is_file() and f.name not in NOT_COPIED and not (dst / f.name).exists():
                # new files: modes from the umask, as any the user writes
                shutil.copyfile(f, dst / f.name)


def _write_config(src: Path, dst: Path, dtype: Optional[str], quantization: Optional[dict]):
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    if quantization:
        config["quantization"] = quantization
        config["quantization_config"] = quantization  # mlx-lm writes both; the hub reads the second
    if dtype:
        for part in (config, config.get("text_config"), config.get("vision_config")):
            for key in ("torch_dtype", "dtype"):
                if isinstance(part, dict) and key in part:
                    part[key] = dtype
    (dst / "config.json").write_text(json.dumps(config, indent=2))


def _model_card(dst: Path, source: str, weights: str, model: str, upload_repo: Optional[str]):
    """A short README.md: where the weights come from, how they are stored, how to run them
    (`model`: path or repo)."""
    base = f"base_model: {source}\n" if not Path(source).exists() else ""
    (dst / "README.md").write_text(f"""---
library_name: mlx
pipeline_tag: image-text-to-text
{base}tags:
- mlx
- glm4v
---

# {Path(model).name if not upload_repo else model}

{source} converted to MLX with mlx-glm4v: {weights}.

## Use

```bash
pip install mlx-glm4v
mlx-glm4v generate --model {model} --image photo.jpg --prompt "Describe this image."
```

```python
from mlx_glm4v import load

model, processor = load("{model}")
```
""")


def _upload(path: Path, repo: str):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(path), repo_id=repo, repo_type="model")
    except (HfHubHTTPError, OSError) as e:
        raise Glm4vError(f"uploading {path} to {repo} failed: {e}.") from None
    print(f"Uploaded to https://huggingface.co/{repo}")


def _progress():
    from tqdm import tqdm

    return tqdm(total=0, unit=" tensors", file=sys.stderr, disable=None, leave=False)


def convert(
    hf_path: str,
    mlx_path: str = "mlx_model",
    *,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    q_mode: str = "affine",
    quant_recipe: Optional[str] = None,
    quantize_vision: bool = False,
    dtype: Optional[str] = None,
    dequantize: bool = False,
    upload_repo: Optional[str] = None,
    force: bool = False,
    adapter: Optional[str] = None,
) -> Path:
    """Write an MLX checkpoint of `hf_path` (hub repo id or directory) to `mlx_path`; returns its
    path. `adapter`: an adapter directory (ours or PEFT's) fused into the weights first.

    quantize: affine `q_bits` (default 4) in groups of `q_group_size` (default 64), or a
    `q_mode` with fixed settings (mxfp4, nvfp4, mxfp8). `quant_recipe` "mixed_LOW_HIGH"
    quantizes to LOW bits but keeps embeddings, lm_head and sensitive layers at HIGH (it
    implies `quantize`). The vision tower stays in floats unless `quantize_vision`. Layers
    whose input size the group size does not divide stay in floats. `dtype` (bfloat16,
    float16, float32) is the float type of what is not quantized; default: the source's.
    """
    quantize = quantize or bool(quant_recipe)
    plan = _check_options(
        quantize, q_bits, q_group_size, q_mode, quant_recipe, quantize_vision, dtype, dequantize
    )
    fusing = read_adapter(adapter) if adapter is not None else None
    out, src = _locations(hf_path, mlx_path, force)
    raw = json.loads((src / "config.json").read_text())
    source_quantization = _check_source(hf_path, src, raw, quantize, dequantize)
    target = getattr(mx, dtype) if dtype else None

    with _progress() as progress, _atomic_directory(out) as tmp:
        source = _read_source(
            src, raw, source_quantization, plan, target, dequantize, fusing, progress
        )
        writer, parameters = _write_weights(tmp, source, target, progress)
        quantization = _quantization_config(source.layers, source.default)
        _write_config(src, tmp, dtype, quantization)
        _copy_side_files(src, tmp)
        floats = dtype or raw.get("dtype") or raw.get("torch_dtype") or "float"
        weights = _describe(quantization, floats, writer.total_bytes * 8 / parameters)
        _model_card(tmp, hf_path, weights, upload_repo or str(mlx_path), upload_repo)
    _summary(hf_path, src, out, writer, weights)
    if upload_repo:
        _upload(out, upload_repo)
    return out


def _check_options(
    quantize, q_bits, q_group_size, q_mode, quant_recipe, quantize_vision, dtype, dequantize
) -> Optional[Quantization]:
    """The options checked against each other before anything is read (a mistake costs no
    download); returns the quantization plan, None when not quantizing."""
    if quantize and dequantize:
        raise Glm4vError("--quantize and --dequantize exclude each other; choose one.")
    if quantize_vision and not quantize:
        raise Glm4vError("--quantize-vision needs -q/--quantize (or a --quant-recipe).")
    if not quantize and (q_bits is not None or q_group_size is not None or q_mode != "affine"):
        raise Glm4vError("--q-bits, --q-group-size and --q-mode need -q/--quantize.")
    plan = (
        quantization_options(q_bits, q_group_size, q_mode, quant_recipe, quantize_vision)
        if quantize
        else None
    )
    if dtype is not None and dtype not in DTYPES:
        raise Glm4vError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    if dtype == "float16":
        warnings.warn(
            "GLM-4 models overflow in float16 and then answer garbage; use --dtype bfloat16.",
            stacklevel=3,  # at the line that called convert
        )
    return plan


def _locations(hf_path: str, mlx_path: str, force: bool) -> tuple[Path, Path]:
    """(output directory, source directory): the output checked before the source is
    downloaded, and never the source or a directory holding it."""
    out = Path(mlx_path).expanduser()
    _check_destination(out, force)
    src = resolve(hf_path)
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise Glm4vError(
            f"--mlx-path {out} holds the source checkpoint {src}; write somewhere else."
        )
    return out, src


def _check_source(
    hf_path: str, src: Path, raw: dict, quantize: bool, dequantize: bool
) -> Optional[dict]:
    """The source's stored quantization (None for floats), checked against what was asked: a
    quantized source is not quantized again, a float one not dequantized."""
    source_quantization = stored_quantization(raw, src)
    if source_quantization and quantize:
        raise Glm4vError(
            f"{hf_path} is already quantized; quantize its float checkpoint, "
            "or --dequantize it first."
        )
    if dequantize and not source_quantization:
        raise Glm4vError(f"{hf_path} is not quantized, so there is nothing to --dequantize.")
    return source_quantization


def _summary(hf_path: str, src: Path, out: Path, writer: ShardWriter, weights: str):
    """One line on stdout: sizes before and after, shards, how the weights are stored."""
    before = sum(f.stat().st_size for f in weight_files(src))
    print(
        f"{hf_path} -> {out}: {_size(before)} -> {_size(writer.total_bytes)} in "
        f"{len(writer.shards)} shard(s), {weights}."
    )


def _describe(quantization: Optional[dict], floats: str, bits_per_weight: float) -> str:
    how = floats
    if quantization:
        how = (
            f"{quantization['mode']} {quantization['bits']}-bit, group size "
            f"{quantization['group_size']}"
        )
        if any(isinstance(s, dict) for s in quantization.values()):
            how += ", some layers at other settings"
        how += f", the rest {floats}"
    return f"{how}, {bits_per_weight:.2f} bits per weight"
