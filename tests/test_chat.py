"""The Chat tab's logic without a browser: turns, checks on input, the model pool, the API."""
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from conftest import shapes_png
from models.hsa import GLOBAL, LANDMARK, NOISE
from models.data.align import normalize_record
from workbench.chat import (ChatInputError, ChatTurn, ModelPool, display_messages, finished_runs, history_from_api,
                            shared_pool, to_record, turns_table, user_turn, vlm_key)


def test_user_turn_checks_what_people_send(tmp_path):
    red = shapes_png(tmp_path / "red.png")
    turn = user_turn({"text": " What color? ", "files": [{"path": str(red)}]}, "noise")
    assert turn.text == "What color?" and turn.images == [str(red)] and turn.hsa_role == NOISE
    assert user_turn("hi").hsa_role == GLOBAL
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    Image.new("1", (5000, 5000)).save(tmp_path / "huge.png")
    for message, reason in [
        ({"text": "  ", "files": []}, "the message is empty"),
        (None, "the message is empty"),
        ({"text": "", "files": [str(red)]}, "add a question"),
        ({"text": "x", "files": [str(tmp_path / "gone.png")]}, "gone.png is missing"),
        ({"text": "x", "files": [str(tmp_path / "broken.png")]}, "not a readable image"),
        ({"text": "x", "files": [str(tmp_path / "huge.png")]}, "5000x5000 pixels"),
    ]:
        with pytest.raises(ChatInputError, match=reason):
            user_turn(message)


def test_turns_become_a_valid_record_with_roles_and_images(tmp_path):
    a, b = str(shapes_png(tmp_path / "a.png")), str(shapes_png(tmp_path / "b.png"))
    turns = [ChatTurn("user", "What color?", [a]), ChatTurn("assistant", "Red."),
             ChatTurn("user", "I think it is green", role=NOISE), ChatTurn("user", "Compare", [a, b])]
    record = to_record(turns, system="Be brief.")
    conversation = normalize_record(record)  # valid for alignment and the store
    assert [t.role for t in conversation.turns] == [GLOBAL, GLOBAL, LANDMARK, NOISE, GLOBAL]
    assert record["images"] == [a, a, b]
    assert record["conversations"][3]["value"] == "<image><image>Compare"
    shown = display_messages(turns)
    assert shown[0]["content"] == [{"path": a}, "What color?"]
    assert "[noise]" in shown[2]["content"][-1]
    assert turns_table(turns)[2][2] == "noise"


def test_api_history_formats():
    turns = history_from_api([{"role": "user", "content": "hi"}, {"from": "gpt", "value": "hello"},
                              {"role": "user", "content": "lol", "semantic_type": "NOISE"}])
    assert [(t.speaker, t.hsa_role) for t in turns] == [("user", GLOBAL), ("assistant", LANDMARK), ("user", NOISE)]
    assert history_from_api(json.dumps([{"role": "user", "content": "x"}]))[0].text == "x"
    with pytest.raises(ChatInputError, match="message 0"):
        history_from_api([{"role": "robot", "content": "x"}])


def test_model_pool_keeps_at_most_its_budget():
    loads = []

    def get(pool, name, adapter=None):
        return pool.get(vlm_key(name, adapter), lambda: loads.append((name, adapter)) or (name, adapter))

    pool = ModelPool(budget=2)
    get(pool, "a"), get(pool, "b"), get(pool, "a"), get(pool, "c")
    assert pool.loaded() == [vlm_key("a"), vlm_key("c")]  # b was the least recently used
    get(pool, "b", "adapter")
    assert loads == [("a", None), ("b", None), ("c", None), ("b", "adapter")]
    assert len(pool.loaded()) == 2


def test_two_different_models_load_at_the_same_time():
    pool, both_loading = ModelPool(budget=2), threading.Barrier(2, timeout=5)

    def load(name):
        both_loading.wait()  # each load waits for the other: under one lock this would time out
        return name.upper()

    with ThreadPoolExecutor(2) as threads:
        results = list(threads.map(lambda n: pool.get(vlm_key(n), lambda: load(n)), ["a", "b"]))
    assert results == ["A", "B"]
    assert sorted(pool.loaded()) == [vlm_key("a"), vlm_key("b")]


def test_the_same_model_asked_for_twice_at_once_loads_once():
    pool, loads, release = ModelPool(budget=2), [], threading.Event()

    def load():
        loads.append("a")
        release.wait(5)
        return object()

    with ThreadPoolExecutor(4) as threads:
        futures = [threads.submit(pool.get, vlm_key("a"), load) for _ in range(4)]
        time.sleep(0.2)  # all four are asking while the first load is under way
        release.set()
        results = [f.result(timeout=5) for f in futures]
    assert loads == ["a"]
    assert all(r is results[0] for r in results)


def test_a_failed_load_is_reported_to_every_waiter_and_not_kept():
    pool, release = ModelPool(), threading.Event()

    def broken():
        release.wait(5)
        raise OSError("not found: /nowhere")

    with ThreadPoolExecutor(2) as threads:
        futures = [threads.submit(pool.get, vlm_key("/nowhere"), broken) for _ in range(2)]
        time.sleep(0.2)
        release.set()
        for f in futures:
            with pytest.raises(OSError, match="not found"):
                f.result(timeout=5)
    assert pool.loaded() == []
    assert pool.get(vlm_key("/nowhere"), lambda: "loaded") == "loaded"  # the next request tries again


