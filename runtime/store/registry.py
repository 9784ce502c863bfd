"""Ollama's registry protocol: fetch a model's manifest, download its blobs into the store.

A model ``host/namespace/name:tag`` lives at ``<base>/v2/<namespace>/<name>/manifests/<tag>``
(a Docker v2 image manifest, ``runtime.store.manifest``) and each of its blobs at
``<base>/v2/<namespace>/<name>/blobs/<digest>``, usually answered with a redirect to a CDN
(followed; the ``Range`` header goes along). ``<base>`` is ``https://<host>`` (``http://``
when pulling with ``insecure``), except that
``$MLXRUNNER_REGISTRY`` (or the ``registry`` argument: a URL such as ``http://127.0.0.1:8080``)
replaces it for the default host, which is how the tests serve a registry on localhost.

A blob downloads into ``blobs/.pull-sha256-<hex>`` (a name of its own: the store's stale-temp
sweep leaves it alone, so a download stopped yesterday resumes today). The file is locked
(``flock``) while one puller writes it; a second pull of the same blob waits (reporting the
first one's progress), then finds it done. A download that resumes asks for ``Range: bytes=<size>-``; a server that answers the
whole blob (200, or a range that starts elsewhere) starts it over. The bytes are hashed as they arrive (the part already on
disk first), and only a file whose size and sha256 match the manifest is renamed to
``blobs/sha256-<hex>``; a mismatch deletes the download, since its bytes can never become
that blob. A cut connection (or a 5xx) keeps what arrived and is retried from there a few
times.

Everything here is synchronous. ``download_blob`` is a generator: it yields the bytes done
after each chunk, so a caller can show progress and stop between chunks (closing the
generator stops the download and keeps the part for the next pull). Every socket operation
has a timeout, so no step blocks for longer than that.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Generator
from pathlib import Path
from typing import BinaryIO

from runtime.errors import ModelNotFoundError, PullError
from runtime.store.layout import Store, fsync_dir
from runtime.store.manifest import MANIFEST_MEDIA_TYPE, Layer
from runtime.store.names import DEFAULT_HOST, ModelName

ENV_REGISTRY = "MLXRUNNER_REGISTRY"
PARTIAL_PREFIX = ".pull-"
CHUNK = 1 << 20
TIMEOUT_S = 30.0  # per socket operation: a stalled server fails a step, never hangs it
LOCK_POLL_S = 0.1  # how often a pull waiting for another one's blob looks again
ATTEMPTS = 3  # a blob's download is retried from where it stopped this many times in all
_USER_AGENT = "mlxrunner/0.1 (+ollama registry protocol)"
# Kinds of manifests a registry may send that are not one model (multi-platform lists).
_LIST_KINDS = (
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
)


def registry_base(name: ModelName, registry: str | None = None, *, insecure: bool = False) -> str:
    """The URL the name's host is reached at (see the module doc); ``insecure`` reaches
    another host than the default one over plain HTTP (a registry of one's own)."""
    if name.host == DEFAULT_HOST:
        override = registry or os.environ.get(ENV_REGISTRY)
        if override:
            return override.rstrip("/")
    return f"{'http' if insecure else 'https'}://{name.host}"


def _open(url: str, *, headers: dict[str, str], timeout: float) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT, **headers})
    response: http.client.HTTPResponse = urllib.request.urlopen(request, timeout=timeout)
    return response


def _http_failure(model: str, what: str, exc: urllib.error.HTTPError) -> PullError:
    detail = ""
    with contextlib.suppress(Exception):
        body = json.loads(exc.read(4096))
        errors = body.get("errors") if isinstance(body, dict) else None
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            detail = f": {errors[0].get('message') or errors[0].get('code')}"
    if exc.code in (401, 403):
        return PullError(
            f"pulling {model}: the registry refused {what} ({exc.code}{detail}); only public "
            "models can be pulled"
        )
    return PullError(f"pulling {model}: the registry answered {exc.code} for {what}{detail}")


def _unreachable(model: str, base: str, exc: BaseException) -> PullError:
    reason = getattr(exc, "reason", None) or exc
    return PullError(f"pulling {model}: cannot reach the registry at {base} ({reason})")


def fetch_manifest(name: ModelName, base: str, *, timeout: float = TIMEOUT_S) -> bytes:
    """The manifest's bytes as the registry at ``base`` (``registry_base``) sent them.

    Errors: ``ModelNotFoundError`` for a model or tag the registry does not have (404),
    ``PullError`` for any other refusal, an unreachable registry, or a manifest that is not a
    single Docker v2 image manifest (what an Ollama model is).
    """
    url = f"{base}/v2/{name.namespace}/{name.name}/manifests/{name.tag}"
    model = name.short
    try:
        with _open(url, headers={"Accept": MANIFEST_MEDIA_TYPE}, timeout=timeout) as response:
            kind = response.headers.get_content_type()
            data = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise ModelNotFoundError(
                f"pulling {model}: the registry at {base} has no such model or tag (404)"
            ) from None
        raise _http_failure(model, "the manifest", exc) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _unreachable(model, base, exc) from None
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    declared = body.get("mediaType") if isinstance(body, dict) else None
    if kind in _LIST_KINDS or declared in _LIST_KINDS:
        raise PullError(
            f"pulling {model}: the registry sent a manifest list ({declared or kind}), not a "
            "model; only single Docker v2 image manifests (Ollama models) can be pulled"
        )
    if declared is not None and declared != MANIFEST_MEDIA_TYPE:
        raise PullError(
            f"pulling {model}: unsupported manifest kind {declared!r}; only "
            f"{MANIFEST_MEDIA_TYPE} (Ollama models) can be pulled"
        )
    return data


