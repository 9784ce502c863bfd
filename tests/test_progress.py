"""Progress records and the bar that draws them (``runtime.progress``), for imports and loads."""

from __future__ import annotations

import io
from pathlib import Path

from runtime.models.loader import load_model
from runtime.progress import Progress, ProgressBar
from runtime.testing.models import make_tiny_folder


def test_progress_bar_logs_quarters_when_not_a_tty() -> None:
    out = io.StringIO()
    bar = ProgressBar("import x", stream=out, tty=False)
    for done in range(0, 101, 5):
        bar(
            Progress(
                phase="write",
                done_bytes=done,
                total_bytes=100,
                done_items=done // 5,
                total_items=20,
            )
        )
    bar(Progress(phase="done", done_bytes=100, total_bytes=100))
    lines = out.getvalue().splitlines()
    assert lines[0] == "import x: write   0% 0 B/100 B 0/20 tensors"
    assert [line.split()[3] for line in lines] == ["0%", "25%", "50%", "75%", "100%", "100%"]
    assert lines[-1].startswith("import x: done")


def test_progress_bar_redraws_one_line_on_a_tty() -> None:
    out = io.StringIO()
    bar = ProgressBar("load", stream=out, tty=True, width=10)
    bar(Progress(phase="read", done_bytes=50, total_bytes=100))
    bar(Progress(phase="read", done_bytes=50, total_bytes=100))  # no change: no redraw
    assert out.getvalue().count("\r") == 1
    assert "[#####.....]" in out.getvalue()
    bar.close()  # an unfinished bar ends its line before an error message
    assert out.getvalue().endswith("\n")
    bar(Progress(phase="ready", done_bytes=100, total_bytes=100))
    assert out.getvalue().endswith("[##########] 100% 100 B/100 B\x1b[K\n")


def test_progress_fraction_without_bytes_uses_tensors() -> None:
    assert Progress(phase="write", done_items=1, total_items=4).fraction == 0.25
    assert Progress(phase="write").fraction == 0.0
    assert Progress(phase="done").fraction == 1.0


def test_load_progress_draws_a_bar(tmp_path: Path) -> None:
    out = io.StringIO()
    folder = make_tiny_folder(tmp_path / "tiny")
    load_model(folder, progress=ProgressBar("loading tiny", stream=out, tty=True))
    assert out.getvalue().startswith("\rloading tiny read")
    assert out.getvalue().endswith("\x1b[K\n")
    assert "ready  [" in out.getvalue()
    assert "100%" in out.getvalue()
