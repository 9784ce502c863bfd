"""The parsers of the commands that work on the model store and on a running server's models:
``import``, ``list``, ``show``, ``rm``, ``pull``, ``cp``, ``create`` and ``ps`` (their help
texts and options; ``cli.main`` builds the whole parser and dispatches).
"""

from __future__ import annotations

import argparse

from cli.numbers import integer


def add_store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models-dir",
        default=None,
        metavar="DIR",
        help="the model store to use (default: $MLXRUNNER_HOME/models, or ~/.mlxrunner/models)",
    )


def add_store_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    imp = sub.add_parser(
        "import",
        help="import a model folder or GGUF file into the store",
        description="Copy a model into the store under NAME: an HF/MLX model folder (config.json, "
        "*.safetensors, tokenizer.json), a .gguf file, or a model already in the store (to "
        "re-quantize it). The tensors are checked as a load checks them.",
    )
    imp.add_argument("source", metavar="SOURCE", help="model folder, .gguf file or stored name")
    imp.add_argument("name", metavar="NAME[:TAG]", help="name in the store (tag: latest)")
    imp.add_argument(
        "--quantize",
        choices=["q4", "q8", "f32"],
        default=None,
        help="re-quantize to 4 or 8 bits, or dequantize to float32 (default: keep the "
        "source's encoding)",
    )
    imp.add_argument(
        "--group-size",
        type=int,
        choices=[32, 64],
        default=None,
        help="values per quantization group with --quantize q4/q8 (default: 64)",
    )
    add_store_arg(imp)

    lst = sub.add_parser(
        "list",
        help="list the models in the store",
        description="List the models in the store: name, id, size, quantization, age.",
    )
    add_store_arg(lst)

    show = sub.add_parser(
        "show",
        help="describe a model",
        description="Describe a model: architecture, parameters, context length, "
        "quantization, generation defaults and chat template.",
    )
    show.add_argument("name", metavar="NAME|PATH", help="stored name, model folder or .gguf file")
    add_store_arg(show)

    rm = sub.add_parser(
        "rm",
        help="remove a model from the store",
        description="Remove a model from the store, and the blobs no other model uses.",
    )
    rm.add_argument("name", metavar="NAME[:TAG]", help="the model to remove")
    add_store_arg(rm)


def add_ps(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], *, host: str, port: int
) -> None:
    ps = sub.add_parser(
        "ps",
        help="show what a running server has loaded",
        description="Ask a running `mlxrunner serve` which model it has loaded (Ollama's "
        "/api/ps) and print its name, id, size and context length. Sends $MLXRUNNER_API_KEY "
        "when the server wants a key.",
    )
    ps.add_argument("--host", default=host, help="the server's address (default: %(default)s)")
    ps.add_argument(
        "--port",
        type=integer(1, 65535),
        default=port,
        help="the server's port (default: %(default)s)",
    )


def add_pull(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pull = sub.add_parser(
        "pull",
        help="download a model from Ollama's registry or the Hugging Face hub",
        description="Download NAME[:TAG] from Ollama's registry (registry.ollama.ai) into the "
        "store, or hf.co/ORG/REPO[:REVISION] (a safetensors/MLX model folder) from the Hugging "
        "Face hub through its cache, then import it. An interrupted pull resumes where it "
        "stopped; every blob's sha256 is checked.",
    )
    pull.add_argument(
        "name", metavar="NAME[:TAG]", help="e.g. smollm2:135m, or hf.co/ORG/REPO[:REVISION]"
    )
    pull.add_argument(
        "--registry",
        default=None,
        metavar="URL",
        help="where to reach registry.ollama.ai's models instead, e.g. http://127.0.0.1:8080 "
        "(default: $MLXRUNNER_REGISTRY, else https://registry.ollama.ai)",
    )
    pull.add_argument(
        "--insecure",
        action="store_true",
        help="reach a registry named in NAME (host/namespace/name:tag) over plain HTTP",
    )
    add_store_arg(pull)


def add_manage_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cp = sub.add_parser(
        "cp",
        help="copy a model under another name",
        description="Copy a stored model under another name; the copy shares its blobs.",
    )
    cp.add_argument("source", metavar="SRC", help="the stored model to copy")
    cp.add_argument("destination", metavar="DST", help="the new name")
    add_store_arg(cp)

    create = sub.add_parser(
        "create",
        help="create a model from another, a GGUF file or a folder",
        description="Create NAME in the store from a stored model, a .gguf file or an HF/MLX "
        "model folder, with its own system prompt, chat template, parameters and messages "
        "(the defaults a server serving it applies; a request's own values win).",
    )
    create.add_argument("name", metavar="NAME[:TAG]", help="the model to create")
    create.add_argument(
        "--from",
        "-f",
        dest="source",
        required=True,
        metavar="SRC",
        help="stored model name, .gguf file or model folder",
    )
    create.add_argument("--system", help="the system prompt")
    create.add_argument("--template", metavar="FILE", help="a Jinja chat template file")
    create.add_argument(
        "--parameter",
        action="append",
        metavar="KEY=VALUE",
        help="a default option, e.g. temperature=0.2 or stop='<|end|>' (repeatable)",
    )
    create.add_argument(
        "--message",
        action="append",
        metavar="ROLE:TEXT",
        help="a message the conversation starts with, e.g. 'user:hi' (repeatable)",
    )
    create.add_argument(
        "--quantize",
        choices=["q4", "q8", "f32"],
        default=None,
        help="re-quantize (an import; default: keep the source's encoding)",
    )
    add_store_arg(create)
