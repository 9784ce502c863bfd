"""``mlxrunner pull`` (``cli.pull``) through ``cli.main.main``, against a registry on 127.0.0.1."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.main import main
from runtime.progress import ProgressBar
from runtime.store import registry as registry_module
from runtime.store.layout import Store
from tests.registry_server import Registry, serve_registry, tiny_gguf


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def registry(gguf: bytes) -> Iterator[Registry]:
    with serve_registry() as served:
        served.add_model("tiny", "latest", gguf)
        yield served


def test_pull_prints_progress_and_the_model_is_listed(
    tmp_path: Path, registry: Registry, gguf: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(tmp_path / "models")
    assert main(["pull", "tiny", "--registry", registry.url, "--models-dir", d]) == 0
    err = capsys.readouterr().err.splitlines()
    digest = hashlib.sha256(gguf).hexdigest()
    assert err[0] == "pulling manifest"
    assert err[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    # Not a terminal: plain lines, the last one at 100 %.
    assert f"pulling {digest[:12]}: 100% {len(gguf) / 1000:.1f} KB/{len(gguf) / 1000:.1f} KB" in err
    assert main(["list", "--models-dir", d]) == 0
    assert "tiny:latest" in capsys.readouterr().out


def test_an_unknown_model_is_one_error_line(
    tmp_path: Path, registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(tmp_path / "models")
    assert main(["pull", "nothing:7b", "--registry", registry.url, "--models-dir", d]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("Error: pulling nothing:7b: the registry at ")
    assert err.rstrip().endswith("has no such model or tag (404)")


def test_ctrl_c_keeps_the_part_downloaded(
    tmp_path: Path,
    registry: Registry,
    gguf: bytes,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(registry_module, "CHUNK", 1024)
    digest = "sha256:" + hashlib.sha256(gguf).hexdigest()
    drawn = ProgressBar.__call__

    def interrupt(bar: ProgressBar, p: object) -> None:
        drawn(bar, p)  # type: ignore[arg-type]
        if digest[7:19] in bar.label and getattr(p, "done_bytes", 0) >= 2048:
            raise KeyboardInterrupt

    monkeypatch.setattr(ProgressBar, "__call__", interrupt)
    d = tmp_path / "models"
    assert main(["pull", "tiny", "--registry", registry.url, "--models-dir", str(d)]) == 130
    assert "interrupted; run it again to resume" in capsys.readouterr().err
    partial = registry_module.partial_path(Store(d), digest)
    assert partial.stat().st_size == 2048
    monkeypatch.setattr(ProgressBar, "__call__", drawn)
    assert main(["pull", "tiny", "--registry", registry.url, "--models-dir", str(d)]) == 0
    assert registry.blob_requests(digest)[-1] == "bytes=2048-"
