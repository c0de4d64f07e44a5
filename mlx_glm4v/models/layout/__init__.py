"""PP-DocLayoutV3, the layout detector of GLM-OCR's pipeline."""

from .config import BackboneConfig, LayoutConfig
from .model import LayoutDetector, LayoutOutput

__all__ = ["BackboneConfig", "LayoutConfig", "LayoutDetector", "LayoutOutput"]
