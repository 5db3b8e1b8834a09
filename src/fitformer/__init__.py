"""fitformer: fit a pretrained Transformer to the hardware it must run on."""

from .export import load

__version__ = "0.1.0"
__all__ = ["__version__", "load"]
