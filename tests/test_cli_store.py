"""``mlxrunner import | list | show | rm`` (``cli.store``) through ``cli.main.main``."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import main
from runtime.store.layout import Store
from runtime.testing.models import make_tiny_folder


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


def test_show_describes_a_folder_with_its_generation_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_tiny_folder(tmp_path / "m")
    (folder / "generation_config.json").write_text('{"temperature": 0.6, "top_k": 20}')
    assert main(["show", str(folder), "--models-dir", str(tmp_path / "models")]) == 0
    out = capsys.readouterr().out
    assert f"Model  {folder}" in out
    assert "digest" not in out  # only a stored model has one
    assert "Parameters (generation_config.json)" in out
    assert "temperature         0.6" in out
    assert "top_k               20" in out
