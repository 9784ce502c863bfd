"""OpenAI request features beyond plain sampling: ``logit_bias``, ``echo``, ``best_of`` and
``suffix`` (their fields, checks and limits), kept apart from the routes in ``api/openai.py``.

- ``logit_bias``: a map of token id (a decimal string, as JSON keys are) -> a bias in
  [-100, 100] added to that token's raw logit at every step, greedy or sampled; at most
  ``MAX_LOGIT_BIAS`` entries (OpenAI's 300). Ids past the vocabulary are refused by the engine
  (400). Logprobs are those of the biased logits.
- ``echo`` (completions): the prompt text comes back before the completion (in the first
  streamed chunk). Prompt logprobs would need the logits of every prompt position, which the
  engine does not compute, and the routes hold no tokenizer: ``echo`` with ``logprobs``, or
  with a prompt of token ids, is a 400.
- ``best_of``: only ``best_of == n`` (or absent) is accepted: every choice is returned.
- ``suffix``: insertion is not supported: only empty or absent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from api import fields
from api.errors import bad_request

MAX_LOGIT_BIAS = 300
MAX_BIAS = 100.0


def _logit_bias(body: Mapping[str, Any], key: str) -> tuple[tuple[int, float], ...]:
    value = body.get(key)
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise bad_request(f"'{key}' must be an object of token id -> bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise bad_request(f"'{key}' may have at most {MAX_LOGIT_BIAS} entries")
    out = []
    for token, bias in value.items():
        if not (isinstance(token, str) and token.isascii() and token.isdigit() and len(token) < 11):
            raise bad_request(f"'{key}' keys must be token ids (decimal strings), got {token!r}")
        if isinstance(bias, bool) or not isinstance(bias, int | float):
            raise bad_request(f"'{key}' values must be numbers")
        if not (math.isfinite(bias) and -MAX_BIAS <= bias <= MAX_BIAS):
            raise bad_request(f"'{key}' values must be in [-{MAX_BIAS:g}, {MAX_BIAS:g}]")
        out.append((int(token), float(bias)))
    return tuple(out)


LOGIT_BIAS = fields.field(
    "logit_bias",
    {
        "type": ["object", "null"],
        "maxProperties": MAX_LOGIT_BIAS,
        "propertyNames": {"pattern": "^[0-9]{1,10}$"},
        "additionalProperties": {"type": "number", "minimum": -MAX_BIAS, "maximum": MAX_BIAS},
    },
    _logit_bias,
    description="token id -> bias added to its logit (logprobs are of the biased logits)",
)
ECHO = fields.boolean("echo", False, description="the prompt text before the completion")
SUFFIX = fields.field(
    "suffix",
    {"type": ["string", "null"], "maxLength": 0},
    fields.string("suffix").reader,
    description="not supported: only empty",
)
BEST_OF = fields.integer("best_of", lo=1, description="only equal to n: every choice is returned")


def echo_text(body: Mapping[str, Any], prompt: str | None, logprobs: bool) -> str:
    """The text ``echo`` puts before the completion ("" without echo)."""
    if not ECHO.read(body):
        return ""
    if logprobs:
        raise bad_request("'echo' with 'logprobs' (prompt logprobs) is not supported")
    if prompt is None:
        raise bad_request("'echo' needs a text prompt (not token ids) on this server")
    return prompt


def check_unsupported(body: Mapping[str, Any], n: int) -> None:
    """The 400s of completions' options this server does not implement."""
    if SUFFIX.read(body):
        raise bad_request("'suffix' is not supported by this server")
    best_of = BEST_OF.read(body)
    if best_of is not None and best_of != n:
        raise bad_request("'best_of' other than n is not supported by this server")
