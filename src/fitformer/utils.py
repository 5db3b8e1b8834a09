"""Small helpers shared across the package: seeding and thread control."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch so that a run with the same seed repeats itself."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_threads(num_threads: int | None = None) -> int:
    """Fix PyTorch's intra-op thread count (default: ``$FITFORMER_THREADS`` or all cores); returns it."""
    if num_threads is None:
        num_threads = int(os.environ.get("FITFORMER_THREADS", "0")) or (os.cpu_count() or 1)
    torch.set_num_threads(num_threads)
    return num_threads
