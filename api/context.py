"""What every route needs: the runner client, the HTTP configuration, metrics and drain state."""

from __future__ import annotations

import contextlib

import attrs

from actors.messages import ModelInfo, RunnerClient, UnavailableError
from api.errors import not_found
from api.guard import GuardPolicy
from api.metrics import Metrics


@attrs.frozen(kw_only=True)
class ApiConfig:
    model_name: str = ""  # the name clients use; empty: whatever ModelInfo.name says
    api_key: str | None = None
    guard: GuardPolicy = attrs.field(factory=GuardPolicy)  # Host and Origin rules (api/guard.py)
    max_body: int = 8 * 1024 * 1024
    version: str = "0.1.0"
    # /api/pull writes into this store (None: the default one); off unless allowed, so an
    # app built for a test never downloads (``mlxrunner serve`` allows it).
    models_dir: str | None = None
    allow_pull: bool = False
    # /api/create, /api/copy and /api/delete change that store: off unless allowed, like pull.
    manage_models: bool = False


@attrs.define(kw_only=True)
class ApiContext:
    client: RunnerClient
    config: ApiConfig
    metrics: Metrics
    # Set when the server stops (after the tree drained): new generations get 503, open ones
    # finish within hypercorn's graceful timeout.
    draining: bool = False

    def check_admitting(self) -> None:
        if self.draining:
            raise UnavailableError("server is shutting down", state="shutting_down")

    def served_name(self) -> str:
        if self.config.model_name:
            return self.config.model_name
        return self.client.model_info().name

    def serves(self, name: str) -> bool:
        """Whether ``name`` names the served model (by the name clients use or its own)."""
        names = {_canonical(self.served_name())}
        with contextlib.suppress(UnavailableError):
            names.add(_canonical(self.client.model_info().name))
        return _canonical(name) in names

    def resolve_model(self, requested: str | None) -> str:
        """The served model's name if ``requested`` names it (or is empty); 404 otherwise."""
        served = self.served_name()
        if not requested:
            return served
        if not self.serves(requested):
            # It may be in the store (``/api/tags`` lists it): this server serves one model.
            raise not_found(f"model '{requested}' not found; this server serves '{served}'")
        return requested

    def model_info(self) -> ModelInfo:
        return self.client.model_info()


def _canonical(name: str) -> str:
    name = name.strip()
    if "/" not in name and ":" not in name:
        return f"{name}:latest"
    return name
