"""Find a checkpoint (local directory or hub repo), read its weights and build model + processor.

Which names and layouts are understood is the model's business (`Model.sanitize`); this
module finds files, reads safetensors, applies the stored quantization and checks that every
tensor is there with its shape.
"""

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import Glm4vError
from ..models.config import ModelConfig
from ..models.model import Model, checkpoint_name
from .adapters import load_adapter

# The files a run needs; weights in other formats (.bin, .pth) are never fetched.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*"]


def resolve(path_or_repo: str, revision: Optional[str] = None) -> Path:
    """A local checkpoint directory, downloading it from the hub if `path_or_repo` is a repo id."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise Glm4vError(f"{path} is a file; give the checkpoint's directory.")
        if not (path / "config.json").exists():
            raise Glm4vError(f"{path} has no config.json, so it is not a model checkpoint.")
        return path
    if path_or_repo.count("/") != 1 or path_or_repo.startswith((".", "/", "~")):
        raise Glm4vError(
            f"{path_or_repo} is neither an existing directory nor a hub repo id (owner/name)."
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path_or_repo, revision=revision, allow_patterns=HUB_PATTERNS))
    except (OSError, ValueError) as e:
        raise DownloadError(download_problem(path_or_repo, revision, e)) from e


class DownloadError(Glm4vError):
    """A checkpoint could not be fetched from the hub; the message says why (the cause is
    chained)."""


LOGIN = "log in with `hf auth login` (or set HF_TOKEN)"


def download_problem(repo: str, revision: Optional[str], e: Exception) -> str:
    """One sentence on why `snapshot_download` failed, from huggingface_hub's exception (or the
    OSError under it)."""
    import errno

    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cause = e.__cause__ or e.__context__
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    refused = response is not None and "Invalid credentials" in response.headers.get(
        "X-Error-Message", ""
    )
    if any(isinstance(x, OSError) and x.errno == errno.ENOSPC for x in (e, cause)):
        return (
            f"{repo} could not be downloaded: the disk is full ({constants.HF_HUB_CACHE}); free "
            "some space or point HF_HOME at a larger disk."
        )
    if isinstance(cause, OfflineModeIsEnabled) or (
        constants.HF_HUB_OFFLINE and not isinstance(e, HfHubHTTPError)
    ):
        return (
            f"{repo} is not in the local Hugging Face cache and offline mode is set "
            "(HF_HUB_OFFLINE); unset it to download."
        )
    if isinstance(e, GatedRepoError):
        return (
            f"{repo} is gated: accept its conditions on https://huggingface.co/{repo} and {LOGIN}."
        )
    if isinstance(e, RevisionNotFoundError):
        return f"{repo} has no revision {revision!r} on the Hugging Face hub."
    if status == 401 and refused:
        return f"the Hugging Face hub refused the token sent for {repo}; {LOGIN} again."
    # the hub answers 401 for private repos too
    if isinstance(e, RepositoryNotFoundError) or status == 401:
        return (
            f"{repo} was not found on the Hugging Face hub; if it is private or gated, {LOGIN} "
            "with an account that may read it."
        )
    if isinstance(e, HfHubHTTPError):
        return f"{repo} could not be downloaded: the Hugging Face hub answered HTTP {status}."
    if isinstance(e, ValueError):
        return (
            f"{repo} is not a valid hub repo id: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        )
    if isinstance(cause, HfHubHTTPError):
        status = getattr(cause.response, "status_code", None)
        return (
            f"{repo} could not be downloaded: the Hugging Face hub answered HTTP {status}; "
            "try again later."
        )
    if cause is not None and any(
        word in type(cause).__name__ for word in ("Connect", "Timeout", "Proxy")
    ):
        return (
            f"{repo} could not be downloaded: the Hugging Face hub cannot be reached "
            f"({type(cause).__name__}); check the network."
        )
    return f"{repo} could not be downloaded ({type(e).__name__})."


def read_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise Glm4vError(f"{path / 'config.json'} could not be read: {e}.") from None
    generation = path / "generation_config.json"
    if generation.exists() and "eos_token_id" not in config:
        eos = json.loads(generation.read_text()).get("eos_token_id")
        if eos is not None:
            config["eos_token_id"] = eos
    return config


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors shards: those its index names, or every one in the directory."""
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise Glm4vError(f"{path} lacks the weight shard {missing[0]} named in its index.")
        files = [path / s for s in shards]
    if not files:
        raise Glm4vError(f"{path} has no .safetensors weights.")
    return files


def read_shard(file: Path) -> dict:
    """One safetensors file as lazy arrays: the data is read when an array is evaluated."""
    try:
        return mx.load(str(file))
    except Exception as e:
        raise Glm4vError(f"{file} could not be read as safetensors: {e}.") from None


def read_weights(path: Path) -> dict:
    weights = {}
    for f in weight_files(path):
        weights.update(read_shard(f))
    return weights


