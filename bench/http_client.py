"""Timed streaming clients over plain ``http.client``: one thread per concurrent stream.

Only the standard library, so the benchmarks run wherever the server runs (the GPU machine
has no test extras). Each stream is recorded as a ``StreamRecord``: when the request left,
when each piece of text arrived and how many tokens it carried, and the server's own token
count. ``window_rate`` turns several records into the aggregate decode rate over the
interval in which all of them were decoding.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from bench.servers import HOST


@attrs.define
class StreamRecord:
    """One streamed completion: ``events`` are (arrival time, tokens) of pieces with text.

    ``first`` is when the first piece came, with text or not (a first token that is EOS, or
    text a stop string holds back, still ends the prompt phase).
    """

    sent: float
    first: float = 0.0
    events: list[tuple[float, int]] = attrs.Factory(list)
    tokens: int = 0  # generated tokens, as the server counted them
    prompt_tokens: int = 0
    text: str = ""

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def decode_rate(self) -> float:
        """Tokens per second after the first one (the first pays for the prompt)."""
        first, last = self.events[0][0], self.events[-1][0]
        return (self.tokens - 1) / (last - first) if last > first else 0.0


def _post(port: int, path: str, body: dict[str, Any], timeout: float) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"POST {path}: {response.status} {response.read()[:500]!r}")
    return response


def stream_openai(port: int, body: dict[str, Any], timeout: float = 600) -> StreamRecord:
    """``POST /v1/completions`` with ``stream`` and usage; SSE ``data:`` events timed."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    record = StreamRecord(sent=time.perf_counter())
    response = _post(port, "/v1/completions", body, timeout)
    with response:
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, and mlx-lm's ": keepalive" comments
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            now = time.perf_counter()
            if event.get("choices") and not record.first:
                record.first = now
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    record.events.append((now, 1))
                    record.text += choice["text"]
            usage = event.get("usage")
            if usage:
                record.tokens = int(usage["completion_tokens"])
                record.prompt_tokens = int(usage["prompt_tokens"])
    if not record.tokens:
        record.tokens = sum(n for _, n in record.events)
    return record


def stream_native(port: int, body: dict[str, Any], timeout: float = 600) -> StreamRecord:
    """``POST /completion`` (NDJSON); each line lists the tokens it carries."""
    record = StreamRecord(sent=time.perf_counter())
    response = _post(port, "/completion", {**body, "stream": True}, timeout)
    with response:
        for raw in response:
            if not raw.strip():
                continue
            event = json.loads(raw)
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            if not record.first:
                record.first = time.perf_counter()
            tokens = len(event.get("tokens") or [])
            if tokens:
                record.events.append((time.perf_counter(), tokens))
                record.text += event.get("content") or ""
            if event.get("done"):
                record.tokens = int(event.get("eval_count") or 0)
                record.prompt_tokens = int(event.get("prompt_eval_count") or 0)
    if not record.tokens:
        record.tokens = sum(n for _, n in record.events)
    return record


def run_concurrently(
    stream: Callable[[int, dict[str, Any]], StreamRecord],
    port: int,
    bodies: Sequence[dict[str, Any]],
) -> list[StreamRecord]:
    """Send every body at once, one thread each; the records in the order of ``bodies``."""
    results: list[StreamRecord | BaseException | None] = [None] * len(bodies)

    def one(i: int) -> None:
        try:
            results[i] = stream(port, bodies[i])
        except BaseException as exc:  # re-raised in the caller's thread below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records: list[StreamRecord] = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        assert result is not None
        records.append(result)
    return records


def window_rate(records: Sequence[StreamRecord]) -> float:
    """Aggregate decode tok/s while every stream was decoding.

    The window opens when the last stream got its first token and closes when the first stream
    ended, so prefill and stragglers stay out; each stream's pieces in the window count with
    its own tokens-per-piece ratio (a piece can carry several tokens, or none of the text).
    """
    start = max(r.events[0][0] for r in records)
    end = min(r.events[-1][0] for r in records)
    if end <= start:
        return 0.0
    total = 0.0
    for r in records:
        per_piece = r.tokens / max(1, sum(n for _, n in r.events))
        total += per_piece * sum(n for t, n in r.events if start < t <= end)
    return total / (end - start)
