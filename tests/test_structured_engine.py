"""Structured output below the HTTP layer: compiling formats, preparing a request with one, and
constrained rows batched with free ones on a tiny real model (random weights, so only the
grammar can make its output JSON)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs
import pytest

from actors.messages import ChatMessage, GenerateRequest
from actors.pipeline import prepare
from runtime.engine.model_engine import ModelEngine
from runtime.engine.options import SamplingOptions
from runtime.engine.protocol import FinishReason, SequenceRequest, TokenEvent
from runtime.errors import OptionsError
from runtime.models.loader import LoadedModel, load_model
from runtime.testing.models import make_tiny_folder
from runtime.testing.tokenizers import tokenizer_config, train_tokenizer
from runtime.text.structured import Constraint, OutputFormat, compile_format
from runtime.text.tokenizer import Tokenizer

GREEDY = SamplingOptions(temperature=0.0, repeat_penalty=1.0)
HOT = SamplingOptions(temperature=1.5, top_k=0, top_p=1.0, seed=7)
FREE = SamplingOptions(temperature=1.0, seed=3)
PROMPT = (12, 300, 8, 9, 41)

SMALL = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "size": {"enum": ["S", "M", "L"]},
    },
    "required": ["ok", "size"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(make_tiny_folder(tmp_path_factory.mktemp("tiny") / "m", "llama"))


def _constraint(loaded: LoadedModel, schema: dict[str, Any] | None) -> Constraint:
    fmt = OutputFormat.json_object() if schema is None else OutputFormat.json_schema(schema)
    return compile_format(fmt, loaded.tokenizer)


def _run(engine: ModelEngine, requests: list[SequenceRequest]) -> dict[int, list[TokenEvent]]:
    for request in requests:
        engine.add(request)
    events: dict[int, list[TokenEvent]] = {r.seq_id: [] for r in requests}
    waiting = set(events)
    for _ in range(400):
        if not waiting:
            return events
        for event in engine.step():
            events[event.seq_id].append(event)
            if event.finish is not None:
                waiting.discard(event.seq_id)
    raise AssertionError(f"{waiting} never finished")


def _text(loaded: LoadedModel, events: list[TokenEvent]) -> str:
    tokens = [e.token for e in events if e.token is not None]
    if events[-1].finish is FinishReason.STOP:
        tokens = tokens[:-1]  # the EOS that ended it
    return loaded.tokenizer.decode(tokens)


def test_invalid_schemas_are_option_errors_that_say_why(loaded: LoadedModel) -> None:
    with pytest.raises(OptionsError, match="invalid JSON schema: Invalid type: nope"):
        _constraint(loaded, {"type": "nope"})
    with pytest.raises(OptionsError, match="unclosed group"):
        _constraint(loaded, {"type": "string", "pattern": "("})
    with pytest.raises(OptionsError, match="does not exist"):
        _constraint(loaded, {"$ref": "#/definitions/missing"})
    # strict refuses what it cannot enforce; OpenAI's strict: false ignores it
    odd = {"type": "object", "properties": {"a": {"type": "string", "format": "shoe-size"}}}
    with pytest.raises(OptionsError, match="Unknown format"):
        _constraint(loaded, odd)
    compile_format(OutputFormat.json_schema(odd, strict=False), loaded.tokenizer)


def test_constrained_rows_keep_to_their_schemas_beside_a_free_row(loaded: LoadedModel) -> None:
    """One batch: a free seeded row, a greedy row and a hot sampled row under a schema, and one
    under "any JSON object". Each constrained row that ends by EOS is valid JSON matching its
    schema; the free row draws exactly what it draws alone (the masks never reach it)."""
    alone = _run(
        ModelEngine(loaded, prefill_chunk=8),
        [SequenceRequest(seq_id=1, prompt=PROMPT, sampling=FREE, max_tokens=40)],
    )[1]
    schema = _constraint(loaded, SMALL)
    requests = [
        SequenceRequest(seq_id=1, prompt=PROMPT, sampling=FREE, max_tokens=40),
        SequenceRequest(
            seq_id=2, prompt=PROMPT, sampling=GREEDY, max_tokens=200, constraint=schema
        ),
        SequenceRequest(seq_id=3, prompt=PROMPT, sampling=HOT, max_tokens=200, constraint=schema),
        SequenceRequest(
            seq_id=4,
            prompt=PROMPT,
            sampling=HOT,
            max_tokens=12,
            constraint=_constraint(loaded, None),
        ),
    ]
    events = _run(ModelEngine(loaded, prefill_chunk=8), requests)
    assert [e.token for e in events[1]] == [e.token for e in alone]
    validator = jsonschema_rs.validator_for(SMALL)
    for seq_id in (2, 3):
        assert events[seq_id][-1].finish is FinishReason.STOP
        reply = json.loads(_text(loaded, events[seq_id]))
        validator.validate(reply)
    # "any object", cut by its length: what it wrote is the start of one
    assert events[4][-1].finish is FinishReason.LENGTH
    assert _text(loaded, events[4]).lstrip().startswith("{")


def test_without_the_grammar_the_tiny_model_writes_no_json(loaded: LoadedModel) -> None:
    """The control for the test above: the same rows unconstrained do not parse."""
    events = _run(
        ModelEngine(loaded, prefill_chunk=8),
        [SequenceRequest(seq_id=2, prompt=PROMPT, sampling=GREEDY, max_tokens=30)],
    )
    with pytest.raises(ValueError, match="Expecting value"):
        json.loads(_text(loaded, events[2]))


def test_format_turns_thinking_off_and_refuses_think_true() -> None:
    """The grammar holds from the first token, so a thinking template is rendered with
    thinking off (Qwen3's writes an empty block); asking for both is a 400-class error."""
    template = (
        "{% for m in messages %}{{ m.content }}{% endfor %}"
        "{% if enable_thinking is defined and enable_thinking is false %}<think></think>"
        "{% else %}<think>{% endif %}"
    )
    tok = Tokenizer.from_parts(train_tokenizer(), tokenizer_config(chat_template=template))
    messages = (ChatMessage(role="user", content="hi"),)
    fmt = OutputFormat.json_object()
    plain = prepare(GenerateRequest(messages=messages, separate_thinking=True), tok, 512)
    assert plain.opens_thinking
    assert plain.constraint is None
    shaped = prepare(
        GenerateRequest(messages=messages, separate_thinking=True, format=fmt), tok, 512
    )
    assert tok.decode(list(shaped.prompt)).endswith("<think></think>")
    assert not shaped.thinking
    assert shaped.constraint is not None
    with pytest.raises(OptionsError, match="cannot be combined with thinking"):
        prepare(GenerateRequest(messages=messages, think=True, format=fmt), tok, 512)


def test_objects_that_list_their_properties_get_no_others() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}},
        "$defs": {"Open": {"type": "object", "properties": {}, "additionalProperties": True}},
        "anyOf": [{"properties": {"c": {}}}, {"type": "object"}],
    }
    closed = json.loads(OutputFormat.json_schema(schema).source)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["$defs"]["Open"]["additionalProperties"] is True
    assert closed["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in closed["anyOf"][1]  # "any object" stays open
    assert list(closed["properties"]) == ["a"]


def test_sampler_masks_constrained_rows_only_and_leaves_the_logits_alone() -> None:
    """Row 0 free, row 1 under a schema: row 1 draws what its grammar allows, row 0 what the
    logits say; the caller's logits array is not written (its logprobs are read from it). A
    token outside the grammar (a caller's bug) leaves only EOS allowed."""
    import mlx.core as mx
    import numpy as np

    from runtime.engine.batch_sampler import BatchSampler

    tok = Tokenizer.from_parts(train_tokenizer(), tokenizer_config())
    constraint = compile_format(OutputFormat.json_schema({"enum": ["yes"]}), tok)
    vocab = tok.vocab_size + 7  # a model may have more logits than its tokenizer has tokens
    sampler = BatchSampler(vocab_size=vocab, context_length=64)
    sampler.add(0, GREEDY, [1, 2])
    sampler.add(1, GREEDY, [1, 2], constraint=constraint)
    favourite = tok.encode("Paris")[0]
    raw = np.zeros((2, vocab), dtype=np.float32)
    raw[:, favourite] = 50.0
    raw[:, vocab - 1] = 40.0  # past the tokenizer: never allowed to row 1
    logits = mx.array(raw)
    written: list[int] = []
    for _ in range(8):
        tokens = sampler.sample(logits, [0, 1])
        sampler.accept([0, 1], tokens)
        pair: list[int] = tokens.tolist()  # type: ignore[assignment]
        assert pair[0] == favourite
        written.append(pair[1])
        if pair[1] in tok.eos_ids:
            break
    assert np.array_equal(np.array(logits), raw)
    assert written[-1] in tok.eos_ids
    assert json.loads(tok.decode(written[:-1])) == "yes"

    sampler.add(2, GREEDY, [1, 2], constraint=constraint)
    sampler.accept([2], mx.array([favourite]))  # not a JSON start
    ended: list[int] = sampler.sample(mx.array(raw[:1]), [2]).tolist()  # type: ignore[assignment]
    assert ended[0] in tok.eos_ids
