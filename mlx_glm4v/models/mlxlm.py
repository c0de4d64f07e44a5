"""The parts of mlx-lm this package reuses, imported without mlx-lm's package start-up.

Importing any `mlx_lm.*` module first runs `mlx_lm/__init__.py`, which imports its
tokenizer and conversion tools and with them transformers: about 0.8 s on every start, and
torch too where it is installed. The caches, samplers, layers and LoRA layers below need none
of that.
So, unless mlx-lm was imported already, the package is put in place with its path only;
its submodules import on their own, and the first request for anything else from the
package (`mlx_lm.load`, say) runs the real `__init__` in place, so other code sees the
whole package as usual.
"""

import importlib.util
import sys


def _defer_package_init(name: str):
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    package = importlib.util.module_from_spec(spec)

    def __getattr__(attribute):
        del package.__getattr__
        spec.loader.exec_module(package)
        return getattr(package, attribute)

    package.__getattr__ = __getattr__
    sys.modules[name] = package


_defer_package_init("mlx_lm")
# the tuner's package start-up imports its trainer and, through it, mlx-lm's tokenizer tools
_defer_package_init("mlx_lm.tuner")

# imported only now, after the deferral above (hence E402)
from mlx_lm.models.activations import swiglu  # noqa: E402
from mlx_lm.models.base import (  # noqa: E402
    create_attention_mask,
    create_causal_mask,
    scaled_dot_product_attention,
)
from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache, KVCache, RotatingKVCache  # noqa: E402
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear  # noqa: E402
from mlx_lm.sample_utils import (  # noqa: E402
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
    make_sampler,
)
from mlx_lm.tuner.dora import DoRALinear  # noqa: E402
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear  # noqa: E402

__all__ = [
    "apply_min_p",
    "apply_top_k",
    "apply_top_p",
    "BatchKVCache",
    "BatchRotatingKVCache",
    "DoRALinear",
    "KVCache",
    "LoRALinear",
    "LoRASwitchLinear",
    "QuantizedSwitchLinear",
    "RotatingKVCache",
    "SwitchGLU",
    "SwitchLinear",
    "create_attention_mask",
    "create_causal_mask",
    "make_logits_processors",
    "make_sampler",
    "scaled_dot_product_attention",
    "swiglu",
]
