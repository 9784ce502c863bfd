"""Model sources (``runtime.models.source``, ``runtime.formats.model_files``): what a folder,
a GGUF file or a stored name resolves to, and that ``serve``, ``run``, ``import``, a load and
``show`` all see the same model through it: chat template, EOS ids, sampling defaults,
quantization and parameter count.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pytest

from actors.messages import ChatMessage, GenerateRequest, GenerationOptions
from actors.testing import read_to_end
from actors.tree import open_runner
from api.app import create_app
from cli import run as run_command
from cli import serve as serve_command
from cli.main import build_parser
from runtime.engine.model_engine import ModelEngine
from runtime.engine.options import SamplingOptions
from runtime.engine.protocol import FinishReason, SequenceRequest
from runtime.errors import ModelLoadError, ModelNotFoundError
from runtime.formats.model_files import POOLING_KEY, folder_files
from runtime.models.description import describe
from runtime.models.loader import load_model
from runtime.models.source import open_checkpoint
from runtime.store.importer import import_model
from runtime.store.layout import Store
from runtime.testing.models import make_tiny_folder, random_weights, tiny_config
from runtime.testing.tokenizers import CHAT_TEMPLATE, tokenizer_config, train_tokenizer
from runtime.text.chat_template import TemplateError
from tests import gguf_writer as gw

# Renders like the usual template, but refuses one message: a request with it fails only when
# this template, and not another one, is applied.
JINJA = (
    "{% for m in messages %}{% if m['content'] == 'which template?' %}"
    "{{ raise_exception('chat_template.jinja was used') }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GREEDY = SamplingOptions(temperature=0.0, repeat_penalty=1.0)


def _folder(path: Path, **files: str) -> Path:
    """A tiny model folder whose tokenizer_config has its own (ChatML) template, plus ``files``."""
    folder = make_tiny_folder(
        path, tokenizer_json=train_tokenizer(), tokenizer_config=tokenizer_config()
    )
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)
    return folder


@pytest.fixture(scope="module")
def jinja_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _folder(tmp_path_factory.mktemp("jinja") / "m", chat_template__jinja=JINJA)


# ---- folders ----


def test_chat_template_jinja_wins_over_tokenizer_config(jinja_folder: Path) -> None:
    assert tokenizer_config()["chat_template"] == CHAT_TEMPLATE != JINJA
    assert folder_files(jinja_folder).tokenizer_config["chat_template"] == JINJA


def test_legacy_chat_template_json_fills_in_only_when_nothing_else_does(tmp_path: Path) -> None:
    legacy = json.dumps({"chat_template": "{{ 'legacy' }}"})
    with_config = _folder(tmp_path / "a", chat_template__json=legacy)
    assert folder_files(with_config).tokenizer_config["chat_template"] == CHAT_TEMPLATE
    bare = make_tiny_folder(
        tmp_path / "b",
        tokenizer_json=train_tokenizer(),
        tokenizer_config={k: v for k, v in tokenizer_config().items() if k != "chat_template"},
    )
    (bare / "chat_template.json").write_text(legacy)
    assert folder_files(bare).tokenizer_config["chat_template"] == "{{ 'legacy' }}"
    (bare / "chat_template.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"chat_template\.json: no chat_template"):
        folder_files(bare)


def test_sampling_defaults_are_the_values_generation_config_states(tmp_path: Path) -> None:
    generation = {
        "do_sample": True,
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
        "repetition_penalty": 1.05,
        "max_new_tokens": 2048,
        "min_p": "0.1",  # not a number: ignored
    }
    folder = _folder(tmp_path / "m", generation_config__json=json.dumps(generation))
    expected = {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "repeat_penalty": 1.05}
    assert folder_files(folder).sampling_defaults == expected
    assert load_model(folder).sampling_defaults == expected
    store = Store(tmp_path / "models")
    import_model(folder, "t", store=store)
    assert describe("t", store=store).sampling_defaults == expected
    assert folder_files(make_tiny_folder(tmp_path / "none")).sampling_defaults == {}


# ---- what a source string means ----


@pytest.mark.parametrize("source", ["/nonexistent/model", "./missing", "weights.gguf", "~/nope"])
def test_missing_paths_say_so(source: str) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no such model folder or \.gguf file"):
        open_checkpoint(source)


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match=r"notes\.txt: not a model folder or a GGUF file"):
        open_checkpoint(tmp_path / "notes.txt")


def test_a_name_is_looked_up_in_the_store(tmp_path: Path, jinja_folder: Path) -> None:
    store = Store(tmp_path / "models")
    with pytest.raises(ModelNotFoundError, match="'tiny:latest' not found"):
        open_checkpoint("tiny", store=store)
    import_model(jinja_folder, "tiny", store=store)
    checkpoint = open_checkpoint("tiny", store=store)
    assert checkpoint.files.name == "tiny:latest"
    assert checkpoint.files.tokenizer_config["chat_template"] == JINJA  # carried by the import


# ---- serve and run use the folder's chat_template.jinja ----


def _args(command: str, *argv: str) -> argparse.Namespace:
    return build_parser().parse_args([command, *argv])


async def test_run_with_a_folder_uses_its_chat_template_jinja(jinja_folder: Path) -> None:
    args = _args("run", str(jinja_folder), "--chat", "which template?")
    with pytest.RaisesGroup(
        pytest.RaisesExc(TemplateError, match="jinja was used"), flatten_subgroups=True
    ):
        await run_command.run(
            args, run_command.build_request(args), out=io.StringIO(), err=io.StringIO()
        )
    args = _args("run", str(jinja_folder), "--chat", "--num-predict", "2", "hello")
    out = io.StringIO()
    code = await run_command.run(args, run_command.build_request(args), out=out, err=io.StringIO())
    assert code == 0


async def test_serve_with_a_folder_uses_its_chat_template_jinja(jinja_folder: Path) -> None:
    args = _args("serve", "--model", str(jinja_folder))
    async with open_runner(**serve_command.runner_options(args)) as runner:
        ready = await runner.wait_ready()
        app = create_app(runner, serve_command.api_config(args))
        async with app.test_app() as test_app:
            client = test_app.test_client()
            shown = await client.post("/api/show", json={"model": "m"})
            assert (await shown.get_json())["template"] == JINJA
            refused = await client.post(
                "/api/chat",
                json={
                    "model": "m",
                    "messages": [{"role": "user", "content": "which template?"}],
                    "stream": False,
                },
            )
            assert refused.status_code == 400
            assert "jinja was used" in (await refused.get_json())["error"]
        # A chat request's prompt is the jinja template's text.
        assert ready.tokenizer.chat_template == JINJA
        prompt = ready.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
        request = GenerateRequest(
            messages=(ChatMessage(role="user", content="hi"),),
            options=GenerationOptions(num_predict=1),
        )
        with await runner.submit(request) as generation:
            last = (await read_to_end(generation))[-1]
        assert last.prompt_eval_count == len(await runner.tokenize(prompt))


# ---- generation_config.json's EOS ids end generation ----


def _first_greedy_token(
    engine: ModelEngine, prompt: tuple[int, ...]
) -> tuple[int, FinishReason | None]:
    engine.add(SequenceRequest(seq_id=1, prompt=prompt, sampling=GREEDY, max_tokens=4))
    while engine.has_work():
        for event in engine.step():
            if event.token is not None:
                engine.remove(1)
                return event.token, event.finish
    raise AssertionError("no token")


def test_generation_config_eos_ids_end_generation(tmp_path: Path) -> None:
    folder = make_tiny_folder(tmp_path / "m", tokenizer_json=train_tokenizer(), tokenizer_config={})
    prompt = (5, 17, 42, 9)
    token, finish = _first_greedy_token(ModelEngine(load_model(folder)), prompt)
    assert finish is None  # an ordinary token for this model
    # The same weights, with that token as the second of generation_config's EOS ids.
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, token]}))
    loaded = load_model(folder)
    assert {3, token} <= loaded.tokenizer.eos_ids
    assert _first_greedy_token(ModelEngine(loaded), prompt) == (token, FinishReason.STOP)
    store = Store(tmp_path / "models")
    import_model(folder, "t", store=store)
    assert {3, token} <= load_model("t", store=store).tokenizer.eos_ids


# ---- import, load and show agree ----


def _gguf(path: Path) -> Path:
    """Mixed Q4_0/Q4_1/Q8_0/F16 tensors (``gguf_writer.mixed_types``)."""
    meta = gw.gpt2_tokenizer_metadata()
    config = tiny_config("llama", vocab_size=len(meta["tokenizer.ggml.tokens"]))
    weights = {k: np.array(v) for k, v in random_weights(config).items()}
    gw.write_model_gguf(path, config, weights, meta)
    return path


@pytest.mark.parametrize(
    ("kind", "quantize"),
    [("dense", None), ("mlx q4 g32", None), ("gguf", None), ("dense", "q8"), ("gguf", "f32")],
)
def test_import_load_and_show_agree(tmp_path: Path, kind: str, quantize: str | None) -> None:
    if kind == "gguf":
        source = _gguf(tmp_path / "m.gguf")
    else:
        source = make_tiny_folder(tmp_path / "m", quantize=(4, 32) if kind != "dense" else None)
    store = Store(tmp_path / "models")
    imported = import_model(source, "t", store=store, quantize=quantize)  # type: ignore[arg-type]
    stored = (
        imported.parameters,
        imported.quantization,
    )
    loaded = load_model("t", store=store)
    shown = describe("t", store=store)
    listed = {e.name: e for e in store.list_models()}["t:latest"]
    assert (loaded.parameters, loaded.quantization) == stored
    assert (shown.parameters, shown.quantization) == stored
    assert listed.quantization == imported.quantization
    if quantize is None:  # the source itself says the same
        direct = load_model(source)
        assert (direct.parameters, direct.quantization) == stored
        assert (describe(source).parameters, describe(source).quantization) == stored


def test_a_folder_pooling_survives_the_import_into_the_store(tmp_path: Path) -> None:
    folder = make_tiny_folder(tmp_path / "m")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_lasttoken": true}')
    store = Store(tmp_path / "models")
    import_model(folder, "t", store=store)
    assert load_model("t", store=store).config[POOLING_KEY] == "last"


async def test_generation_config_sampling_is_the_default_under_the_request(tmp_path: Path) -> None:
    generation = {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
    folder = _folder(tmp_path / "m", generation_config__json=json.dumps(generation))
    args = _args("serve", "--model", str(folder))
    async with open_runner(**serve_command.runner_options(args)) as runner:
        await runner.wait_ready()
        assert dict(runner.model_info().profile.parameters) == generation
        app = create_app(runner, serve_command.api_config(args))
        async with app.test_app() as test_app:
            client = test_app.test_client()
            shown = await (await client.post("/api/show", json={"model": "m"})).get_json()
            assert "temperature" in shown["parameters"]
            assert "0.6" in shown["parameters"]