def partial_path(store: Store, digest: str) -> Path:
    return store.blobs / (PARTIAL_PREFIX + digest.replace(":", "-"))


def _open_partial(path: Path) -> BinaryIO:
    """Open a partial download to append; one name for the tests to fill the disk at."""
    return path.open("a+b")


def _open_locked(partial: Path) -> Generator[int, None, BinaryIO]:
    """The partial file, opened and locked; while another pull holds it, yield its progress
    (a caller can stop waiting between two looks). The file returned is the one at the path:
    one that the pull we waited for renamed (done) or deleted (a mismatch) is opened anew."""
    while True:
        f = _open_partial(partial)
        try:
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    yield os.fstat(f.fileno()).st_size
                    time.sleep(LOCK_POLL_S)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(partial).st_ino == os.fstat(f.fileno()).st_ino:
                    return f
        except BaseException:
            f.close()
            raise
        f.close()


def _hash_existing(f: BinaryIO, size: int) -> hashlib._Hash:
    h = hashlib.sha256()
    f.seek(0)
    left = size
    while left > 0 and (chunk := f.read(min(CHUNK, left))):
        h.update(chunk)
        left -= len(chunk)
    return h


def download_blob(
    name: ModelName,
    layer: Layer,
    *,
    store: Store,
    base: str,
    timeout: float = TIMEOUT_S,
    attempts: int = ATTEMPTS,
) -> Generator[int, None, None]:
    """Download ``layer``'s blob into the store (see the module doc), yielding the bytes done.

    Errors: ``PullError`` naming the model and blob: a digest or size mismatch (the download is
    deleted), or a download cut ``attempts`` times (what arrived is kept for the next pull).
    """
    model, digest = name.short, layer.digest
    final = store.blob_path(digest)
    if final.exists() and final.stat().st_size == layer.size:
        yield layer.size  # verified by the caller (a damaged one is downloaded again)
        return
    store.blobs.mkdir(parents=True, exist_ok=True)
    partial = partial_path(store, digest)
    f = yield from _open_locked(partial)
    with f:
        if final.exists() and final.stat().st_size == layer.size:
            partial.unlink()  # the pull we waited for finished it; this file is a new, empty one
            yield layer.size
            return
        done = os.fstat(f.fileno()).st_size
        if done > layer.size:  # not a prefix of this blob: start over
            f.truncate(0)
            done = 0
        h = _hash_existing(f, done)
        f.seek(done)
        yield done
        url = f"{base}/v2/{name.namespace}/{name.name}/blobs/{digest}"
        failures: list[str] = []
        while done < layer.size:
            if len(failures) >= attempts:
                raise PullError(
                    f"pulling {model}: the download of blob {digest} failed {len(failures)} "
                    f"times (last: {failures[-1]}); {done} of {layer.size} bytes are kept: run the "
                    "pull again to resume"
                )
            headers = {"Range": f"bytes={done}-"} if done else {}
            try:
                with _open(url, headers=headers, timeout=timeout) as response:
                    if done and not _resumes_at(response, done):  # the whole blob: start over
                        f.seek(0)
                        f.truncate(0)
                        done, h = 0, hashlib.sha256()
                    while chunk := response.read(CHUNK):
                        if done + len(chunk) > layer.size:
                            raise _mismatch(
                                partial, model, digest, "is longer than the manifest says"
                            )
                        f.write(chunk)
                        f.flush()  # on disk for a resume after a kill, and for a waiting pull
                        h.update(chunk)
                        done += len(chunk)
                        yield done
            except urllib.error.HTTPError as exc:
                if exc.code == 416 and done:  # our part is not a prefix the server knows
                    f.seek(0)
                    f.truncate(0)
                    done, h = 0, hashlib.sha256()
                    failures.append("range not satisfiable")
                    continue
                if exc.code >= 500:  # the registry's or the CDN's trouble: try again
                    failures.append(f"HTTP {exc.code}")
                    continue
                raise _http_failure(model, f"blob {digest}", exc) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise PullError(
                        f"pulling {model}: no space left on the disk of {store.root} "
                        f"({done} of {layer.size} bytes of blob {digest} are kept: free some "
                        "space and run the pull again to resume)"
                    ) from None
                failures.append(str(getattr(exc, "reason", None) or exc) or type(exc).__name__)
                continue
            if done < layer.size:
                failures.append(f"connection closed after {done} bytes")
        if "sha256:" + h.hexdigest() != digest:
            raise _mismatch(partial, model, digest, f"has sha256 {'sha256:' + h.hexdigest()}")
        f.flush()
        os.fsync(f.fileno())
        os.replace(partial, final)
        fsync_dir(store.blobs)


def _resumes_at(response: http.client.HTTPResponse, offset: int) -> bool:
    """Whether a ranged response continues at ``offset`` (a 206 from there)."""
    if response.status != 206:
        return False
    content_range = response.headers.get("Content-Range", "")
    return content_range.startswith(f"bytes {offset}-")


def _mismatch(partial: Path, model: str, digest: str, what: str) -> PullError:
    partial.unlink(missing_ok=True)
    return PullError(
        f"pulling {model}: the registry's blob {digest} {what}: it does not match the manifest "
        "and was discarded"
    )
