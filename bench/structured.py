"""Structured output's cost per token: constrained decoding vs free decoding, side by side.

The default model (SmolLM2-135M) at the engine level: each run adds ``rows`` sequences with the
same chat prompt and decodes ``--gen`` tokens each (greedy); the decode rate is measured from
the step where every row has its first token to the end. Modes:

- ``free``: no constraint (the baseline);
- ``numbers``: every row under a schema of an array of at least 500 integers (no row can end
  early, so every run decodes the same number of tokens);
- ``text``: every row under an object whose one string field needs 2000 characters (the mask
  of a string allows most of the vocabulary: the costliest case for the host);
- ``mixed`` (more than one row): half the rows free, half under ``numbers`` (one batch, both
  kinds of row).

Each repeat runs every mode back to back in a rotating order; a ratio is the median of the
per-repeat ratios to ``free``, of wall time per token and of the process's CPU time per token
(all threads; on a shared machine it moves less than wall time). ``host mask`` is llguidance alone: the time to advance a matcher
by one token and compute the next mask, replaying the tokens a ``numbers``/``text`` row wrote.
Run: ``.venv/bin/python bench/structured.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runtime  # noqa: F401  (OpenBLAS before mlx)

NUMBERS = {
    "type": "object",
    "properties": {"numbers": {"type": "array", "items": {"type": "integer"}, "minItems": 500}},
    "required": ["numbers"],
}
TEXT = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 2000}},
    "required": ["story"],
}
MODES = ("free", "numbers", "text", "mixed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--gen", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import mlx.core as mx
    import numpy as np

    from bench.common import default_gguf
    from runtime.engine.model_engine import ModelEngine
    from runtime.engine.options import SamplingOptions
    from runtime.engine.protocol import SequenceRequest
    from runtime.models.loader import load_model
    from runtime.text.structured import OutputFormat, compile_format

    loaded = load_model(default_gguf())
    tok = loaded.tokenizer
    prompt = tuple(
        tok.encode(tok.apply_chat_template([{"role": "user", "content": "Write JSON."}]))
    )
    greedy = SamplingOptions(temperature=0.0, repeat_penalty=1.0)
    constraints = {
        name: compile_format(OutputFormat.json_schema(schema), tok)
        for name, schema in (("numbers", NUMBERS), ("text", TEXT))
    }

    def run(mode: str, rows: int) -> tuple[float, float, list[list[int]]]:
        """Decode tokens per second (wall), the process's CPU seconds per decoded token (all
        its threads: steadier than wall time on a shared machine), and each row's tokens."""
        engine = ModelEngine(loaded, prefill_chunk=512)
        for i in range(rows):
            kind = "numbers" if mode == "mixed" and i % 2 else mode
            engine.add(
                SequenceRequest(
                    seq_id=i,
                    prompt=prompt,
                    sampling=greedy,
                    max_tokens=args.gen,
                    constraint=constraints.get(kind),
                )
            )
        tokens: list[list[int]] = [[] for _ in range(rows)]
        start: float | None = None
        cpu_start = 0.0
        counted = 0
        while engine.has_work():
            for event in engine.step():
                if event.token is None:
                    continue
                tokens[event.seq_id].append(event.token)
                if start is not None:
                    counted += 1
            if start is None and all(tokens):
                start, cpu_start = time.perf_counter(), time.process_time()
        assert start is not None
        assert all(len(t) == args.gen for t in tokens), "a row ended early"
        cpu = (time.process_time() - cpu_start) / counted
        return counted / (time.perf_counter() - start), cpu, tokens

    def host_mask_us(name: str, written: list[int]) -> float:
        import llguidance.numpy as lnp

        matcher = constraints[name].start()
        mask = lnp.allocate_token_bitmask(1, constraints[name].vocab_size)
        times = []
        for token in written:
            begin = time.perf_counter()
            lnp.fill_next_token_bitmask(matcher, mask)
            assert matcher.consume_token(token)
            times.append(time.perf_counter() - begin)
        return statistics.median(times) * 1e6

    print(
        f"SmolLM2-135M, device={mx.default_device()}, greedy, {args.gen} tokens a row, "
        f"median of {args.repeats}"
    )
    print(
        f"{'rows':>4} {'mode':>8} {'tok/s':>8} {'wall ratio':>10} {'CPU ms/tok':>10} "
        f"{'CPU ratio':>9} {'host mask':>10}"
    )
    run("free", 1)  # warm-up
    for rows in args.rows:
        rates: dict[str, list[float]] = {m: [] for m in MODES}
        cpus: dict[str, list[float]] = {m: [] for m in MODES}
        written: dict[str, list[int]] = {}
        modes = MODES if rows > 1 else MODES[:-1]
        for repeat in range(args.repeats):
            order = modes[repeat % len(modes) :] + modes[: repeat % len(modes)]
            for mode in order:
                rate, cpu, tokens = run(mode, rows)
                rates[mode].append(rate)
                cpus[mode].append(cpu)
                written.setdefault(mode, tokens[0])
        for mode in modes:
            rate = statistics.median(rates[mode])
            # Per repeat, time (or CPU) per token relative to free; the median of those.
            wall_ratio = statistics.median(np.array(rates["free"]) / np.array(rates[mode]))
            cpu_ratio = statistics.median(np.array(cpus[mode]) / np.array(cpus["free"]))
            cpu_ms = 1000 * statistics.median(cpus[mode])
            host = f"{host_mask_us(mode, written[mode]):.0f} us" if mode in constraints else ""
            print(
                f"{rows:>4} {mode:>8} {rate:>8.2f} {wall_ratio:>10.2f} {cpu_ms:>10.1f} "
                f"{cpu_ratio:>9.2f} {host:>10}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