def check_shapes(expected: dict, found: dict, path: Path):
    """Every expected tensor found with its shape, nothing more: both map names to shapes."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        raise Glm4vError(f"{path} is missing {len(missing)} tensor(s), first {missing[0]!r}.")
    if extra:
        raise Glm4vError(
            f"{path} has {len(extra)} tensor(s) this model does not use, first {extra[0]!r}."
        )
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise Glm4vError(
                f"{path}: tensor {key!r} has shape {list(found[key])}, expected {list(shape)}."
            )


def check_weights(model: nn.Module, weights: dict, path: Path):
    check_shapes(
        {k: v.shape for k, v in tree_flatten(model.parameters())},
        {k: v.shape for k, v in weights.items()},
        path,
    )


def stored_quantization(config: dict, path: Path) -> Optional[dict]:
    """The checkpoint's MLX quantization settings (mlx-lm's `quantization` entry), or None for
    floats.

    Other tools' formats (`quantization_config` with a `quant_method`: fp8, AWQ, GPTQ) are
    refused.
    """
    if config.get("quantization"):
        return config["quantization"]
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method:
        raise Glm4vError(
            f"{path} is quantized with {method!r}, which mlx-glm4v cannot read; "
            "use its float checkpoint."
        )
    return None


QUANT_KEYS = ("group_size", "bits", "mode")


def layer_quantization(quantization: dict) -> dict:
    """Per-layer entries of a `quantization` config under our module paths (mlx-vlm names them
    its way)."""
    return {
        checkpoint_name(k + ".")[:-1]: v
        for k, v in quantization.items()
        if isinstance(v, (dict, bool))
    }


def stored_as(settings: dict, module: nn.Module, weight: mx.array, scales: mx.array) -> bool:
    """Whether a layer's stored tensors have the shapes `settings` would give its weight."""
    if not {"bits", "group_size"} <= settings.keys():
        return False
    inputs = module.weight.shape[-1]
    return (
        weight.shape[-1] * 32 == inputs * settings["bits"]
        and scales.shape[-1] * settings["group_size"] == inputs
    )


def quantize_like(model: nn.Module, quantization: dict, weights: dict):
    """Turn the layers the checkpoint stores quantized into quantized layers.

    A layer is quantized when its `.scales` are stored; its settings are its per-layer entry
    over the global ones (mlx-lm's convention; mlx-vlm leaves out `mode`), or, without an
    entry, read off the stored shapes as mlx-lm does.
    """
    defaults = {k: quantization[k] for k in QUANT_KEYS if k in quantization}
    layers = layer_quantization(quantization)

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        entry = layers.get(path)
        if isinstance(entry, dict):
            return {**defaults, **{k: v for k, v in entry.items() if k in QUANT_KEYS}}
        if stored_as(defaults, module, weights[f"{path}.weight"], weights[f"{path}.scales"]):
            return defaults
        # imports transformers: only for odd checkpoints
        from mlx_lm.utils import infer_quant_config

        try:
            return infer_quant_config(path, module, weights)
        except ValueError as e:
            raise Glm4vError(
                f"the quantized layer {path!r} has settings mlx-glm4v cannot tell: {e}"
            ) from None

    nn.quantize(model, **defaults, class_predicate=predicate)


def cast(name: str, value: mx.array, dtype: Optional[mx.Dtype], keep) -> mx.array:
    """A float tensor in `dtype` (None: as it is), or in float32 where `keep(name)` refuses the
    cast: transformers keeps those (the routers) in float32 whatever the model's dtype."""
    if not mx.issubdtype(value.dtype, mx.floating):
        return value
    target = dtype if keep(name) else mx.float32
    return value if target is None or value.dtype == target else value.astype(target)


def load_model(path, dtype: Optional[mx.Dtype] = None, lazy: bool = False) -> Model:
    """The model of a local checkpoint directory; `lazy` leaves each weight on disk until first
    used, so a one-shot run holds the text weights only after the vision tower is done."""
    path = Path(path)
    raw = read_config(path)
    config = ModelConfig.from_dict(raw)
    model = Model(config)
    weights = read_weights(path)
    weights = model.sanitize(weights)
    quantization = stored_quantization(raw, path)
    if quantization or any(k.endswith(".scales") for k in weights):
        quantize_like(model, quantization or {}, weights)
    check_weights(model, weights, path)
    if dtype is not None:
        keep = model.cast_predicate
        weights = {k: cast(k, v, dtype, keep) for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model


def load(
    path_or_repo: str,
    dtype: Optional[mx.Dtype] = None,
    revision: Optional[str] = None,
    lazy: bool = False,
    adapter_path: Optional[str] = None,
):
    """(model, processor) from a local checkpoint directory or a hub repo id (`lazy`: see
    `load_model`); with `adapter_path`, an adapter directory (ours or PEFT's) put into the
    model (adapters.py)."""
    from ..inputs.processor import Processor

    path = resolve(path_or_repo, revision)
    model = load_model(path, dtype, lazy)
    if adapter_path is not None:
        load_adapter(model, adapter_path)
    return model, Processor.from_pretrained(path)
