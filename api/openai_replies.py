"""OpenAI's reply bodies: the completion object and its choices, as each endpoint shapes them.

``ReplyShape`` renders one request's choices: a chat completion's ``message`` (or, streaming,
its ``delta``) with the reasoning and tool calls, or a text completion's ``text`` with the
echoed prompt before its first piece; logprobs in the endpoint's own form (chat: a
``content`` list; text: parallel lists with each token's offset in the choice's text). Every
object carries the request's one id, creation time and the ``system_fingerprint``.
``sse_event`` frames a streamed object, or ``[DONE]``, as a server-sent event.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from actors.messages import Chunk, DoneReason, Logprob

# A cut generation has no finish reason: its stream ends with an error event instead.
FINISH_REASONS = {DoneReason.STOP: "stop", DoneReason.LENGTH: "length"}
_FINGERPRINT = "fp_mlxrunner"


def sse_event(obj: dict[str, Any] | str) -> bytes:
    """``obj`` (compact JSON, or a literal such as ``[DONE]``) as one server-sent event."""
    data = (
        obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    )
    return f"data: {data}\n\n".encode()


def finish_reason(chunk: Chunk) -> str:
    """OpenAI's ``finish_reason`` for a generation's last chunk (no reason: it stopped)."""
    return FINISH_REASONS[chunk.done_reason if chunk.done_reason is not None else DoneReason.STOP]


def _chat_logprobs(logprobs: list[Logprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.token.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": p, "bytes": list(t.encode())} for t, p in lp.top
                ],
            }
            for lp in logprobs
        ]
    }


def _text_logprobs(logprobs: list[Logprob], offset: int) -> dict[str, Any]:
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [dict(lp.top) for lp in logprobs],
        "text_offset": offsets,
    }


class ReplyShape:
    """How one endpoint renders choices: chat (message/delta) or text completion."""

    def __init__(self, *, chat: bool, name: str, logprobs: bool, echo: str = "") -> None:
        self.chat = chat
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.name = name
        self.logprobs = logprobs
        self.text_offset: dict[int, int] = {}  # per choice
        self.echo = echo  # completions' echo: put before each choice's first text
        self.echoed: set[int] = set()

    def envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.name,
            "system_fingerprint": _FINGERPRINT,
            "choices": choices,
        }

    def logprobs_json(self, logprobs: list[Logprob], index: int) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        if self.chat:
            return _chat_logprobs(logprobs)
        offset = self.text_offset.get(index, 0)
        self.text_offset[index] = offset + sum(len(lp.token) for lp in logprobs)
        return _text_logprobs(logprobs, offset)

    def choice(
        self,
        index: int,
        text: str,
        logprobs: list[Logprob],
        finish: str | None,
        *,
        delta: bool,
        thinking: str = "",
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"index": index}
        if self.chat:
            key = "delta" if delta else "message"
            if not delta:  # a reply of calls only has null content, as OpenAI's
                body[key] = {"role": "assistant", "content": text or (None if tool_calls else "")}
            else:  # the role was named by the first delta of the stream
                body[key] = {"content": text} if text else {}
            if thinking:  # a thinking model's <think> block, as vLLM and DeepSeek name it
                body[key]["reasoning_content"] = thinking
            if tool_calls:
                body[key]["tool_calls"] = tool_calls
        else:
            echo = "" if index in self.echoed else self.echo
            self.echoed.add(index)
            body["text"] = echo + text
        body["logprobs"] = self.logprobs_json(logprobs, index)
        body["finish_reason"] = finish
        return body
