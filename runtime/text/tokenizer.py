"""The tokenizer of a loaded model: HF ``tokenizers`` plus the model's special-token rules.

Owns encoding (special tokens in the text are matched whole; BOS added once, when the model
asks for it), decoding, the end-of-sequence set, the chat template (the one
``tokenizer_config.json`` names, see ``chat_template.configured_template``), and streaming
detokenizers. EOS ids follow Ollama's priority: ``generation_config.json`` (all of its
``eos_token_id`` list), then ``config.json``, then ``tokenizer_config.json``'s ``eos_token``;
the common end-of-turn markers (``<|im_end|>``, ``<|eot_id|>``, ...) are added when the
vocabulary has them as special tokens, because chat models end their turn with them.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import tokenizers

from runtime.errors import ModelLoadError, OptionsError
from runtime.text import chat_template
from runtime.text.detokenizer import StreamingDetokenizer

if TYPE_CHECKING:
    from runtime.formats.model_files import ModelFiles

# End-of-turn markers of common chat formats (llama.cpp's end-of-generation list, in part).
END_OF_TURN = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<｜end▁of▁sentence｜>",
    "<|return|>",
)


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class Tokenizer:
    """A model's tokenizer; build it with ``from_parts`` or ``from_model_files``."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_id: int | None,
        eos_ids: frozenset[int],
        add_bos: bool,
        chat_template: str | None,
        bos_token: str = "",
        eos_token: str = "",
    ) -> None:
        self._tok = tokenizer
        added = tokenizer.get_added_tokens_decoder()
        # Ids run 0..n-1 in a well-formed tokenizer; added tokens may sit past a gap.
        self.vocab_size = max(
            tokenizer.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1
        )
        # No token stands for more characters than its vocabulary entry has (byte-level
        # entries spell one byte per character), so text longer than n times this cannot
        # fit in n tokens: requests are refused on that before they are tokenized.
        self.max_token_chars = max(
            (len(t) for t in tokenizer.get_vocab(with_added_tokens=True)), default=1
        )
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.bos_token = bos_token  # text given to chat templates as ``bos_token``
        self.eos_token = eos_token

    @classmethod
    def from_model_files(cls, files: ModelFiles) -> Tokenizer:
        return cls.from_parts(
            files.tokenizer_json,
            files.tokenizer_config,
            generation_config=files.generation_config,
            config=files.config,
        )

    @classmethod
    def from_parts(
        cls,
        tokenizer_json: str,
        tokenizer_config: Mapping[str, Any],
        *,
        generation_config: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> Tokenizer:
        try:
            tok = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # tokenizers raises its own untyped exception
            raise ModelLoadError(f"tokenizer.json: cannot parse ({exc})") from exc

        def lookup(key: str) -> int | None:
            text = _token_text(tokenizer_config.get(key))
            return tok.token_to_id(text) if text is not None else None

        eos: list[int] = []
        for source in (generation_config or {}, config or {}):
            eos = _ids(source.get("eos_token_id"))
            if eos:
                break
        if not eos:
            found = lookup("eos_token")
            eos = [found] if found is not None else []
        specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        for marker in END_OF_TURN:
            marker_id = tok.token_to_id(marker)
            if marker in specials and marker_id is not None:
                eos.append(marker_id)

        # The template's ``bos_token`` is tokenizer_config's, as in transformers; the
        # model configs only fill in when it names none.
        bos = lookup("bos_token")
        if bos is None:
            for source in (generation_config or {}, config or {}):
                found_bos = _ids(source.get("bos_token_id"))
                if found_bos:
                    bos = found_bos[0]
                    break
        add_bos = tokenizer_config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            # The tokenizer's own post-processor says whether it prefixes BOS.
            probe = tok.encode("a", add_special_tokens=True).ids
            add_bos = bos is not None and bool(probe) and probe[0] == bos
        template = chat_template.configured_template(tokenizer_config)
        eos_text = _token_text(tokenizer_config.get("eos_token"))
        if eos_text is None and eos:
            eos_text = tok.id_to_token(eos[0])
        bos_text = tok.id_to_token(bos) if bos is not None else None
        return cls(
            tok,
            bos_id=bos,
            eos_ids=frozenset(eos),
            add_bos=bool(add_bos),
            chat_template=template,
            bos_token=bos_text or "",
            eos_token=eos_text or "",
        )

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        want_bos = self.add_bos if add_bos is None else add_bos
        if want_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def _check(self, ids: Sequence[int]) -> list[int]:
        out: list[int] = []
        for t in ids:
            try:
                if isinstance(t, bool):
                    raise TypeError
                value = operator.index(t)  # ints, numpy integers
            except TypeError:
                raise OptionsError(f"token ids must be integers, got {t!r}") from None
            if not 0 <= value < self.vocab_size:
                raise OptionsError(
                    f"token id {value} is outside the vocabulary (0..{self.vocab_size - 1})"
                )
            out.append(value)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(self._check(ids), skip_special_tokens=False))

    def _decode_unchecked(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=False))

    def piece(self, token: int) -> str:
        """The text of one token, for logprobs; part of a character shows as U+FFFD.

        SentencePiece decoders strip the leading space of the first token decoded; a
        token's own piece keeps it (``"▁Paris"`` is ``" Paris"``), as llama.cpp shows it.
        """
        text = self.decode([token])
        raw = self._tok.id_to_token(token)
        if raw is not None and raw.startswith("▁") and not text.startswith(" "):
            text = " " + text
        return text

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry spelled ``token`` (``"<0x0A>"``, ``"<|im_end|>"``)."""
        found = self._tok.token_to_id(token)
        return int(found) if found is not None else None

    def to_json(self) -> str:
        """The HF ``tokenizers`` definition (tokenizer.json), for libraries that build their own
        view of the vocabulary (the structured-output grammar)."""
        return str(self._tok.to_str())

    def detokenizer(self, context: Sequence[int] = ()) -> StreamingDetokenizer:
        return StreamingDetokenizer(self._decode_unchecked, self._check(context))

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        return chat_template.render(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            tools=tools,
            **extra,
        )
