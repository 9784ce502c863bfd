"""A registry speaking Ollama's manifest and blob protocol on 127.0.0.1, for pull tests.

It runs in a thread (``http.server``), serves what the test put in it, follows the protocol
the way registry.ollama.ai does (a blob request is redirected to a "CDN" path, ``Range``
answered with 206), and records every request. Faults are set per blob: ``cut`` closes the
connection after that many bytes for the next N requests, ``corrupt`` serves other bytes,
``gates`` stalls after that many bytes until the test opens the gate, ``fail`` answers 503.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import attrs

from runtime.store.manifest import (
    CONFIG_MEDIA_TYPE,
    GGUF_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
)


@attrs.define
class Cut:
    after: int  # bytes sent before the connection is closed
    times: int  # how many requests are cut


@attrs.define
class Gate:
    after: int  # bytes sent before the server waits
    open: threading.Event = attrs.field(factory=threading.Event)


@attrs.define
class Registry:
    manifests: dict[str, tuple[bytes, str]] = attrs.field(factory=dict)  # path -> body, type
    blobs: dict[str, bytes] = attrs.field(factory=dict)
    cut: dict[str, Cut] = attrs.field(factory=dict)
    corrupt: set[str] = attrs.field(factory=set)
    gates: dict[str, Gate] = attrs.field(factory=dict)  # a blob stalls until the gate opens
    fail: dict[str, int] = attrs.field(factory=dict)  # blob -> requests answered 503 first
    ignore_range: bool = False  # answer every blob request with the whole blob (200)
    requests: list[tuple[str, str | None]] = attrs.field(factory=list)  # (path, Range)
    url: str = ""

    def add_blob(self, data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    def add_model(self, name: str, tag: str, gguf: bytes, *, namespace: str = "library") -> bytes:
        """An Ollama-style model: a config blob, the GGUF layer, a template and a params layer;
        returns the manifest's bytes."""
        config = {"model_format": "gguf", "model_family": "llama", "file_type": "Q4_0"}
        layers = [
            {"mediaType": GGUF_MEDIA_TYPE, **self.add_blob(gguf)},
            {
                "mediaType": "application/vnd.ollama.image.template",
                **self.add_blob(b"{{ .Prompt }}"),
            },
            {"mediaType": "application/vnd.ollama.image.params", **self.add_blob(b'{"stop":[]}')},
        ]
        body = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {
                "mediaType": CONFIG_MEDIA_TYPE,
                **self.add_blob(json.dumps(config).encode()),
            },
            "layers": layers,
        }
        raw = json.dumps(body).encode()
        self.set_manifest(name, tag, raw, namespace=namespace)
        return raw

    def set_manifest(
        self,
        name: str,
        tag: str,
        raw: bytes,
        *,
        namespace: str = "library",
        content_type: str = MANIFEST_MEDIA_TYPE,
    ) -> None:
        self.manifests[f"/v2/{namespace}/{name}/manifests/{tag}"] = (raw, content_type)

    def blob_requests(self, digest: str) -> list[str | None]:
        return [rng for path, rng in self.requests if path == f"/cdn/{digest}"]


def _handler(registry: Registry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _not_found(self, code: str) -> None:
            body = {"errors": [{"code": code, "message": f"{code.lower()} not found"}]}
            self._send(404, json.dumps(body).encode())

        def do_GET(self) -> None:
            path = self.path
            registry.requests.append((path, self.headers.get("Range")))
            if path in registry.manifests:
                raw, kind = registry.manifests[path]
                self._send(200, raw, kind)
            elif "/blobs/" in path:
                digest = path.rsplit("/", 1)[1]
                if digest not in registry.blobs:
                    self._not_found("BLOB_UNKNOWN")
                    return
                self.send_response(307)  # as registry.ollama.ai: the bytes come from a CDN
                self.send_header("Location", f"{registry.url}/cdn/{digest}")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif path.startswith("/cdn/"):
                self._blob(path.removeprefix("/cdn/"))
            else:
                self._not_found("MANIFEST_UNKNOWN")

        def _blob(self, digest: str) -> None:
            if registry.fail.get(digest, 0) > 0:
                registry.fail[digest] -= 1
                self._send(503, b'{"errors":[{"code":"UNAVAILABLE","message":"try later"}]}')
                return
            data = registry.blobs[digest]
            if digest in registry.corrupt:
                data = bytes(b ^ 0xFF for b in data[:8]) + data[8:]
            start = 0
            rng = None if registry.ignore_range else self.headers.get("Range")
            if rng:
                start = int(rng.removeprefix("bytes=").split("-")[0])
            part = data[start:]
            self.send_response(206 if rng else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(part)))
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            cut = registry.cut.get(digest)
            if cut is not None and cut.times > 0:
                cut.times -= 1
                self.wfile.write(part[: cut.after])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)  # the client sees the connection end early
                return
            gate = registry.gates.get(digest)
            if gate is not None:
                self.wfile.write(part[: gate.after])
                self.wfile.flush()
                gate.open.wait(timeout=30)
                part = part[gate.after :]
            self.wfile.write(part)

    return Handler


@contextmanager
def serve_registry() -> Iterator[Registry]:
    """A ``Registry`` served on 127.0.0.1 for the ``with`` block; its base URL in ``.url``."""
    registry = Registry()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(registry))
    server.daemon_threads = True
    registry.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield registry
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def tiny_gguf(path: Path) -> bytes:
    """A tiny llama GGUF model (random weights, a trained GPT-2 tokenizer): its bytes."""
    import numpy as np

    from runtime.testing.models import random_weights, tiny_config
    from tests import gguf_writer as gw

    meta = gw.gpt2_tokenizer_metadata()
    config = tiny_config("llama", vocab_size=len(meta["tokenizer.ggml.tokens"]))
    weights = {k: np.array(v) for k, v in random_weights(config).items()}
    gw.write_model_gguf(path, config, weights, meta)
    return path.read_bytes()
