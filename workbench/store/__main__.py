"""Command line for scripting the annotation store.

    python -m workbench.store import FILE [--dataset NAME] [--db PATH]
    python -m workbench.store export NAME --format sharegpt|llamafactory|semantic-ids [--model PATH] --out DIR
    python -m workbench.store list [--db PATH]

Exit status: 0 all good; 1 some records invalid (the valid ones are stored / exported); 2 the
input could not be used at all.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "zoo" / "default_vlm"


def main(argv=None) -> int:
    from . import DEFAULT_DB, FORMATS, FileError, Store, StoreError, export_dataset, import_file

    parser = argparse.ArgumentParser(prog="python -m workbench.store", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, default=Path(os.environ.get("WORKBENCH_DB", DEFAULT_DB)),
                        help=f"the annotation database (default: $WORKBENCH_DB or {DEFAULT_DB})")
    commands = parser.add_subparsers(dest="command", required=True)
    p_import = commands.add_parser("import", help="import a ShareGPT JSON or JSONL file")
    p_import.add_argument("file", type=Path)
    p_import.add_argument("--dataset", help="dataset name (default: the file name without extension)")
    p_import.add_argument("--db", type=Path, default=argparse.SUPPRESS)
    p_import.add_argument("--author", default=os.environ.get("USER", "import"))
    p_export = commands.add_parser("export", help="export a dataset")
    p_export.add_argument("name")
    p_export.add_argument("--format", choices=FORMATS, required=True)
    p_export.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                          help="model directory whose tokenizer the semantic-ids export uses")
    p_export.add_argument("--out", type=Path, required=True)
    p_export.add_argument("--db", type=Path, default=argparse.SUPPRESS)
    p_list = commands.add_parser("list", help="list the datasets")
    p_list.add_argument("--db", type=Path, default=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.command == "export" and not args.db.exists():
        print(f"error: no database at {args.db}", file=sys.stderr)
        return 2
    with Store(args.db) as store:
        try:
            if args.command == "import":
                report = import_file(store, args.file, dataset=args.dataset, author=args.author)
                for error in report.errors:
                    print(f"error: {error}", file=sys.stderr)
                print(f"stored {report.stored} of {report.total} records in dataset {report.dataset!r} "
                      f"({len(report.errors)} invalid) in {args.db}")
                return 1 if report.errors else 0
            if args.command == "export":
                report = export_dataset(store, args.name, args.format, args.out, model=args.model)
                for error in report.errors:
                    print(f"error: {error}", file=sys.stderr)
                print(f"exported {report.exported} conversations of {args.name!r} as {args.format}: "
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