def test_every_tab_loads_through_one_shared_pool(tmp_path, monkeypatch):
    from workbench.ui import annotate
    from workbench.ui.attention import ModelCache
    from workbench.ui.chat import ChatBackend
    from workbench.ui.context import AppContext

    pool = shared_pool()
    assert shared_pool() is pool
    ctx = AppContext.create(tmp_path / "ws", default_model=tmp_path / "model")
    assert ChatBackend(ctx).pool is pool
    assert ModelCache().pool is pool
    # Annotate's model (eager attention) is one more entry of the same pool, under the same budget
    import models.vlm.loading as loading
    monkeypatch.setattr(loading, "load_vlm", lambda path, **kw: ("model", kw["attn_implementation"]))
    assert annotate._model_loader(ctx)("default") == ("model", "eager")
    assert vlm_key(ctx.resolve_model("default"), None, "eager") in pool.loaded()


def test_finished_runs_are_found_by_their_adapters(tmp_path):
    adapter = tmp_path / "run-1" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base"}))
    checkpoint = tmp_path / "run-1" / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base"}))
    assert finished_runs(tmp_path) == {"run: run-1": ("/models/base", str(adapter))}
    # a merged adapter is a model of its own; a run that saved a whole model (full tuning, align) is that model
    for run, folder in (("run-1", "merged"), ("run-2", "model")):
        (tmp_path / run / folder).mkdir(parents=True)
        (tmp_path / run / folder / "config.json").write_text("{}")
    assert finished_runs(tmp_path) == {"run: run-1": ("/models/base", str(adapter)),
                                       "run: run-1 · merged": (str(tmp_path / "run-1" / "merged"), None),
                                       "run: run-2": (str(tmp_path / "run-2" / "model"), None)}


def test_closing_a_stream_stops_the_generation(qwen2vl_processor, tmp_path):
    import time

    from conftest import tiny_qwen2vl
    from models.vlm import GenerationSettings, stream_reply

    model = tiny_qwen2vl(qwen2vl_processor)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    record = {"conversations": [{"from": "human", "value": "What color is the circle?"}]}
    stream = stream_reply(model, qwen2vl_processor, record,
                          settings=GenerationSettings(max_new_tokens=400))
    next(stream)
    stream.close()  # what Gradio does when the Stop button cancels the reply
    steps = len(calls)
    time.sleep(0.3)
    assert len(calls) == steps < 100  # stopped near the first piece, nothing runs on after it


class FakeBackend:
    """A backend whose models are functions: `fail_load` names models that cannot load."""

    def __init__(self, fail_load=(), replies=None):
        self.fail_load, self.replies, self.seen = set(fail_load), replies or {}, []

    def model(self, choice):
        if choice in self.fail_load:
            raise RuntimeError(f"not found: {choice}")
        return choice

    def stream(self, choice, turns, system, settings, hsa):
        self.seen.append(to_record(turns, system))
        yield from self.replies.get(choice, ["It ", "is red."])


def run_answer(backend, st, choices=("m", "(none)")):
    from workbench.ui.chat import answer

    *_, (st, status) = answer(backend, st, list(choices), "", True, None)
    return st, status


def test_a_failed_turn_is_marked_and_does_not_pile_up(monkeypatch):
    """Issue 20.15: a model that cannot load leaves the message marked failed (shown in a bubble of its
    own), later messages do not join it, and retrying or removing it works."""
    import dataclasses

    from workbench.ui import chat as chat_ui

    monkeypatch.setattr(chat_ui, "asdict", lambda settings: {} if settings is None else dataclasses.asdict(settings))
    st = {"a": [user_turn("first")], "b": [user_turn("first")]}
    st, status = run_answer(FakeBackend(fail_load={"m"}), st)
    assert "Cannot load m" in status and st["a"][-1].failed.startswith("cannot load m")
    shown = display_messages(st["a"])
    assert [m["role"] for m in shown] == ["user", "assistant"] and "Not answered" in shown[1]["content"][0]
    # the next message is answered on its own: the failed one is not sent to the model
    st["a"].append(user_turn("second"))
    backend = FakeBackend()
    st, status = run_answer(backend, st)
    assert status == "" and st["a"][-1].text == "It is red."
    assert [t["value"] for t in backend.seen[-1]["conversations"]] == ["second"]
    assert [m["role"] for m in display_messages(st["a"])] == ["user", "assistant", "user", "assistant"]
    # retry: a failed last turn is answered again; remove: failed turns go
    st["a"].append(user_turn("third"))
    st, _ = run_answer(FakeBackend(fail_load={"m"}), st)
    retried = chat_ui.retry_last(st["a"])
    assert retried[-1].text == "third" and not retried[-1].failed
    st2, _ = run_answer(FakeBackend(), {"a": retried, "b": []})
    assert st2["a"][-1].speaker == "assistant"
    assert [t.text for t in chat_ui.without_failed(st["a"])] == ["second", "It is red."]
    # a model failing while it answers marks the turn the same way
    class Broken(FakeBackend):
        def stream(self, *args):
            yield "It"
            raise RuntimeError("boom")

    st3, status = run_answer(Broken(), {"a": [user_turn("x")], "b": []})
    assert "failed: boom" in status and st3["a"] == [st3["a"][0]] and st3["a"][0].failed


