"""Synchronous, Trio-free inference core: models, weights, tokenizer, sampler, KV cache, steps.

Importing this package preloads an optimized BLAS before MLX is imported (see ``blas``).
"""

from runtime.blas import preload_blas

preload_blas()
