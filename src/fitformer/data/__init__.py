"""Built-in tasks, file loading, stratified splits and cached tokenisation."""

from .dataset import TextDataset
from .loading import load_table
from .splits import Splits, split_dataset
from .tasks import BUILTIN_TASKS, DEFAULT_TASK, load_task
from .tokenize import EncodedDataset, encode

__all__ = [
    "BUILTIN_TASKS",
    "DEFAULT_TASK",
    "EncodedDataset",
    "Splits",
    "TextDataset",
    "encode",
    "load_table",
    "load_task",
    "split_dataset",
]
