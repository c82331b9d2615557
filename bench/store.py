"""The annotation store's speed: import of N shapes conversations (with their images), the latency
of saving one edit as the Annotate tab does it (median, p99; target p99 < 20 ms), and export.

    .venv/bin/python bench/store.py [--n 10000] [--edits 1000] [--synchronous FULL]
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path


from models.zoo import shapes  # noqa: E402
from workbench.store import Store, export_dataset, import_file  # noqa: E402


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="conversations to import")
    parser.add_argument("--edits", type=int, default=1_000, help="edits to time")
    parser.add_argument("--synchronous", default="FULL", help="SQLite synchronous mode of the store")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        samples = shapes.generate(args.n, seed=0, noise=shapes.TRAIN_NOISE)
        source = shapes.export_sharegpt(samples, tmp / "src", name="shapes")
        made = time.perf_counter() - t0
        print(f"generated {args.n} shapes conversations with images in {made:.1f} s (not part of the store)")

        with Store(tmp / "db" / "workbench.db", synchronous=args.synchronous) as store:
            t0 = time.perf_counter()
            report = import_file(store, source)
            imported = time.perf_counter() - t0
            assert not report.errors, report.errors[:3]
            print(f"import: {report.stored} conversations in {imported:.2f} s "
                  f"({report.stored / imported:.0f} conversations/s)")

            # One edit as the tab saves it: read the conversation (for its version), then a span
            # edit against that version, committed.
            rng = random.Random(0)
            ids = report.conversation_ids
            latencies = []
            for _ in range(args.edits):
                cid = rng.choice(ids)
                conv = store.conversation(cid)
                turn = rng.randrange(len(conv.turns))
                length = len(conv.turns[turn].text)
                start = rng.randrange(length)
                end = rng.randint(start + 1, length)
                t0 = time.perf_counter()
                store.set_span(cid, turn, start, end, rng.randrange(3), expected_version=conv.version,
                               author="bench")
                latencies.append((time.perf_counter() - t0) * 1000)
            median, p99 = statistics.median(latencies), percentile(latencies, 0.99)
            verdict = "meets" if p99 < 20 else "MISSES"
            print(f"edit save ({args.edits} edits, synchronous={args.synchronous}): median {median:.2f} ms, "
                  f"p99 {p99:.2f} ms, max {max(latencies):.2f} ms — {verdict} the p99 < 20 ms target")

            t0 = time.perf_counter()
            out = export_dataset(store, "shapes", "sharegpt", tmp / "export")
            exported = time.perf_counter() - t0
            print(f"export (sharegpt, with images): {out.exported} conversations in {exported:.2f} s")
            t0 = time.perf_counter()
            out = export_dataset(store, "shapes", "llamafactory", tmp / "export-lf")
            print(f"export (llamafactory, with images): {out.exported} conversations in "
                  f"{time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
