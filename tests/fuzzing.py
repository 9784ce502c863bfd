"""Fuzz every route of a running server from the OpenAPI document it publishes.

``fuzz`` loads ``/openapi.json`` with schemathesis and, for every operation, draws
``examples`` cases that follow the document (positive) and as many that break it
(negative), with a fixed Hypothesis seed, no example database and no shrinking: the same
seed sends the same requests. Every answer is checked against the document: no 5xx, a
documented status and media type, error bodies ``{"error": "..."}`` and ``Retry-After``
where documented. Failures are collected, not raised, so one run reports them all along
with the number of cases per route.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from typing import Any

import attrs
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.live_server import MODEL_NAME, Live, drained

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
REQUEST_LIMIT = 60  # seconds: a hang guard per request (the suite's generations are short)


@attrs.define
class FuzzReport:
    cases: Counter[str] = attrs.field(factory=Counter)  # per operation, e.g. "POST /completion"
    statuses: Counter[int] = attrs.field(factory=Counter)
    failures: list[str] = attrs.field(factory=list)

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def summary(self) -> str:
        lines = [
            f"{self.total} cases, {self.server_errors} server errors, statuses {dict(sorted(self.statuses.items()))}"
        ]
        lines += [f"  {n:6d}  {label}" for label, n in sorted(self.cases.items())]
        return "\n".join(lines)


def fuzz(
    url: str, *, examples: int, model: str, seed: int = 0, only: Collection[str] = ()
) -> FuzzReport:
    """Fuzz every operation the server at ``url`` documents (or those labelled in ``only``,
    e.g. ``"POST /tokenize"``); see the module docstring.

    Half the positive cases that name a model name ``model`` (the served one), so that they
    get past the model check to the runner; the others mostly get 404.
    """
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=REQUEST_LIMIT)
    report = FuzzReport()
    with requests.Session() as session:
        for result in schema.get_all_operations():
            if isinstance(result, Err):
                raise result.err()  # the document itself is broken
            operation = result.ok()
            if only and operation.label not in only:
                continue
            # A path parameter that is any string cannot break the document: no negative
            # cases for operations without a body.
            modes = MODES if operation.body else MODES[:1]
            for mode in modes:
                strategy = operation.as_strategy(generation_mode=mode)
                if mode == schemathesis.GenerationMode.POSITIVE:
                    strategy = st.tuples(strategy, st.booleans()).map(
                        lambda drawn: _naming(model, *drawn)
                    )
                _fuzz_operation(url, session, operation, strategy, examples, seed, report)
    return report


def _naming(model: str, case: schemathesis.Case, rename: bool) -> schemathesis.Case:
    if rename and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = model
    return case


def _fuzz_operation(
    url: str,
    session: requests.Session,
    operation: Any,
    strategy: st.SearchStrategy[schemathesis.Case],
    examples: int,
    seed: int,
    report: FuzzReport,
) -> None:
    @hypothesis_seed(seed)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=url, session=session, timeout=REQUEST_LIMIT)
        report.cases[operation.label] += 1
        report.statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as failure:
            report.failures.append(f"{operation.label}: {failure}")

    run()


def fuzz_and_check(live: Live, *, examples: int, seed: int = 0) -> FuzzReport:
    """``fuzz`` the live server, then check the report and the server (``AssertionError``):
    every documented operation fuzzed, no failure, some cases admitted, and afterwards a
    healthy, idle server."""
    report = fuzz(live.url, examples=examples, model=MODEL_NAME, seed=seed)
    assert report.failures == [], "\n\n".join(report.failures[:5])
    assert report.server_errors == 0
    doc = requests.get(f"{live.url}/openapi.json", timeout=REQUEST_LIMIT).json()
    documented = {f"{m.upper()} {path}" for path, item in doc["paths"].items() for m in item}
    # schemathesis leaves out the document's own route (it read it to begin with).
    assert set(report.cases) == documented - {"GET /openapi.json"}
    assert report.statuses[200] > 0  # some cases got past validation to the runner
    health = requests.get(f"{live.url}/health", timeout=REQUEST_LIMIT)
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert drained(live.statistics)
    return report
