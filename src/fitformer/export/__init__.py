"""Saving, loading and deploying compressed models."""

from .model import CompressedClassifier, load, load_compressed, save_compressed

__all__ = ["CompressedClassifier", "load", "load_compressed", "save_compressed"]
