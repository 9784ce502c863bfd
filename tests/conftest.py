"""Shared test set-up. ``runtime`` is imported first so its BLAS preload precedes MLX."""

from __future__ import annotations

import runtime  # noqa: F401  (side effect: optimized BLAS before mlx.core)
