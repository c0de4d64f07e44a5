"""The layout detector (PP-DocLayoutV3) from a checkpoint directory or hub id: transformers'
`config.json`, `preprocessor_config.json` and safetensors (as `save_pretrained` writes them and
as `PaddlePaddle/PP-DocLayoutV3_safetensors` publishes them)."""

import json
from pathlib import Path

import mlx.core as mx

from ..errors import Glm4vError
from ..models.layout import LayoutConfig, LayoutDetector
from .loader import check_weights, read_config, read_weights, resolve

LAYOUT_MODEL = "PaddlePaddle/PP-DocLayoutV3_safetensors"


def input_size(path: Path) -> tuple:
    """The (height, width) pages are stretched to: the processor's `size`, 800x800 without one."""
    file = path / "preprocessor_config.json"
    if not file.exists():
        return (800, 800)
    try:
        size = json.loads(file.read_text()).get("size") or {}
    except (OSError, json.JSONDecodeError) as e:
        raise Glm4vError(f"{file} could not be read: {e}.") from None
    return (int(size.get("height", 800)), int(size.get("width", 800)))


def load_layout_model(path_or_repo: str = LAYOUT_MODEL) -> tuple:
    """-> (the detector with its weights, the input size (height, width), its labels)."""
    path = resolve(path_or_repo)
    config = read_config(path)
    if config.get("model_type") != "pp_doclayout_v3":
        raise Glm4vError(
            f"{path / 'config.json'} is a {config.get('model_type')!r} model, not a "
            "PP-DocLayoutV3 layout detector (model_type 'pp_doclayout_v3')."
        )
    model = LayoutDetector(LayoutConfig.from_dict(config))
    weights = model.sanitize({k: v.astype(mx.float32) for k, v in read_weights(path).items()})
    check_weights(model, weights, path)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model, input_size(path), model.config.id2label
