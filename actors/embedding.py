"""An embedding request's inputs as token ids, within the request's bounds (a worker thread).

``prepare_inputs`` tokenizes the texts (no chat template, no special tokens added beyond what
the tokenizer's ``encode`` adds), cuts or refuses inputs longer than the context (``truncate``,
as Ollama does), and refuses requests over ``MAX_INPUTS`` inputs or ``MAX_TOTAL_TOKENS`` tokens
(OpenAI's limits), so one request cannot hold the engine for long.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from actors.messages import EmbedRequest
from runtime.errors import OptionsError, PromptError, PromptTooLongError

if TYPE_CHECKING:
    from runtime.text.tokenizer import Tokenizer

MAX_INPUTS = 2048
MAX_TOTAL_TOKENS = 300_000


def prepare_inputs(
    request: EmbedRequest, tokenizer: Tokenizer, context_length: int, hidden_size: int
) -> tuple[tuple[int, ...], ...]:
    if len(request.inputs) > MAX_INPUTS:
        raise PromptError(f"too many inputs ({len(request.inputs)}; at most {MAX_INPUTS})")
    dims = request.dimensions
    if dims is not None and not 1 <= dims <= (hidden_size or dims):
        raise OptionsError(f"dimensions must be between 1 and {hidden_size} for this model")
    out: list[tuple[int, ...]] = []
    total = 0
    for i, item in enumerate(request.inputs):
        tokens = tuple(tokenizer.encode(item)) if isinstance(item, str) else item
        if not tokens:
            raise PromptError(f"input {i} is empty")
        if len(tokens) > context_length:
            if not request.truncate:
                raise PromptError(
                    f"input {i} length ({len(tokens)} tokens) exceeds the context length "
                    f"({context_length} tokens); set truncate to cut it"
                )
            tokens = tokens[:context_length]
        total += len(tokens)
        if total > MAX_TOTAL_TOKENS:
            raise PromptTooLongError(
                f"the inputs hold more than {MAX_TOTAL_TOKENS} tokens in all; send fewer"
            )
        out.append(tokens)
    return tuple(out)
