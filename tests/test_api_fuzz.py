"""Nothing a client sends may produce a 500, and every answer is what /openapi.json says.

Every route is fuzzed from the document the server publishes (``tests/fuzzing.py``:
schemathesis, a fixed seed, no shrinking) against the real tree over a tiny real model,
served on a local port from a thread of its own. Afterwards the server is healthy and idle.
Bytes that are not JSON at all are fuzzed here too: the document cannot describe them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.app import ApiConfig, create_app
from tests.api_fakes import FakeRunner, serve_app
from tests.fuzzing import fuzz, fuzz_and_check
from tests.live_server import (
    Live,
    ServerThread,
    make_model,
    open_live_server,
)

FAST_EXAMPLES = 5  # per route and mode: ~100 cases, a few seconds
SOAK_EXAMPLES = int(os.environ.get("MLXRUNNER_SOAK_EXAMPLES", "200"))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    folder = make_model(tmp_path_factory.mktemp("fuzz") / "tiny")
    # A small context keeps every generation short.
    with ServerThread(lambda: open_live_server(folder, context_length=64)) as server:
        yield server


def test_every_route_answers_as_documented(live: Live) -> None:
    print(fuzz_and_check(live, examples=FAST_EXAMPLES).summary())


@pytest.mark.soak
def test_fuzz_soak(live: Live) -> None:
    seed = int(os.environ.get("MLXRUNNER_SOAK_SEED", "1"))
    print(fuzz_and_check(live, examples=SOAK_EXAMPLES, seed=seed).summary())


@settings(max_examples=40, deadline=None)
@given(raw=st.binary(max_size=64))
async def test_no_raw_bytes_produce_a_server_error(raw: bytes) -> None:
    app = create_app(FakeRunner(), ApiConfig(model_name="fake"))
    async with app.test_app() as test_app:
        response = await test_app.test_client().post(
            "/api/chat", data=raw, headers={"Content-Type": "application/json"}
        )
    assert response.status_code < 500


class BrokenTokenizer(FakeRunner):
    async def tokenize(self, text: str) -> list[int]:
        raise RuntimeError("a bug")


def test_the_fuzzer_reports_what_breaks_the_document() -> None:
    app = create_app(BrokenTokenizer(), ApiConfig(model_name="fake"))
    with ServerThread(lambda: serve_app(app)) as (host, port):
        report = fuzz(f"http://{host}:{port}", examples=5, model="fake", only={"POST /tokenize"})
    assert set(report.cases) == {"POST /tokenize"}
    assert report.server_errors > 0
    assert any("Server error" in failure for failure in report.failures), report.failures
