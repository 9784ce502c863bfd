"""MLX on Linux CPU must run its matmuls on an optimized BLAS, not the bundled reference one."""

from __future__ import annotations

import glob
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.blas import _BLIS, _CANDIDATES, SKINNY_ROWS, loaded_blas, shim_path, skinny_blas

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


HAVE_DISPATCH = HAVE_OPENBLAS and any(glob.glob(p) for p in _BLIS) and Path(shim_path()).exists()
needs_dispatch = pytest.mark.skipif(
    platform.system() != "Linux" or not HAVE_DISPATCH,
    reason="needs OpenBLAS, BLIS and the built dispatch (make install)",
)


@needs_dispatch
def test_few_row_products_go_to_blis() -> None:
    assert skinny_blas() is not None
    assert "libblis" in Path("/proc/self/maps").read_text()


@needs_dispatch
@pytest.mark.parametrize("rows", [1, 3, SKINNY_ROWS, SKINNY_ROWS + 1, 40])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_dispatched_products_are_right(rows: int, trans_a: bool, trans_b: bool) -> None:
    """Both libraries, every stored orientation MLX may pass (the strides BLIS gets)."""
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(rows)
    a = rng.standard_normal((rows, 70), dtype=np.float32)
    b = rng.standard_normal((70, 33), dtype=np.float32)
    left = mx.array(a.T.copy()).T if trans_a else mx.array(a)
    right = mx.array(b.T.copy()).T if trans_b else mx.array(b)
    with mx.stream(mx.cpu):
        product = np.array(mx.add(left @ right, 1.0))
    np.testing.assert_allclose(product, a @ b + 1.0, rtol=1e-4, atol=1e-4)


@needs_dispatch
def test_dispatch_preloads_into_another_process() -> None:
    """The LD_PRELOAD form the HTTP benchmark gives ``mlx_lm.server``."""
    openblas = next(p for pat in _CANDIDATES for p in sorted(glob.glob(pat)))
    blis = next(p for pat in _BLIS for p in sorted(glob.glob(pat)))
    env = {
        "LD_PRELOAD": f"{shim_path()}:{openblas}",
        "MLXRUNNER_SGEMM_OPENBLAS": openblas,
        "MLXRUNNER_SGEMM_BLIS": blis,
        "MLXRUNNER_SGEMM_ROWS": "8",
        "PATH": "/usr/bin:/bin",
    }
    code = (
        "import mlx.core as mx; a = mx.ones((2, 64)); b = mx.ones((64, 5)); "
        "print(float((a @ b).sum()), 'libblis' in open('/proc/self/maps').read())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["640.0", "True"]
    assert "not set up" not in out.stderr
