"""The annotation store's speed, SQLite and PostgreSQL side by side in one run (issue 23).

For each engine, on the same source data:

- import of N shapes conversations with their images (default 100,000), then the same file again
  (every record already there: skipped);
- concurrent edits: W writer processes (1, 8 and 32), each with its own Store and connection, for S
  seconds each round: read a conversation, save a span edit against the version read (as the Annotate
  tab does); edits per second, and the median and p99 latency of a save (refused saves included);
  then the check that nothing was lost and nothing overwritten: every accepted save made exactly the
  version after the one it was made against, no version was made twice, each conversation's version
  moved by exactly its accepted saves, and its history has one revision per version;
- annotators: 10,000 conversations labelled twice (alice's and bob's copies written through the store),
  then read back with their copies, as the Team tab reads them (the dataset's copies in one query), and
  their agreement computed (workbench.agreement, on characters: Cohen's and Fleiss' kappa, Krippendorff's
  alpha, per role).

SQLite runs with synchronous=FULL (the store's default); PostgreSQL is a server of its own started for
the run (workbench.store.pgserver, durable settings: fsync and synchronous commit on), reached over a
Unix socket. Ratios are PostgreSQL / SQLite.

    .venv/bin/python bench/store.py [--n 100000] [--writers 1,8,32] [--seconds 10] [--agreement-n 10000]
                                    [--engines sqlite,postgresql] [--no-images]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from models.zoo import shapes
from workbench.store import StaleVersionError, Store, StoreBusyError, import_file
from workbench.store.labels import char_roles
from workbench.store.pgserver import PostgresServer
from models.data.align import Span


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


# --- the source data --------------------------------------------------------------------------------

def make_source(folder: Path, n: int, images: bool) -> Path:
    t0 = time.perf_counter()
    samples = []
    for start in range(0, n, 10_000):  # in pieces: the same stream, less held at once
        samples += shapes.generate(min(10_000, n - start), seed=0, noise=shapes.TRAIN_NOISE, start=start)
    source = shapes.export_sharegpt(samples, folder / "src", name="shapes")
    if not images:  # the same conversations without their images: the database's own share of an import
        import json

        records = json.loads(source.read_text())
        for record in records:
            record.pop("images", None)
            for turn in record["conversations"]:
                turn["value"] = turn["value"].replace("<image>", "")
        source.write_text(json.dumps(records))
    print(f"made {n} shapes conversations{' with images' if images else ''} in {time.perf_counter() - t0:.1f} s "
          "(not part of the store's figures)", flush=True)
    return source


# --- concurrent writers ------------------------------------------------------------------------------

def writer(location: str, pool: list[int], seed: int, ready, go, seconds: float, results) -> None:
    """One writer process: its own Store (own connections); after `go`, edits for `seconds`."""
    store = Store(location)
    rng = random.Random(seed)
    store.conversation(pool[0])  # connected, and the store opened, before the clock starts
    ready.wait()
    go.wait()
    deadline = time.monotonic() + seconds
    latencies, made, stale, busy = [], [], 0, 0
    while time.monotonic() < deadline:
        cid = rng.choice(pool)
        conv = store.conversation(cid)
        turn = rng.randrange(len(conv.turns))
        text = conv.turns[turn].text
        start = rng.randrange(len(text))
        end = min(len(text), start + rng.randint(1, 12))
        current = char_roles(conv.turns[turn].role, conv.turns[turn].spans, len(text))[start]
        role = (current + rng.randint(1, 2)) % 3  # differs from what is there: every save is a change
        t0 = time.perf_counter()
        try:
            saved = store.set_span(cid, turn, start, end, role, expected_version=conv.version, author=f"writer {seed}")
        except StaleVersionError:
            stale += 1
            latencies.append(time.perf_counter() - t0)
            continue
        except StoreBusyError:
            busy += 1
            latencies.append(time.perf_counter() - t0)
            continue
        latencies.append(time.perf_counter() - t0)
        made.append((cid, conv.version, saved.version))
    store.close()
    results.put({"latencies": latencies, "made": made, "stale": stale, "busy": busy})


def concurrent_edits(location: str, pool: list[int], writers: int, seconds: float) -> dict:
    with Store(location) as store:
        before = {cid: store.conversation(cid).version for cid in pool}
    context = multiprocessing.get_context("fork")  # children share the loaded modules: quick to start
    ready, go = context.Barrier(writers + 1), context.Barrier(writers + 1)
    results = context.Queue()
    processes = [context.Process(target=writer, args=(location, pool, 1000 * writers + k, ready, go, seconds, results))
                 for k in range(writers)]
    for p in processes:
        p.start()
    ready.wait(timeout=600)
    t0 = time.perf_counter()
    go.wait(timeout=60)
    parts = [results.get(timeout=seconds + 600) for _ in processes]
    elapsed = time.perf_counter() - t0
    for p in processes:
        p.join(timeout=60)
    latencies = [x for part in parts for x in part["latencies"]]
    made = [m for part in parts for m in part["made"]]
    # the check: nothing lost, nothing overwritten
    overwrites = sum(1 for _, expected, got in made if got != expected + 1)
    by_conversation: dict[int, list[int]] = defaultdict(list)
    for cid, _, got in made:
        by_conversation[cid].append(got)
    twice = sum(len(v) - len(set(v)) for v in by_conversation.values())
    lost = 0
    with Store(location) as store:
        for cid in pool:
            conv = store.conversation(cid)
            if conv.version - before[cid] != len(by_conversation[cid]):
                lost += 1
            if sorted(by_conversation[cid]) != list(range(before[cid] + 1, conv.version + 1)):
                lost += 1
            if [r.version for r in store.history(cid)] != list(range(1, conv.version + 1)):
                lost += 1
    return {"writers": writers, "edits": len(made), "per_s": len(made) / elapsed, "elapsed": elapsed,
            "p50_ms": percentile(latencies, 0.5) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
            "stale": sum(p["stale"] for p in parts), "busy": sum(p["busy"] for p in parts),
            "lost": lost, "overwritten": overwrites, "twice": twice}


# --- annotators: 10,000 conversations labelled twice --------------------------------------------------

def perturb(labels, texts, rng: random.Random):
    """Another person's labels of the same conversation: the turns' roles mostly kept, a span or two."""
    out = []
    for (role, spans), text in zip(labels, texts):
        if rng.random() < 0.15:
            role = rng.randrange(3)
        spans = list(spans)
        if len(text) > 2 and rng.random() < 0.5:
            start = rng.randrange(len(text) - 1)
            spans.append(Span(start, rng.randint(start + 1, len(text)), rng.randrange(3)))
        out.append((role, spans))
    return out


def measure_agreement(items) -> dict:
    """Agreement of the doubly labelled conversations on characters, as the Team tab computes it;
    `items` are (Conversation, {annotator: Labels}) as the store gives them (see doubly_labelled)."""
    from workbench.agreement import agreement_report

    report = agreement_report(items, unit="char")
    return {"conversations": report.conversations, "units": report.units,
            "cohen": round(report.cohen.value, 3), "alpha": round(report.alpha.value, 3)}


def doubly_labelled(location: str, ids: list[int], seed: int = 0) -> dict:
    rng = random.Random(seed)
    with Store(location) as store:
        t0 = time.perf_counter()
        for cid in ids:
            for name in ("alice", "bob"):
                conv = store.conversation(cid, annotator=name)
                labels = perturb(conv.labels(), [t.text for t in conv.turns], rng)
                store.set_labels(cid, labels, expected_version=conv.version, author=name, annotator=name)
                store.mark_labelled(cid, True, author=name, annotator=name)
        written = time.perf_counter() - t0
        t0 = time.perf_counter()
        copies = store.dataset_copies("shapes")
        items = [(store.conversation(cid).as_conversation(), {name: copy.labels for name, copy in copies[cid].items()})
                 for cid in ids]
        read = time.perf_counter() - t0
    assert all(set(annotations) == {"alice", "bob"} for _, annotations in items)
    t0 = time.perf_counter()
    agreement = measure_agreement(items)
    return {"n": len(ids), "write_s": written, "read_s": read, "agreement": agreement,
            "agreement_s": time.perf_counter() - t0}


# --- one engine ------------------------------------------------------------------------------------

def run_engine(engine: str, location: str, source: Path, args) -> dict:
    print(f"\n== {engine}: {location.split('?')[0]}", flush=True)
    result: dict = {}
    with Store(location) as store:
        t0 = time.perf_counter()
        report = import_file(store, source, dataset="shapes")
        result["import_s"] = time.perf_counter() - t0
        assert not report.errors, report.errors[:3]
        assert report.stored == args.n and store.dataset("shapes").total == args.n, (report.stored, args.n)
        print(f"import: {report.stored} conversations in {result['import_s']:.1f} s "
              f"({report.stored / result['import_s']:.0f}/s)", flush=True)
        t0 = time.perf_counter()
        again = import_file(store, source, dataset="shapes")
        result["reimport_s"] = time.perf_counter() - t0
        assert again.stored == 0 and len(again.skipped) == args.n and store.dataset("shapes").total == args.n
        print(f"import again (all {len(again.skipped)} skipped): {result['reimport_s']:.1f} s", flush=True)
        ids = report.conversation_ids
    rng = random.Random(1)
    pool = rng.sample(ids, min(len(ids), args.pool))
    result["edits"] = []
    for writers in args.writers:
        round_ = concurrent_edits(location, pool, writers, args.seconds)
        result["edits"].append(round_)
        print(f"{writers:>2} writers: {round_['edits']} edits in {round_['elapsed']:.1f} s = {round_['per_s']:.0f}/s, "
              f"save median {round_['p50_ms']:.1f} ms, p99 {round_['p99_ms']:.1f} ms; {round_['stale']} refused as "
              f"stale, {round_['busy']} busy; lost {round_['lost']}, overwritten {round_['overwritten']}, "
              f"versions made twice {round_['twice']}", flush=True)
    if args.agreement_n:
        agreeing = [cid for cid in ids if cid not in set(pool)][:args.agreement_n]
        result["agreement"] = doubly_labelled(location, agreeing)
        a = result["agreement"]
        print(f"{a['n']} conversations labelled by alice and bob: written in {a['write_s']:.1f} s "
              f"({2 * a['n'] / a['write_s']:.0f} copies/s), read back with their copies in {a['read_s']:.1f} s"
              + f"; agreement {a['agreement']} in {a['agreement_s']:.1f} s", flush=True)
    return result


def table(results: dict, args) -> str:
    engines = list(results)
    rows = [("import " + f"{args.n:,}" + " records" + (" with images" if not args.no_images else ""),
             [r["import_s"] for r in results.values()], "s", False),
            ("import again (all skipped)", [r["reimport_s"] for r in results.values()], "s", False)]
    for k, writers in enumerate(args.writers):
        rounds = [r["edits"][k] for r in results.values()]
        rows += [(f"{writers} writer{'s' if writers > 1 else ''}: edits/s", [x["per_s"] for x in rounds], "/s", True),
                 (f"{writers} writer{'s' if writers > 1 else ''}: save p50", [x["p50_ms"] for x in rounds], "ms", False),
                 (f"{writers} writer{'s' if writers > 1 else ''}: save p99", [x["p99_ms"] for x in rounds], "ms", False)]
    if args.agreement_n:
        rows += [(f"write {2 * args.agreement_n:,} annotator copies", [r["agreement"]["write_s"] for r in results.values()], "s", False),
                 (f"read {args.agreement_n:,} conversations + copies", [r["agreement"]["read_s"] for r in results.values()], "s", False)]
        rows.append((f"agreement of {args.agreement_n:,} conversations (characters)",
                     [r["agreement"]["agreement_s"] for r in results.values()], "s", False))
    head = "| | " + " | ".join(engines) + (" | PostgreSQL / SQLite |" if len(engines) == 2 else " |")
    lines = [head, "|---" * (len(engines) + 1 + (len(engines) == 2)) + "|"]
    for name, values, unit, higher_better in rows:
        cells = [f"{v:.1f} {unit}" if unit != "/s" else f"{v:.0f}/s" for v in values]
        ratio = f" | {values[1] / values[0]:.2f}×" if len(values) == 2 and values[0] else ""
        lines.append(f"| {name} | " + " | ".join(cells) + ratio + " |")
    checks = all(x["lost"] == 0 and x["overwritten"] == 0 and x["twice"] == 0 for r in results.values() for x in r["edits"])
    lines.append("")
    lines.append("Nothing lost and no stale overwrite in every round: " + ("yes" if checks else "NO"))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="conversations to import")
    parser.add_argument("--no-images", action="store_true", help="import the conversations without their images")
    parser.add_argument("--writers", default="1,8,32", help="concurrent writer processes, one round each")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each round of edits")
    parser.add_argument("--pool", type=int, default=2000, help="conversations the writers edit (chosen at random)")
    parser.add_argument("--agreement-n", type=int, default=10_000, help="conversations labelled twice (0: skip)")
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument("--tmp", default=None, help="folder for the run's files (default: the system's temp)")
    args = parser.parse_args()
    args.writers = [int(w) for w in args.writers.split(",")]
    engines = args.engines.split(",")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        source = make_source(tmp, args.n, images=not args.no_images)
        server = PostgresServer(durable=True).start() if "postgresql" in engines else None
        try:
            results = {}
            for engine in engines:
                if engine == "sqlite":
                    location = str(tmp / "sqlite" / "workbench.db")
                else:
                    location = f"{server.create_database('bench')}&image_dir={tmp / 'pg-images'}"
                results["SQLite" if engine == "sqlite" else "PostgreSQL"] = run_engine(engine, location, source, args)
        finally:
            if server is not None:
                server.stop()
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end\n")
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
