"""The engine: the contract the scheduler drives (``protocol``), sampling options, the batch sampler,
the KV cache and ``ModelEngine``, the batched step on a real model."""
