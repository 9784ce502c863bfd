"""``mlxrunner serve`` over a damaged model: one clear line on stderr and exit status 1.

Each case runs the real command in a subprocess (the one way to see its stderr and exit
status whole) against a temp store or file: a store blob truncated or changed in place, a
truncated GGUF file (a truncated safetensors file in a folder fails in the same
``check_safetensors`` as an unverified blob: tests/test_safetensors.py). The server binds its
port before the model is loaded (``/health`` reports the load), so it prints its address and
then, when the load fails, the error line, and exits. The processes run side by side.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.store.importer import import_model
from runtime.store.layout import Store
from runtime.testing.models import make_tiny_folder, random_weights, tiny_config
from tests import gguf_writer as gw

ROOT = Path(__file__).resolve().parent.parent
HANG_GUARD_S = 120


def _largest_tensor_blob(store: Store) -> tuple[str, Path]:
    manifest = json.loads(store.manifest_path(store.read_manifest("tiny")[0]).read_text())
    layer = max(manifest["layers"], key=lambda x: x["size"])
    return layer["digest"], store.blob_path(layer["digest"])


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[str], str]]:
    """case -> (serve arguments, what its error line must say)."""
    tmp = tmp_path_factory.mktemp("bad")
    folder = make_tiny_folder(tmp / "folder")
    out: dict[str, tuple[list[str], str]] = {}
    for case in ("truncated-blob", "changed-blob"):
        store = Store(tmp / case)
        import_model(folder, "tiny", store=store)
        digest, blob = _largest_tensor_blob(store)
        data = blob.read_bytes()
        if case == "truncated-blob":
            blob.write_bytes(data[:-10])
            expected = f"model 'tiny:latest': blob {digest} (model.embed_tokens) is truncated"
        else:
            blob.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
            expected = f"model 'tiny:latest': blob {digest} (model.embed_tokens) is corrupt"
        out[case] = (["--model", "tiny", "--models-dir", str(store.root)], expected)

    config = tiny_config("llama", vocab_size=320)
    weights = {k: np.array(v) for k, v in random_weights(config).items()}
    gguf = tmp / "model.gguf"
    gw.write_model_gguf(gguf, config, weights, gw.gpt2_tokenizer_metadata())
    gguf.write_bytes(gguf.read_bytes()[:-100])
    out["truncated-gguf"] = (["--model", str(gguf)], f"{gguf}: truncated: tensor")
    return out


def test_a_damaged_model_at_start_is_one_line_and_exit_1(
    cases: dict[str, tuple[list[str], str]],
) -> None:
    serve = [sys.executable, "-m", "cli.main", "serve", "--port", "0"]
    running = {
        case: subprocess.Popen(
            [*serve, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for case, (args, _) in cases.items()
    }
    try:
        results = {case: p.communicate(timeout=HANG_GUARD_S) for case, p in running.items()}
    finally:
        for p in running.values():
            p.kill()
            p.wait()
    for case, (_, stderr) in results.items():
        expected = cases[case][1]
        errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
        assert running[case].returncode == 1, (case, stderr)
        assert len(errors) == 1, (case, stderr)
        assert expected in errors[0], (case, stderr)
        assert "Traceback" not in stderr, (case, stderr)
