"""Resolve a model source into a checked ``Checkpoint``: how ``serve``, ``run``, ``import``
and ``show`` all find a model.

A source is, in this order:

- an existing folder: an HF/MLX model folder (``runtime.formats.model_files``: config,
  tokenizer files, ``chat_template.jinja``, ``generation_config.json``), its safetensors files
  read lazily (headers only);
- an existing file: a GGUF file, by its magic or its ``.gguf`` suffix, decoded whole; any
  other file is an error;
- text that looks like a path (starts with ``/``, ``.`` or ``~``, or ends in ``.gguf``) but
  names nothing: ``ModelNotFoundError``;
- anything else: a model name in the store (``name[:tag]``), every blob's digest checked; a
  stored GGUF model (as pulled from Ollama's registry) is read as a GGUF file.

Whatever the kind, the tensors then go through ``runtime.models.checkpoint.check_checkpoint``.
"""

from __future__ import annotations

from pathlib import Path

from runtime.errors import ModelLoadError, ModelNotFoundError
from runtime.formats.model_files import ModelFiles, folder_files
from runtime.formats.safetensors import TensorSet, read_tensors
from runtime.models.checkpoint import Checkpoint, check_checkpoint
from runtime.progress import Progress, ProgressCallback
from runtime.store.layout import Store
from runtime.store.profile import ModelProfile

_GGUF_MAGIC = b"GGUF"


def looks_like_path(source: str) -> bool:
    """A store name never starts with ``/``, ``.`` or ``~`` nor ends in ``.gguf``."""
    return source.startswith(("/", ".", "~")) or source.endswith(".gguf") or "\\" in source


def open_checkpoint(
    source: str | Path, *, store: Store | None = None, progress: ProgressCallback | None = None
) -> Checkpoint:
    """Resolve and check ``source`` (see the module doc); ``store`` defaults to the default one.

    ``progress`` gets a ``Progress(phase="read")`` after each file is read.

    Errors: ``ModelNotFoundError`` when nothing of that name or path exists, else
    ``ModelLoadError`` naming the file (and tensor) at fault.
    """
    text = str(source)
    if not text.strip():
        raise ModelNotFoundError("no model given")
    path = Path(text).expanduser()
    if path.is_dir():
        files = folder_files(path)
        return check_checkpoint(files, _read_safetensors(files, progress), where=str(path))
    if path.is_file():
        if _is_gguf(path):
            return _gguf_checkpoint(path, progress)
        raise ModelLoadError(f"{path}: not a model folder or a GGUF file")
    if looks_like_path(text):
        raise ModelNotFoundError(f"{text}: no such model folder or .gguf file")
    store = store or Store.default()
    gguf = store.gguf_blob(text)
    if gguf is not None:
        short, digest, blob = gguf
        profile = store.profile(text)
        return _gguf_checkpoint(blob, progress, name=short, digest=digest, profile=profile)
    files = store.resolve(text)
    return check_checkpoint(
        files, _read_safetensors(files, progress), where=f"model {files.name!r}"
    )


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            magic = f.read(len(_GGUF_MAGIC))
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc})") from exc
    return magic == _GGUF_MAGIC or path.suffix == ".gguf"


def _read_safetensors(files: ModelFiles, progress: ProgressCallback | None) -> TensorSet:
    done_bytes = done_items = 0

    def on_file(_: Path, size: int, count: int, total_items: int) -> None:
        nonlocal done_bytes, done_items
        done_bytes += size
        done_items += count
        if progress is not None:
            progress(
                Progress(
                    phase="read",
                    done_bytes=done_bytes,
                    total_bytes=files.size_bytes,
                    done_items=done_items,
                    total_items=total_items,
                )
            )

    return read_tensors(files.weight_files, on_file=on_file)


def _gguf_checkpoint(
    path: Path,
    progress: ProgressCallback | None,
    *,
    name: str = "",
    digest: str = "",
    profile: ModelProfile | None = None,
) -> Checkpoint:
    from runtime.formats.gguf import read_gguf  # numpy decoders: only for GGUF sources

    contents = read_gguf(path)
    stat = path.stat()
    profile = profile or ModelProfile()
    tokenizer_config = dict(contents.tokenizer_config)
    if profile.template is not None:  # a stored model's own template (runtime.store.profile)
        tokenizer_config["chat_template"] = profile.template
    files = ModelFiles(
        name=name or str(path),
        config=contents.config,
        tokenizer_json=contents.tokenizer_json,
        tokenizer_config=tokenizer_config,
        generation_config=None,
        weight_files=(path,),
        digest=digest,
        size_bytes=stat.st_size,
        modified_at=stat.st_mtime,
        profile=profile,
    )
    count = len(contents.weights)
    if progress is not None:
        progress(
            Progress(
                phase="read",
                done_bytes=stat.st_size,
                total_bytes=stat.st_size,
                done_items=count,
                total_items=count,
            )
        )
    # The quantization of each module is in contents.config, where check_checkpoint reads it.
    tensors = TensorSet(
        tensors=dict(contents.weights),
        origins=dict.fromkeys(contents.weights, str(path)),
        quant={},
    )
    return check_checkpoint(files, tensors, where=f"model {name!r}" if name else str(path))
