"""Issue 23 in headless Chromium on `python app.py --users FILE`: two annotators log in, each labels
their own copy of the same assigned conversation from their queue and marks it done; a reviewer sees
where they disagree, outlined. The name box shows the login and cannot be typed over."""
from __future__ import annotations

import sys

import pytest

from conftest import ROOT, free_port, logged_in_page, running_server, screenshot
from test_annotate_browser import covering
from workbench.store import Store, import_records
from workbench.users import User, Users, hash_password

pytestmark = [pytest.mark.browser, pytest.mark.slow]

QUESTION = "What colour is the circle? By the way, lovely weather today."
PASSWORDS = {"alice": "alice-password", "bob": "bob-password", "carol": "carol-password"}


@pytest.fixture(scope="module")
def team_server(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("team-ws")
    users = workspace / "users.txt"
    Users([User("alice", hash_password(PASSWORDS["alice"])), User("bob", hash_password(PASSWORDS["bob"])),
           User("carol", hash_password(PASSWORDS["carol"]), frozenset({"annotator", "reviewer"}))]).save(users)
    db = workspace / "workbench.db"
    with Store(db) as store:
        records = [{"conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": "It is red."}]},
                   {"conversations": [{"from": "human", "value": "How many shapes?"}, {"from": "gpt", "value": "Two."}]}]
        import_records(store, "team", [(f"r{i}", r) for i, r in enumerate(records)])
        store.assign("team", ["alice", "bob"], 2, author="carol")
    port = free_port()
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--workspace", str(workspace),
               "--users", str(users)]
    with running_server(command, port, workspace / "server.log") as url:
        yield url, db


def log_in(browser, url, name):
    page = logged_in_page(browser, url, name, PASSWORDS[name])
    page.locator("#annotate-view .tok").first.wait_for(timeout=120_000)
    return page


def label(page, target: str, key: str):
    first, last = covering(page, 0, QUESTION, target)
    first.click()
    if last != first:
        last.click(modifiers=["Shift"])
    page.locator("#annotate-status", has_text="Selected turn 0").wait_for(timeout=30_000)
    page.keyboard.press(key)
    try:
        page.locator("#annotate-status", has_text="Saved in").wait_for(timeout=30_000)
    except Exception:
        raise AssertionError(f"not saved; the status says {page.inner_text('#annotate-status')!r}")


def test_two_annotators_label_their_own_copies_and_a_reviewer_sees_where_they_disagree(browser, team_server):
    url, db = team_server
    alice = log_in(browser, url, "alice")
    name_box = alice.locator("#annotate-author textarea, #annotate-author input").first
    assert name_box.input_value() == "alice" and not name_box.is_editable()
    alice.get_by_text("my to-do", exact=True).click()
    alice.wait_for_function("() => document.querySelector('#annotate-where input, #annotate-where textarea')"
                            ".value === '1 / 2'", timeout=60_000)
    label(alice, "By the way, lovely weather today.", "3")
    assert "alice's copy" in alice.inner_text("#annotate-status")
    alice.click("#annotate-done")
    alice.locator("#annotate-progress", has_text="Your queue:** 1 / 2 done").or_(
        alice.locator("#annotate-progress", has_text="Your queue: 1 / 2 done")).wait_for(timeout=30_000)
    screenshot(alice, "annotate-team-alice")

    bob = log_in(browser, url, "bob")
    bob.get_by_text("my to-do", exact=True).click()
    bob.wait_for_function("() => document.querySelector('#annotate-where input, #annotate-where textarea')"
                          ".value === '1 / 2'", timeout=60_000)
    assert "r2" not in (bob.locator("#annotate-view .tok").nth(6).get_attribute("class") or "")  # not alice's work
    label(bob, "lovely weather today.", "3")

    with Store(db) as store:
        cid = store.conversation_ids("team")[0]
        copies = store.copies(cid)
        assert set(copies) == {"alice", "bob"} and copies["alice"].done and not copies["bob"].done
        assert copies["alice"].labels != copies["bob"].labels
        assert store.conversation(cid).turns[0].spans == []  # the main labels wait for a review

    carol = log_in(browser, url, "carol")
    carol.click("#annotate-outline input")
    carol.locator("#annotate-status", has_text="disagreement").wait_for(timeout=30_000)
    outlined = carol.locator("#annotate-view .tok.dis")
    assert outlined.count() >= 2
    assert "alice: noise" in outlined.first.get_attribute("title")
    assert "By" in "".join(outlined.all_inner_texts())
    screenshot(carol, "annotate-team-disagreements")