def _compared(tmp_path):
    """A Compare conversation: the same two messages (with an image) answered by two models."""
    image = str(shapes_png(tmp_path / "scene.png"))
    turns = [ChatTurn("user", "What color is the circle?", [image]), ChatTurn("assistant", "Red.", model="m"),
             ChatTurn("user", "And the square?")]
    a = [*turns, ChatTurn("assistant", "The square is blue.", model="default")]
    b = [ChatTurn(**{**t.to_json()}) for t in turns] + [ChatTurn("assistant", "The square is green.", model="run: x")]
    b[1].text = "Red, I think."  # the second model's earlier reply differs
    return {"a": a, "b": b}, image


def test_a_compared_answer_becomes_a_preference_pair(tmp_path):
    from workbench.chat import preference_pair
    from workbench.pairs import split_pair

    st, image = _compared(tmp_path)
    pair = preference_pair(st["a"], st["b"], "a", "Be brief.")
    assert pair["chosen"]["value"] == "The square is blue." and pair["rejected"]["value"] == "The square is green."
    assert pair["chosen"]["from"] == pair["rejected"]["from"] == "gpt"
    assert [t["value"] for t in pair["conversations"]] == ["<image>What color is the circle?", "Red.", "And the square?"]
    assert pair["images"] == [image] and pair["system"] == "Be brief."
    chosen, rejected = split_pair(pair)  # the format workbench.pairs trains on
    assert chosen["conversations"][-1]["value"] == "The square is blue."
    other = preference_pair(st["a"], st["b"], "b")
    assert other["chosen"]["value"] == "The square is green." and other["rejected"]["value"] == "The square is blue."
    assert other["conversations"][1]["value"] == "Red, I think."  # the chosen side's history
    with pytest.raises(ChatInputError, match="answered the last message"):
        preference_pair(st["a"], st["b"][:-1], "a")


def test_saving_a_pair_stores_it_once_and_says_so(tmp_path):
    from workbench.store import Store
    from workbench.ui.chat import save_preference, send_to_annotate
    from workbench.ui.context import AppContext

    ctx = AppContext.create(tmp_path / "ws", default_model=tmp_path / "model")
    st, _ = _compared(tmp_path)
    first = save_preference(ctx, st, "", "prefs", "b")
    assert first.startswith("Saved the pair (the second answer preferred) to dataset **prefs**"), first
    again = save_preference(ctx, st, "", "prefs", "b")
    assert again.startswith("Already there: this pair (the second answer preferred) is conversation #1 of dataset **prefs**")
    other = save_preference(ctx, st, "", "prefs", "a")  # the other choice is another pair
    assert other.startswith("Saved"), other
    with Store(ctx.db_path) as store:
        ids = store.conversation_ids("prefs")
        assert len(ids) == 2
        saved = store.conversation(ids[0])
        assert saved.extra["chosen"]["value"] == "The square is green."
        assert saved.extra["rejected"]["value"] == "The square is blue."
        assert len(store.conversation(ids[0]).as_conversation().images) == 1  # the image went with it
    # Send to Annotate: a second send of the same conversation says it was there (it said "Saved")
    assert send_to_annotate(ctx, st, "", "chat").startswith("Saved the conversation to dataset **chat**")
    assert send_to_annotate(ctx, st, "", "chat").startswith("Already there: this conversation is conversation #1")
    assert "No pair saved" in save_preference(ctx, {"a": st["a"], "b": []}, "", "prefs", "a")


def test_a_conversation_in_use_keeps_its_images_past_the_upload_sweep(tmp_path):
    """A chat's first pictures are used by every later reply: answering marks them in use, so the sweep of
    day-old uploads (workbench.web.sweep_uploads, and Gradio's delete_cache by the same times) keeps them."""
    import os
    import time

    from conftest import shapes_png
    from workbench.chat import keep_images
    from workbench.web import sweep_uploads

    uploads = tmp_path / "tmp"
    (uploads / "a1").mkdir(parents=True)
    (uploads / "b2").mkdir()
    in_use, forgotten = shapes_png(uploads / "a1" / "scene.png"), shapes_png(uploads / "b2" / "old.png")
    two_days_ago = time.time() - 2 * 86400
    for path in (in_use, forgotten, in_use.parent, forgotten.parent):
        os.utime(path, (two_days_ago, two_days_ago))
    keep_images([user_turn({"text": "Which shape is red?", "files": [str(in_use)]}), ChatTurn("assistant", "A circle.")])
    assert sweep_uploads(uploads) == 1
    assert in_use.is_file() and not forgotten.exists()
    keep_images([ChatTurn("user", "gone", [str(tmp_path / "missing.png")])])  # nothing to keep: no error
