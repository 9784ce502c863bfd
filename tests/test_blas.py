"""MLX on Linux CPU must run its matmuls on an optimized BLAS, not the bundled reference one."""

from __future__ import annotations

import glob
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.blas import _CANDIDATES, loaded_blas

HAVE_OPENBLAS = any(glob.glob(p) for p in _CANDIDATES)


@pytest.mark.skipif(platform.system() != "Linux", reason="Linux CPU backend only")
@pytest.mark.skipif(
    not HAVE_OPENBLAS, reason="no system OpenBLAS (scripts/setup-blas.sh installs it)"
)
def test_openblas_is_mapped_before_mlx() -> None:
    assert loaded_blas() is not None
    maps = Path("/proc/self/maps").read_text()
    assert "openblas" in maps


@pytest.mark.skipif(platform.system() != "Linux", reason="Linux CPU backend only")
def test_preload_can_be_disabled_for_benchmarks() -> None:
    code = (
        "import os; os.environ['MLXRUNNER_BLAS']='none'; import runtime; "
        "from runtime.blas import loaded_blas; "
        "print(loaded_blas(), 'openblas' in open('/proc/self/maps').read())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "False"]
