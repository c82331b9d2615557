"""Command line for scripting the annotation store.

    python -m workbench.store import FILE [--dataset NAME] [--db PATH|URL]
    python -m workbench.store export NAME --format sharegpt|llamafactory|semantic-ids [--model PATH] --out DIR
                                         [--reviewed-only]
    python -m workbench.store list [--db PATH|URL]

--db is a SQLite file (a path or sqlite:///PATH) or a PostgreSQL database (postgresql://USER@HOST/DB; its
images go to --images, the URL's ?image_dir=, $WORKBENCH_IMAGES or the app's workspace/images).

Exit status: 0 all good (records already in the dataset are skipped and listed); 1 some records
invalid (the valid ones are stored / exported); 2 the input could not be used at all, or the database
stayed busy for --busy-timeout seconds (a new import skips what was stored).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from models.zoo import DEFAULT_VLM_DIR as DEFAULT_MODEL


def main(argv=None) -> int:
    from . import DEFAULT_DB, FORMATS, FileError, Store, StoreError, export_dataset, import_file

    parser = argparse.ArgumentParser(prog="python -m workbench.store", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default=os.environ.get("WORKBENCH_DB") or str(DEFAULT_DB),
                        help=f"the annotation database: a file path, sqlite:///PATH or postgresql://USER@HOST/DB "
                             f"(default: $WORKBENCH_DB or {DEFAULT_DB})")
    images = dict(type=Path, metavar="DIR", help="where the store keeps its images (default: beside a SQLite file; "
                                                 "for PostgreSQL the URL's ?image_dir=, $WORKBENCH_IMAGES or workspace/images)")
    parser.add_argument("--images", default=None, **images)
    busy = dict(type=float, metavar="SECONDS",
                help="how long to wait for another process writing to the database (default 30)")
    parser.add_argument("--busy-timeout", default=30.0, **busy)
    commands = parser.add_subparsers(dest="command", required=True)
    p_import = commands.add_parser("import", help="import a ShareGPT JSON or JSONL file")
    p_import.add_argument("file", type=Path)
    p_import.add_argument("--dataset", help="dataset name (default: the file name without extension)")
    p_import.add_argument("--db", default=argparse.SUPPRESS)
    p_import.add_argument("--images", default=argparse.SUPPRESS, **images)
    p_import.add_argument("--busy-timeout", default=argparse.SUPPRESS, **busy)
    p_import.add_argument("--author", default=os.environ.get("USER", "import"))
    p_export = commands.add_parser("export", help="export a dataset")
    p_export.add_argument("name")
    p_export.add_argument("--format", choices=FORMATS, required=True)
    p_export.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                          help="model directory whose tokenizer the semantic-ids export uses")
    p_export.add_argument("--out", type=Path, required=True)
    p_export.add_argument("--reviewed-only", action="store_true",
                          help="only the reviewed conversations, with the labels their reviewer accepted")
    p_export.add_argument("--db", default=argparse.SUPPRESS)
    p_export.add_argument("--images", default=argparse.SUPPRESS, **images)
    p_export.add_argument("--busy-timeout", default=argparse.SUPPRESS, **busy)
    p_list = commands.add_parser("list", help="list the datasets")
    p_list.add_argument("--db", default=argparse.SUPPRESS)
    p_list.add_argument("--images", default=argparse.SUPPRESS, **images)
    p_list.add_argument("--busy-timeout", default=argparse.SUPPRESS, **busy)
    args = parser.parse_args(argv)

    from .engine import is_url

    if args.command == "export" and not is_url(args.db) and not Path(args.db).exists():
        print(f"error: no database at {args.db}", file=sys.stderr)
        return 2
    try:
        store = Store(args.db, image_dir=args.images, busy_timeout_s=args.busy_timeout)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with store:
        try:
            if args.command == "import":
                report = import_file(store, args.file, dataset=args.dataset, author=args.author)
                for error in report.errors:
                    print(f"error: {error}", file=sys.stderr)
                for skipped in report.skipped:
                    print(f"skipped: {skipped}", file=sys.stderr)
                if report.cleaned:
                    print(f"removed {report.cleaned} image file(s) an interrupted import had left", file=sys.stderr)
                print(f"stored {report.stored} of {report.total} records in dataset {report.dataset!r} "
                      f"({len(report.errors)} invalid, {len(report.skipped)} already there) in "
                      f"{store.path if store.path is not None else store.name}")
                return 1 if report.errors else 0
            if args.command == "export":
                report = export_dataset(store, args.name, args.format, args.out, model=args.model,
                                        reviewed_only=args.reviewed_only)
                for error in report.errors:
                    print(f"error: {error}", file=sys.stderr)
                which = "reviewed conversations" if args.reviewed_only else "conversations"
                print(f"exported {report.exported} {which} of {args.name!r} as {args.format}: "
                      + ", ".join(str(f) for f in report.files))
                return 1 if report.errors else 0
            for info in store.datasets():
                print(f"{info.name}\t{info.labelled}/{info.total} labelled")
            return 0
        except (FileError, StoreError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
