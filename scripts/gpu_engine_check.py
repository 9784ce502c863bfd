"""Check the engine's decode-attention kernel end to end, on the device, against MLX's ops.

The kernel (``runtime.engine.decode_attention``) rotates and writes each decoding row's new key
and value into the batch cache in place, behind MLX's graph; rows that do not decode in a step
(a prompt being read beside them, a finished row) are left alone. This script runs one
schedule that exercises every case through ``ModelEngine`` three times: with the kernel and
compiled decode steps (as shipped), with the kernel and every step built in Python
(``MLXRUNNER_COMPILED_DECODE=0``), and with MLX's RoPE, scatter and attention
(``MLXRUNNER_DECODE_ATTENTION=sdpa``). The schedule: prompts read in chunks beside decoding
rows, rows finishing at different steps, a finished prompt saved to the prefix cache and hit
by a later request while others run. The model is a random llama in float32 (``--size``), so
the paths differ by float32 rounding only and greedy tokens must agree; it prints the first
difference per sequence and exits 1 on any.

Run: ``python scripts/gpu_engine_check.py [--size 1b|tiny]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runtime  # noqa: F401  (OpenBLAS before mlx on CPU)
from bench import random_llama

Tokens = dict[int, list[int]]

MODES = {  # name: environment
    "kernel, compiled": {"MLXRUNNER_DECODE_ATTENTION": "kernel", "MLXRUNNER_COMPILED_DECODE": "1"},
    "kernel, python": {"MLXRUNNER_DECODE_ATTENTION": "kernel", "MLXRUNNER_COMPILED_DECODE": "0"},
    "mlx ops": {"MLXRUNNER_DECODE_ATTENTION": "sdpa", "MLXRUNNER_COMPILED_DECODE": "1"},
}


def prompt(length: int, seed: int, vocab: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % (vocab - 10) + 5 for i in range(length)]


def run(loaded: Any, vocab: int) -> Tokens:
    """The schedule above; every sequence's tokens."""
    from runtime.engine.model_engine import ModelEngine
    from runtime.engine.options import SamplingOptions
    from runtime.engine.protocol import PrefixReuse, SequenceRequest

    greedy = SamplingOptions(temperature=0.0, repeat_penalty=1.0)
    engine = ModelEngine(loaded, prefill_chunk=48)  # long prompts take several steps
    out: Tokens = {}

    def add(seq_id: int, tokens: list[int], max_tokens: int, reuse: Any = None) -> None:
        out[seq_id] = []
        engine.add(
            SequenceRequest(
                seq_id=seq_id,
                prompt=tuple(tokens),
                sampling=greedy,
                max_tokens=max_tokens,
                logit_bias=tuple((eos, -1e9) for eos in engine.tokenizer.eos_ids),
                reuse=reuse,
            )
        )

    saved = prompt(33, 3, vocab)
    add(0, prompt(100, 1, vocab), 40)
    add(1, prompt(7, 2, vocab), 70)
    add(2, saved, 12)
    step = 0
    while engine.has_work():
        for event in engine.step():
            if event.token is not None:
                out[event.seq_id].append(event.token)
            if event.finish is not None:
                engine.remove(event.seq_id, save_as=7 if event.seq_id == 2 else None)
                if event.seq_id == 2:  # a hit on the saved prompt, beside running rows
                    add(4, [*saved, 11, 12, 13], 25, PrefixReuse(entry_id=7, length=len(saved)))
        step += 1
        if step == 5:
            add(3, prompt(200, 4, vocab), 30)  # read in chunks while three rows decode
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(random_llama.CONFIGS), default="1b")
    args = parser.parse_args()

    import mlx.core as mx

    from runtime.engine import decode_attention

    config = random_llama.CONFIGS[args.size]
    weights = random_llama.random_weights(config, mx.float32)
    loaded = random_llama.loaded_in_memory(config, weights, name=args.size)
    vocab = int(config["vocab_size"])
    calls = [0]
    kernel = decode_attention.decode_attention

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return kernel(*args, **kwargs)

    decode_attention.decode_attention = counted
    results: dict[str, Tokens] = {}
    failed = False
    print(f"device {mx.default_device()}")
    for name, environment in MODES.items():
        os.environ.update(environment)
        calls[0] = 0
        results[name] = run(loaded, vocab)
        print(f"{name}: {calls[0]} calls to the kernel (a compiled step calls it when traced)")
        if name.startswith("kernel") and decode_attention.enabled() and not calls[0]:
            failed = True  # on CUDA the kernel must have run
    want = results["mlx ops"]
    for name, got in results.items():
        for seq_id, tokens in sorted(want.items()):
            mine = got.get(seq_id, [])
            pairs = enumerate(zip(mine, tokens, strict=False))  # lengths may differ too
            same = next((i for i, (a, b) in pairs if a != b), None)
            if same is None and len(mine) == len(tokens):
                print(f"{name:>16} seq {seq_id}: {len(tokens)} tokens, equal")
                continue
            failed = True
            print(f"{name:>16} seq {seq_id}: differs at token {same} of {len(tokens)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
