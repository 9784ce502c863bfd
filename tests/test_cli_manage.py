"""``mlxrunner cp`` and ``mlxrunner create`` (``cli.manage``) through ``cli.main.main``."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import main
from runtime.store.layout import Store
from runtime.testing.models import make_tiny_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("src") / "tiny")


def test_create_from_a_folder_then_from_the_store_then_cp(
    tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ["--models-dir", str(tmp_path / "models")]
    assert main(["create", "base", "-f", str(folder), "--system", "first", *store]) == 0
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    argv = ["create", "me/terse:v1", "--from", "base", "--template", str(template)]
    argv += ["--parameter", "temperature=0.2", "--parameter", "stop=<end>"]
    argv += ["--message", "user: hi", "--message", "assistant: yo", *store]
    assert main(argv) == 0
    profile = Store(tmp_path / "models").resolve("me/terse:v1").profile
    assert profile.system == "first"  # kept from the base
    assert profile.template == template.read_text()
    assert profile.parameters == {"temperature": 0.2, "stop": ["<end>"]}
    assert profile.messages == (
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    )

    assert main(["cp", "me/terse:v1", "copy", *store]) == 0
    assert "copied 'me/terse:v1' to 'copy:latest'" in capsys.readouterr().out
    models = Store(tmp_path / "models")
    assert models.resolve("copy").digest == models.resolve("me/terse:v1").digest


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["cp", "nothere", "x"], "not found"),
        (["create", "x", "-f", "nothere"], "not found"),
        (["create", "x", "-f", "base", "--parameter", "temperature"], "KEY=VALUE"),
        (["create", "x", "-f", "base", "--parameter", "temperature=hot"], "number"),
        (["create", "x", "-f", "base", "--message", "hi"], "ROLE:TEXT"),
        (["create", "x", "-f", "base", "--message", "bot:hi"], "role"),
    ],
)
def test_errors_are_one_line(
    tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture[str], argv: list[str], words: str
) -> None:
    store = ["--models-dir", str(tmp_path / "models")]
    assert main([*argv, *store]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ")
    assert words in err
    assert len(err.strip().splitlines()) == 1
