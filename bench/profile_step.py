"""Where one engine decode step spends its time: host graph building vs waiting on the device.

For each batch size, ``ModelEngine`` runs a batch of random prompts to the decode phase, then
times ``--steps`` decode steps split into the host's part (building and dispatching the
forward pass and the sampling graph: ``_dispatch``) and the wait for the previous step's
tokens (``_collect``, the one host sync). The dispatch is split again into building the graph
in Python (``graph``) and MLX encoding and launching it (``eval``, inside ``mx.async_eval``),
and ``nodes`` counts the MLX nodes of one step's graph (``mx.export_to_dot``). A step whose
dispatch takes longer than its wait is bound by the host, not by the device. Also prints the
per-layer attention time at the same shapes, with and without the length mask, to see what
the padded cache costs (``--no-attention`` skips it).

Run: ``python bench/profile_step.py [--size 8b|1b|tiny] [--batches 1,16,64]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runtime  # noqa: F401  (OpenBLAS before mlx on CPU)
from bench import engine_runs, random_llama


def profile(
    size: str, batches: list[int], steps: int, prompt_tokens: int, with_attention: bool
) -> None:
    import mlx.core as mx

    from runtime.engine.model_engine import ModelEngine
    from runtime.engine.protocol import SequenceRequest

    config = random_llama.CONFIGS[size]
    weights = random_llama.random_weights(config, mx.bfloat16)
    loaded = random_llama.loaded_in_memory(config, weights, name=size)
    print(f"device {mx.default_device()}, {size}, prompt {prompt_tokens}, {steps} steps")
    print(
        f"{'rows':>5} {'dispatch ms':>12} {'graph ms':>9} {'eval ms':>8} {'wait ms':>8}"
        f" {'step ms':>8} {'tok/s':>7} {'nodes':>6}"
    )
    for rows in batches:
        engine = ModelEngine(loaded, prefill_chunk=rows * prompt_tokens)
        prompts = engine_runs.random_prompts(rows, prompt_tokens, int(config["vocab_size"]))
        for i, prompt in enumerate(prompts):
            engine.add(
                SequenceRequest(
                    seq_id=i,
                    prompt=tuple(prompt),
                    sampling=engine_runs.GREEDY,
                    max_tokens=steps + 8,
                )
            )
        for _ in range(4):  # prefill, first tokens, pipeline full
            engine.step()
        dispatch, wait, total = [], [], []
        real_dispatch, real_collect = engine._dispatch, engine._collect

        def timed_dispatch(previous, _f=real_dispatch):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return _f(previous)
            finally:
                dispatch.append(time.perf_counter() - start)

        def timed_collect(forward, _f=real_collect):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return _f(forward)
            finally:
                wait.append(time.perf_counter() - start)

        engine._dispatch = timed_dispatch  # type: ignore[method-assign]
        engine._collect = timed_collect  # type: ignore[method-assign]
        nodes = count_nodes(engine)
        evaluating: list[float] = []

        def timed_eval(real_eval: Callable[..., None], *arrays: mx.array) -> None:
            start = time.perf_counter()
            try:
                real_eval(*arrays)
            finally:
                evaluating.append(time.perf_counter() - start)

        with async_eval_through(timed_eval):
            for _ in range(steps):
                start = time.perf_counter()
                engine.step()
                total.append(time.perf_counter() - start)
        d, e, w, t = (1000 * statistics.median(x) for x in (dispatch, evaluating, wait, total))
        print(
            f"{rows:>5} {d:>12.2f} {d - e:>9.2f} {e:>8.2f} {w:>8.2f} {t:>8.2f}"
            f" {rows / t * 1000:>7.0f} {nodes:>6}"
        )
        engine.close()
    if with_attention:
        attention(config, batches, prompt_tokens)
        attention(config, batches, 4096)


@contextlib.contextmanager
def async_eval_through(hook: Callable[..., None]) -> Iterator[None]:
    """``mx.async_eval`` (which the engine calls once per step) goes through
    ``hook(real_async_eval, *arrays)`` inside the block."""
    import mlx.core as mx

    real_eval = mx.async_eval
    mx.async_eval = functools.partial(hook, real_eval)
    try:
        yield
    finally:
        mx.async_eval = real_eval


def count_nodes(engine: Any) -> int:
    """The MLX nodes of one decode step's graph (the step runs as usual)."""
    import mlx.core as mx

    graphs: list[str] = []

    def capture(real_eval: Callable[..., None], *arrays: mx.array) -> None:
        text = io.StringIO()
        mx.export_to_dot(text, *arrays)
        graphs.append(text.getvalue())
        real_eval(*arrays)

    with async_eval_through(capture):
        engine.step()
    return len(re.findall(r"\[label =\"[A-Za-z]", graphs[-1])) if graphs else 0


def attention(config: dict[str, int], batches: list[int], positions: int) -> None:
    """One layer's decode attention over a padded cache, by kind of length mask."""
    import mlx.core as mx

    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    dim = config["hidden_size"] // heads
    print(f"decode attention per layer at {positions} positions (ms)")
    print(f"{'rows':>5} {'bool mask':>10} {'additive':>10} {'no mask':>10} {'matmuls':>10}")
    for rows in batches:
        q = mx.random.normal((rows, heads, 1, dim), dtype=mx.bfloat16)
        k = mx.random.normal((rows, kv, positions, dim), dtype=mx.bfloat16)
        lengths = mx.full((rows, 1), positions // 2)
        boolean = (mx.arange(positions)[None] <= lengths).reshape(rows, 1, 1, positions)
        additive = mx.where(boolean, 0.0, -mx.inf).astype(mx.bfloat16)

        def sdpa(mask: mx.array | None) -> mx.array:
            return mx.fast.scaled_dot_product_attention(q, k, k, scale=0.1, mask=mask)

        def matmuls() -> mx.array:
            groups = heads // kv
            qg = q.reshape(rows, kv, groups, dim) * 0.1
            scores = qg @ k.swapaxes(-1, -2)  # [rows, kv, groups, positions]
            scores = scores + additive.reshape(rows, 1, 1, positions)
            probs = mx.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype)
            return (probs @ k).reshape(rows, heads, 1, dim)

        times = []
        for fn in (lambda: sdpa(boolean), lambda: sdpa(additive), lambda: sdpa(None), matmuls):
            mx.eval(fn())
            start = time.perf_counter()
            for _ in range(20):
                mx.eval(fn())
            times.append((time.perf_counter() - start) / 20 * 1000)
        print(f"{rows:>5} " + " ".join(f"{t:>10.3f}" for t in times))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(random_llama.CONFIGS), default="8b")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--no-attention", action="store_true", help="skip the attention table")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    profile(args.size, batches, args.steps, args.prompt_tokens, not args.no_attention)
    return 0


if __name__ == "__main__":
    sys.exit(main())
