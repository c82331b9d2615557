"""Token alignment of long conversations: `align_record` (turn ends in one pass) vs the quadratic
reference (`_turn_ends_reference`: the rendering of every prefix of the conversation, as align did
before), side by side in one run, on the default model's processor; and opening such a
conversation in the Annotate tab (`Annotator.show`): a page of turns vs every turn at once with the
quadratic alignment (as the tab did before). Both variants must give the same tokens, labels and
roles; the script checks it where it runs both.

    python bench/align.py [--turns 250,500,1000,2000,10000] [--reference-max 2000] [--annotate-turns 2000]
                          [--model DIR]

Target: 10,000 turns aligned in under 5 s.
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from models.zoo import DEFAULT_VLM_DIR, shapes  # noqa: E402
from models.data import align  # noqa: E402
from workbench.ui import annotate  # noqa: E402


def long_record(turns: int, image) -> dict:
    """`turns` turns of shapes conversations (questions, answers, NOISE chit-chat and false claims)
    one after the other, one image at the start, and a NOISE span on every 7th turn's first word."""
    out, system = [], None
    for sample in shapes.generate(turns // 2 + 8, seed=1, noise=shapes.TRAIN_NOISE):
        system = system or sample.record.get("system")
        for turn in sample.record["conversations"]:
            turn = dict(turn, value=turn["value"].replace("<image>", ""))
            if len(out) % 7 == 3 and " " in turn["value"]:
                turn["spans"] = [{"start": 0, "end": turn["value"].index(" "), "role": "NOISE"}]
            out.append(turn)
    out = out[:turns]
    out[0] = dict(out[0], value="<image>" + out[0]["value"])
    return {"system": system, "conversations": out, "images": [image]}


@contextmanager
def quadratic():
    """The alignment as it was: every turn's end from the rendering of the conversation up to it."""
    fast = align._turn_ends
    align._turn_ends = lambda processor, messages, rendered, _: align._turn_ends_reference(processor, messages,
                                                                                            rendered)
    try:
        yield
    finally:
        align._turn_ends = fast


@contextmanager
def one_page():
    """The Annotate tab as it was: every turn of the conversation on one page."""
    saved = annotate.TURNS_PER_PAGE, annotate.TOKENS_PER_PAGE
    annotate.TURNS_PER_PAGE = annotate.TOKENS_PER_PAGE = 10**9
    try:
        yield
    finally:
        annotate.TURNS_PER_PAGE, annotate.TOKENS_PER_PAGE = saved


def timed(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def as_lists(a) -> tuple:
    return a.input_ids.tolist(), a.labels.tolist(), a.semantic_ids.tolist(), a.turn_index, a.char_spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", default="250,500,1000,2000,10000", help="conversation lengths, in turns")
    parser.add_argument("--reference-max", type=int, default=2000,
                        help="run the quadratic reference up to this many turns (10,000 took 1,242 s)")
    parser.add_argument("--annotate-turns", type=int, default=2000, help="conversation length for the Annotate tab")
    parser.add_argument("--model", default=str(DEFAULT_VLM_DIR))
    args = parser.parse_args()

    from models.vlm.processor import load_processor

    processor = load_processor(args.model)
    image = shapes.draw_scene(shapes.random_scene(random.Random(3)))
    print(f"processor: {type(processor).__name__} of {args.model}\n")
    print("| turns | tokens | one pass s | quadratic s | quadratic / one pass |")
    print("|---|---|---|---|---|")
    for n in [int(x) for x in args.turns.split(",")]:
        record = long_record(n, image)
        fast_s, fast = timed(lambda: align.align_record(record, processor), 3)  # best of 3
        if n <= args.reference_max:
            with quadratic():  # best of 3 up to 1,000 turns, one run above
                slow_s, slow = timed(lambda: align.align_record(record, processor), 3 if n <= 1000 else 1)
            assert as_lists(fast) == as_lists(slow), f"{n} turns: the one-pass alignment differs from the reference"
            slow_text, ratio = f"{slow_s:.2f}", f"{slow_s / fast_s:.1f}×"
        else:
            slow_text, ratio = "not run", ""
        print(f"| {n:,} | {len(fast):,} | {fast_s:.2f} | {slow_text} | {ratio} |", flush=True)

    n = args.annotate_turns
    print(f"\nAnnotate, a {n:,}-turn conversation opened (Annotator.show, a fresh tab: nothing cached)\n")
    print("| variant | s | HTML kB | turns shown |")
    print("|---|---|---|---|")
    from workbench.store import Store, import_records

    with tempfile.TemporaryDirectory() as tmp:
        image.save(Path(tmp) / "scene.png")
        record = long_record(n, "scene.png")
        with Store(Path(tmp) / "w.db") as store:
            report = import_records(store, "bench", [("long", record)], base_dir=tmp)
            assert not report.errors, report.errors
            cid = report.conversation_ids[0]

            def show():
                tab = annotate.Annotator(store, lambda name: processor)
                return tab.show(cid, "default")

            rows = [("a page of turns (now)", lambda: timed(show, 1))]
            if n <= args.reference_max:
                def before():
                    with quadratic(), one_page():
                        return timed(show, 1)
                rows.append(("every turn, quadratic alignment (before)", before))
            for name, run in rows:
                seconds, shown = run()
                html = shown["html"]
                turns_shown = html.count('<div class="turn"')
                print(f"| {name} | {seconds:.2f} | {len(html.encode()) / 1e3:.0f} | {turns_shown:,} |", flush=True)


if __name__ == "__main__":
    main()
