"""CLI commands of the model registry: ``models add|list|remove``.

The registry is a directory on the coordinator's host (``catalog_dir``); these commands
work on it directly, and a running coordinator picks changes up within a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from coordinator.catalog import Catalog, CatalogEntry
from protocol import OffloadError, TensorSpec

EXIT_OK, EXIT_FAILED = 0, 1


def add_parsers(sub: Any) -> None:  # sub: argparse's private _SubParsersAction
    sp = sub.add_parser(
        "models",
        help="the coordinator's model registry: add, list, remove",
        description="Models registered here are sent over MQTT to the agents that need "
        "them (verified by sha256, kept in each agent's model cache). Run on the "
        "coordinator's host; a running coordinator sees changes within a second.",
    )
    msub = sp.add_subparsers(dest="models_action", required=True, metavar="ACTION")

    def catalog_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--catalog",
            type=Path,
            metavar="DIR",
            help="registry directory (default: the coordinator's catalog_dir: "
            "$XDG_DATA_HOME/edge-offload/models)",
        )
        p.add_argument("--config", type=Path, help="TOML file with a [coordinator] table")

    ap = msub.add_parser("add", help="register an ONNX file (copied into the registry)")
    catalog_option(ap)
    ap.add_argument("file", type=Path)
    ap.add_argument("--id", dest="model_id", help="model id (default: the file name's stem)")
    ap.add_argument("--version", help="version (default: one more than the highest registered)")
    ap.add_argument("--source", default="", help="where the model comes from")
    ap.add_argument("--licence", "--license", dest="licence", default="", help="its licence")
    ap.add_argument("--description", default="")
    ap.add_argument(
        "--batch-axis",
        default="auto",
        help="axis along which inputs are split and outputs concatenated, or 'none' to run "
        "one item per microtask (default auto: 0 when every output and an input lead "
        "with a dynamic or size-1 dimension)",
    )
    ap.add_argument("--json", action="store_true", help="print the entry as JSON")
    ap.set_defaults(func=cmd_models_add)

    lp = msub.add_parser("list", help="registered models")
    catalog_option(lp)
    lp.add_argument("--json", action="store_true")
    lp.set_defaults(func=cmd_models_list)

    rp = msub.add_parser("remove", help="unregister a model (every version, or ID@VERSION)")
    catalog_option(rp)
    rp.add_argument("model", metavar="ID[@VERSION]")
    rp.set_defaults(func=cmd_models_remove)


def _catalog(args: argparse.Namespace) -> Catalog:
    from coordinator.config import CoordinatorConfig

    root = CoordinatorConfig.load(args.config, catalog_dir=args.catalog).catalog_dir
    if root is None:
        raise OffloadError(
            "the coordinator's catalog_dir is 'none': no registry", code="bad_request"
        )
    return Catalog(root)


def _axis(text: str) -> int | str | None:
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    if text.isdigit():
        return int(text)
    raise OffloadError(
        f"--batch-axis {text!r}: give a number, 'none' or 'auto'", code="bad_request"
    )


def _signature(specs: list[TensorSpec]) -> str:
    return ", ".join(
        f"{s.name} {s.dtype}[{','.join('N' if d is None else str(d) for d in s.shape)}]"
        for s in specs
    )


def _print_entry(e: CatalogEntry) -> None:
    axis = "none (one item per microtask)" if e.batch_axis is None else str(e.batch_axis)
    print(f"{e.ref}  sha256 {e.sha256}  {e.size:,} bytes")
    print(f"  inputs:  {_signature(e.inputs)}")
    print(f"  outputs: {_signature(e.outputs)}")
    print(f"  batch axis: {axis}")
    if e.source or e.licence:
        print(f"  source: {e.source or '-'}; licence: {e.licence or '-'}")


def cmd_models_add(args: argparse.Namespace) -> int:
    try:
        catalog = _catalog(args)
        entry = catalog.add(
            args.file,
            model_id=args.model_id,
            version=args.version,
            source=args.source,
            licence=args.licence,
            description=args.description,
            batch_axis=_axis(args.batch_axis),  # type: ignore[arg-type]
        )
    except OffloadError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(entry.model_dump_json())
    else:
        print(f"registered in {catalog.root}")
        _print_entry(entry)
    return EXIT_OK


def cmd_models_list(args: argparse.Namespace) -> int:
    try:
        catalog = _catalog(args)
    except OffloadError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return EXIT_FAILED
    entries = catalog.entries()
    if args.json:
        print(json.dumps([json.loads(e.model_dump_json()) for e in entries], indent=2))
        return EXIT_OK
    if not entries:
        print(f"no models registered in {catalog.root}")
    for entry in entries:
        _print_entry(entry)
    return EXIT_OK


def cmd_models_remove(args: argparse.Namespace) -> int:
    model_id, _, version = args.model.partition("@")
    try:
        gone = _catalog(args).remove(model_id, version or None)
    except OffloadError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return EXIT_FAILED
    for entry in gone:
        print(f"removed {entry.ref} (sha256 {entry.sha256[:12]})")
    return EXIT_OK
