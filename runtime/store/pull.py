"""``pull``: a model from Ollama's registry, or a model folder from the Hugging Face hub, into
the store, reported as Ollama reports a pull.

``pull_model`` is a generator of ``PullProgress`` records, the lines ``/api/pull`` streams
(``status``, and ``digest``/``total``/``completed`` while a blob downloads). For a registry
name (``[host/][namespace/]name[:tag]``, see ``runtime.store.registry``) it fetches the
manifest, checks it is a model this store can hold (``parse_manifest``), downloads each blob
it lists that the store lacks (a stored blob of the right size is hashed once, as a load does,
and downloaded again if damaged), and writes the manifest last, exactly as the registry sent
it, so an interrupted pull leaves no manifest and the next one resumes its blobs. Replacing an
older version of the tag drops the blobs only that version used.

``hf.co/ORG/REPO[:REVISION]`` (also ``huggingface.co/...``) is a safetensors/MLX model folder
on the Hugging Face hub: ``huggingface_hub.snapshot_download`` fetches it into the HF cache
(``$HF_HOME``; ``HF_HUB_OFFLINE=1`` takes it from there without the network) and the importer
(``runtime.store.importer``) stores it under that name. Its progress is two status lines
(downloading, importing): the download is one blocking call, so it stops only once done.

Closing the generator stops the pull between two chunks, keeping partial downloads.
"""

from __future__ import annotations

from collections.abc import Generator

import attrs

from runtime.errors import ModelLoadError, ModelNotFoundError, PullError
from runtime.store import registry
from runtime.store.layout import Store
from runtime.store.manifest import Layer, parse_manifest
from runtime.store.names import ModelName
from runtime.store.verified import VerifiedBlobs

HF_HOSTS = ("hf.co", "huggingface.co")
# What a model folder needs (runtime.formats.model_files); the rest of a repo is skipped.
HF_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]


@attrs.frozen(kw_only=True)
class PullProgress:
    """One line of a pull's progress, in Ollama's shape."""

    status: str
    digest: str = ""
    total: int = 0
    completed: int = 0

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"status": self.status}
        if self.digest:
            out |= {"digest": self.digest, "total": self.total, "completed": self.completed}
        return out


def is_hf_name(text: str) -> bool:
    return text.strip().split("/", 1)[0].lower() in HF_HOSTS


def pull_model(
    name: str,
    *,
    store: Store,
    registry_url: str | None = None,
    insecure: bool = False,
    timeout: float = registry.TIMEOUT_S,
    attempts: int = registry.ATTEMPTS,
) -> Generator[PullProgress, None, None]:
    """Pull ``name`` into ``store`` (see the module doc); the last record is ``success``.

    Errors: ``ModelNotFoundError`` (no such model or tag), ``PullError`` (the registry or the
    hub failed, a blob did not match its digest, a manifest of an unsupported kind),
    ``InvalidNameError`` for a name that cannot be pulled; an HF folder that cannot be
    imported is a ``PullError`` with the importer's reason.
    """
    if is_hf_name(name):
        yield from _pull_hf(name, store=store)
    else:
        parsed = ModelName.parse(name)
        base = registry.registry_base(parsed, registry_url, insecure=insecure)
        yield from _pull_registry(parsed, store, base, timeout=timeout, attempts=attempts)


def _usable(store: Store, model: str, layer: Layer, known: VerifiedBlobs) -> bool:
    """Whether the store holds this blob intact; a damaged one is removed, to download."""
    path = store.blob_path(layer.digest)
    if not path.exists():
        return False
    try:
        store.check_blob(model, layer, known=known)
    except ModelLoadError:
        path.unlink(missing_ok=True)
        return False
    return True


def _pull_registry(
    name: ModelName, store: Store, base: str, *, timeout: float, attempts: int
) -> Generator[PullProgress, None, None]:
    model = name.short
    yield PullProgress(status="pulling manifest")
    raw = registry.fetch_manifest(name, base, timeout=timeout)
    try:
        manifest = parse_manifest(raw, f"pulling {model}")
    except ModelLoadError as exc:  # a kind of model this store cannot hold: say so as a pull
        raise PullError(str(exc)) from None
    known = VerifiedBlobs(store.root)
    seen: set[str] = set()
    for layer in (manifest.config, *manifest.layers):
        if layer.digest in seen:
            continue
        seen.add(layer.digest)
        status = f"pulling {layer.digest.removeprefix('sha256:')[:12]}"
        line = PullProgress(status=status, digest=layer.digest, total=layer.size)
        if _usable(store, model, layer, known):
            yield attrs.evolve(line, completed=layer.size)
            continue
        for done in registry.download_blob(
            name, layer, store=store, base=base, timeout=timeout, attempts=attempts
        ):
            yield attrs.evolve(line, completed=done)
    known.save()
    yield PullProgress(status="verifying sha256 digest")  # done per blob as it arrived
    yield PullProgress(status="writing manifest")
    try:
        previous = store.read_manifest(name)[1].digests()
    except ModelLoadError:
        previous = set()
    store.commit_manifest(name, manifest, raw)
    store.prune(previous - manifest.digests())
    yield PullProgress(status="success")


def hf_repo(name: str) -> tuple[str, str | None, str]:
    """(repo id, revision or ``None``, store name) of ``hf.co/ORG/REPO[:REVISION]``."""
    text = name.strip()
    _, _, rest = text.partition("/")
    repo, _, revision = rest.partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ModelNotFoundError(
            f"invalid Hugging Face name {name!r}: expected hf.co/ORG/REPO[:REVISION]"
        )
    stored = ModelName.parse(f"hf.co/{repo}:{revision or 'latest'}").short
    return repo, revision or None, stored


def _pull_hf(name: str, *, store: Store) -> Generator[PullProgress, None, None]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from runtime.store.importer import import_model

    repo, revision, stored = hf_repo(name)
    yield PullProgress(status=f"pulling {repo} from the Hugging Face hub")
    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=HF_PATTERNS)
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise ModelNotFoundError(
            f"pulling {name}: no such repository or revision on the Hugging Face hub "
            f"({type(exc).__name__})"
        ) from None
    except LocalEntryNotFoundError:
        raise PullError(
            f"pulling {name}: not in the Hugging Face cache and the hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE is set)"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise PullError(f"pulling {name}: the Hugging Face hub failed ({exc})") from None
    yield PullProgress(status=f"importing {repo} as {stored}")
    try:
        import_model(folder, stored, store=store)
    except ModelNotFoundError:
        raise
    except ModelLoadError as exc:  # what the hub sent is not a model this runner can import
        raise PullError(
            f"pulling {name}: {exc} (the hub's repository must be a safetensors/MLX model "
            "folder of a supported architecture)"
        ) from None
    yield PullProgress(status="success")
