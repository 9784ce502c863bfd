"""Synchronous, Trio-free inference core: model formats, the store, architectures and loading,
tokenizer and chat templates, sampler, KV cache and the batched engine step.

Importing this package preloads an optimized BLAS before MLX is imported (see ``blas``).
"""

from runtime.blas import preload_blas

preload_blas()
