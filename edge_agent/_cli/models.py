"""``edge-agent models``: the model store."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import model_store, parse_dims_list


def cmd_models_prepare_default(args: argparse.Namespace) -> int:
    from ..models import prepare_default

    store = model_store(args)
    manifest = prepare_default(store)
    print(f"{manifest.name}: {len(manifest.files)} files in {store.model_dir(manifest.name)}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    manifests = model_store(args).list()
    if args.json:
        print(json.dumps([m.to_json() for m in manifests], indent=2))
        return 0
    if not manifests:
        print(f"no models in {args.models_dir} (run: edge-agent models prepare-default)")
        return 0
    print(f"{'model':<28} {'arch':<10} {'dims':>5} {'pool':<5} {'max tok':>7}  quants (MB)")
    for m in manifests:
        quants = ", ".join(f"{q} {f.size / 1e6:.1f}" for q, f in m.files.items())
        print(
            f"{m.name:<28} {m.architecture:<10} {m.dims:>5} {m.pooling:<5}"
            f" {m.max_tokens:>7}  {quants}"
        )
    return 0


def cmd_models_import(args: argparse.Namespace) -> int:
    manifest = model_store(args).import_gguf(
        Path(args.path),
        name=args.name,
        query_template=args.query_template,
        document_template=args.document_template,
        matryoshka_dims=args.matryoshka_dims,
    )
    print(
        f"imported {args.path} as {manifest.name} ({manifest.architecture}, {manifest.dims} dims,"
        f" {manifest.pooling} pooling, quants: {', '.join(manifest.files)})"
    )
    return 0


def cmd_models_convert(args: argparse.Namespace) -> int:
    from ..models.convert_hf import convert_model

    store = model_store(args)
    manifest = convert_model(store, Path(args.dir), name=args.name, quants=args.quants)
    sizes = ", ".join(f"{q} {f.size / 1e6:.1f} MB" for q, f in manifest.files.items())
    print(
        f"{manifest.name}: {manifest.architecture}, {manifest.dims} dims, {manifest.pooling}"
        f" pooling, {manifest.max_tokens} max tokens; {sizes} in {store.model_dir(manifest.name)}"
    )
    return 0


def _quant_list(value: str) -> tuple[str, ...]:
    return tuple(q.strip().upper() for q in value.split(",") if q.strip())


def cmd_models_pull(args: argparse.Namespace) -> int:
    from ..models.pull import pull_gguf

    manifest = pull_gguf(model_store(args), args.url, args.sha256, name=args.name)
    print(f"pulled {manifest.name} (quants: {', '.join(manifest.files)})")
    return 0


def cmd_models_verify(args: argparse.Namespace) -> int:
    results = model_store(args).verify_all(args.name)
    for quant, status in results.items():
        print(f"{quant:<8} {status}")
    return 0 if all(status == "ok" for status in results.values()) else 1


def add_models_parser(commands: Any) -> None:
    """``models`` and its sub-commands."""
    models = commands.add_parser("models", help="manage the model store")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    p = model_commands.add_parser("prepare-default", help="build the default model (idempotent)")
    p.set_defaults(func=cmd_models_prepare_default)
    p = model_commands.add_parser("list", help="models, their quants and sizes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models_list)
    p = model_commands.add_parser("import", help="register a GGUF file")
    p.add_argument("path")
    p.add_argument("--name")
    p.add_argument("--query-template", help='e.g. "Instruct: {task}\\nQuery:{text}"')
    p.add_argument("--document-template")
    p.add_argument("--matryoshka-dims", type=parse_dims_list, help="e.g. 64,128,256")
    p.set_defaults(func=cmd_models_import)
    from ..models.quantize import CONVERT_QUANTS

    p = model_commands.add_parser(
        "convert",
        help="convert a Hugging Face / sentence-transformers directory (BERT, Qwen3)",
    )
    p.add_argument("dir", help="directory with config.json, tokenizer files, *.safetensors")
    p.add_argument("--name", help="model name in the store (default: the directory's name)")
    p.add_argument(
        "--quants",
        type=_quant_list,
        default=CONVERT_QUANTS,
        help=f"comma-separated (default: {','.join(CONVERT_QUANTS)})",
    )
    p.set_defaults(func=cmd_models_convert)
    p = model_commands.add_parser("pull", help="download a GGUF, verify it, register it")
    p.add_argument("url")
    p.add_argument("--sha256", required=True)
    p.add_argument("--name")
    p.set_defaults(func=cmd_models_pull)
    p = model_commands.add_parser("verify", help="re-hash every file of a model")
    p.add_argument("name")
    p.set_defaults(func=cmd_models_verify)
