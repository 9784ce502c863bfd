"""The real load function for the loader actor: model source -> ``ModelEngine`` + client info."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from actors.config import Loaded, LoadFn, RunnerConfig
from actors.messages import ModelInfo
from runtime.store.profile import ModelProfile

if TYPE_CHECKING:
    from runtime.models.loader import LoadedModel

# Of the progress /health reports while loading: reading weights, then warming up kernels.
LOAD_SHARE = 0.9


def model_loader(config: RunnerConfig) -> LoadFn:
    """A ``LoadFn`` for ``config.model`` (store name, folder or GGUF); runs on the engine thread."""

    def load(progress: Callable[[float], None]) -> Loaded:
        from runtime.engine.lifecycle import warm_up
        from runtime.engine.model_engine import ModelEngine
        from runtime.models.loader import load_model
        from runtime.store.layout import Store

        loaded = load_model(
            config.model,
            store=Store.at(config.models_dir),
            execution=config.execution,  # type: ignore[arg-type]
            progress=lambda p: progress(LOAD_SHARE * p.fraction),
        )
        engine = ModelEngine(
            loaded, prefill_chunk=config.prefill_chunk, context_length=config.context_length
        )
        # Every kind of step runs once now, so no request pays for kernel compilation.
        warm_up(engine, lambda f: progress(LOAD_SHARE + (1 - LOAD_SHARE) * f))
        info = ModelInfo(
            name=config.model,
            model_type=loaded.model_type,
            context_length=engine.context_length,
            parameters=loaded.parameters,
            quantization=loaded.quantization,
            chat_template=loaded.tokenizer.chat_template,
            size_bytes=loaded.size_bytes,
            digest=loaded.digest,
            modified_at=loaded.modified_at,
            family=loaded.model_type,
            embedding_length=int(loaded.model.args.hidden_size),
            profile=_with_generation_defaults(loaded),
        )
        return Loaded(engine=engine, tokenizer=loaded.tokenizer, info=info)

    return load


def _with_generation_defaults(loaded: LoadedModel) -> ModelProfile:
    """The model's profile, its parameters over ``generation_config.json``'s sampling values.

    A checkpoint's authors publish the sampling they tested with (Qwen3: temperature 0.6,
    top_p 0.95, top_k 20), and vLLM applies them by default; here they sit under a stored
    model's own parameters, and a request's options still override both.
    """
    profile = loaded.profile
    if not loaded.sampling_defaults:
        return profile
    return attrs.evolve(profile, parameters={**loaded.sampling_defaults, **profile.parameters})
