"""GGUF reading against mlx-lm on the default model (SmolLM2's GGUF): same greedy tokens.

mlx-lm loads ``write_folder`` of the same file (dequantized to float32, as our dense execution
uses it), so any difference is in our q/k un-permutation, config or model code, not in weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from runtime.formats.gguf import read_gguf, write_folder
from runtime.models.loader import load_model

PROMPT = "The capital of France is"
STEPS = 32


def _greedy(model: Any, prompt: list[int], cache: Any, steps: int) -> list[int]:
    out: list[int] = []
    logits = model(mx.array(prompt)[None], cache)
    for _ in range(steps):
        token = mx.argmax(logits[0, -1]).tolist()
        assert isinstance(token, int)
        out.append(token)
        logits = model(mx.array([token])[None], cache)
    return out


def test_greedy_tokens_match_mlx_lm(tmp_path: Path, default_gguf: Path) -> None:
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache

    ours = load_model(default_gguf, execution="dense")
    loaded = mlx_lm.load(str(write_folder(read_gguf(default_gguf), tmp_path, dequantize=True)))
    ref_model, ref_tokenizer = loaded[0], loaded[1]
    prompt = ref_tokenizer.encode(PROMPT)
    assert ours.tokenizer.encode(PROMPT) == prompt
    expected = _greedy(ref_model, prompt, make_prompt_cache(ref_model), STEPS)
    assert _greedy(ours.model, prompt, ours.model.make_cache(), STEPS) == expected
    assert "Paris" in ref_tokenizer.decode(expected)
