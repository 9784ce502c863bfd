"""Perplexity of the default model imported unquantized (f32) vs q8 and q4, side by side.

The default model (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF, so "f32" here is that file
dequantized to float32: the reference every re-quantization is compared with. Each variant is
imported into a temporary store with ``runtime.store.importer`` (the same path as ``mlxrunner import
--quantize``), loaded by name, and scored on the fixed text ``tests/data/perplexity.txt`` in
one forward pass. Run: ``.venv/bin/python bench/perplexity.py``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runtime  # noqa: F401  (OpenBLAS before mlx)
from bench.common import default_gguf

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "perplexity.txt"
# (label, quantize, group size); None keeps the GGUF's own encoding.
VARIANTS: list[tuple[str, str | None, int | None]] = [
    ("f32 (dequantized)", "f32", None),
    ("as stored (GGUF grid)", None, None),
    ("q8 g64", "q8", 64),
    ("q8 g32", "q8", 32),
    ("q4 g64", "q4", 64),
    ("q4 g32", "q4", 32),
]


def perplexity(loaded: object, ids: list[int]) -> float:
    import mlx.core as mx

    model = loaded.model  # type: ignore[attr-defined]
    logits = model(mx.array(ids[:-1], dtype=mx.int32)[None]).astype(mx.float32)[0]
    targets = mx.array(ids[1:], dtype=mx.int32)
    nll = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[:, None], -1)[:, 0]
    return math.exp(mx.mean(nll).item())  # type: ignore[arg-type]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default=None, help="model folder or GGUF (default: SmolLM2)")
    parser.add_argument(
        "--execution",
        choices=["auto", "dense", "quantized"],
        default="dense",
        help="dense dequantizes at load (same values, faster on CPU)",
    )
    args = parser.parse_args()

    from runtime.models.loader import load_model
    from runtime.progress import human_bytes
    from runtime.store.importer import import_model
    from runtime.store.layout import Store

    source = Path(args.source) if args.source else default_gguf()
    text = TEXT.read_text(encoding="utf-8")
    rows: list[tuple[str, str, int, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "models")
        ids: list[int] | None = None
        for label, quantize, group in VARIANTS:
            started = time.perf_counter()
            result = import_model(
                source,
                f"bench:{len(rows)}",
                store=store,
                quantize=quantize,  # type: ignore[arg-type]
                group_size=group,
            )
            import_s = time.perf_counter() - started
            loaded = load_model(result.name, store=store, execution=args.execution)
            if ids is None:
                ids = loaded.tokenizer.encode(text)
            rows.append(
                (label, loaded.quantization, result.size_bytes, perplexity(loaded, ids), import_s)
            )
    assert ids is not None
    reference = rows[0][3]
    print(f"{source.name}: {len(ids)} tokens of {TEXT.name}, execution={args.execution}\n")
    print(f"{'variant':<24}{'stored as':<12}{'size':>10}{'ppl':>9}{'vs f32':>9}{'import s':>10}")
    for label, quant, size, ppl, import_s in rows:
        print(
            f"{label:<24}{quant:<12}{human_bytes(size):>10}{ppl:>9.3f}{ppl / reference:>9.3f}"
            f"{import_s:>10.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
