"""The Team tab in headless Chromium (issue 23), in a Blocks of its own over a workspace where alice and
bob labelled copies of the same conversations: assign and see progress, agreement on characters and on
tokens, review one conversation side by side, merge region by region, a stale accept refused with the
choices kept, export of the reviewed conversations; and with a login, an annotator may not assign or
accept while a reviewer may, under their own name."""
from __future__ import annotations

import json
import sys
import textwrap
import zipfile

import pytest

from conftest import ROOT, free_port, logged_in_page, running_server, screenshot
from models.hsa import LANDMARK, NOISE
from workbench.store import Store, import_records
from workbench.ui import team_logic as T

pytestmark = [pytest.mark.browser, pytest.mark.slow]

QUESTION = "What colour is the circle? I think it is green, by the way."
ANSWER = "The circle is red."
NOISE_AT = QUESTION.index("I think")
RED_AT = ANSWER.index("red")
PASSWORDS = {"alice": "alice-pw", "carol": "carol-pw"}

LAUNCHER = textwrap.dedent("""
    import gradio as gr
    from workbench.ui import team
    from workbench.ui.context import AppContext
    from workbench.users import User, Users, hash_password

    logins = {logins!r}  # name -> (password, reviewer), or None: no login
    users = None if logins is None else Users([
        User(name, hash_password(password), frozenset({{"annotator", "reviewer"}} if reviewer else {{"annotator"}}))
        for name, (password, reviewer) in logins.items()])
    ctx = AppContext.create({workspace!r}, default_model={model!r}, users=users)
    with gr.Blocks(title="team") as demo:
        with gr.Tab("Team"):
            team.build(ctx, demo)
    demo.queue().launch(server_port={port}, allowed_paths=[str(ctx.workspace)],
                        auth=users.check if users is not None else None)
""")


def label(store, cid, annotator, turn, start, end, role):
    """`annotator` labels characters [start, end) of a turn in their copy and marks it done."""
    version = store.conversation(cid, annotator=annotator).version
    store.set_span(cid, turn, start, end, role, expected_version=version, author=annotator, annotator=annotator)
    store.mark_labelled(cid, True, author=annotator, annotator=annotator)


def serve(tmp_path_factory, name: str, logins=None):
    """A workspace with dataset "team" (three conversations; alice and bob labelled the first two, bob
    alone the third) and the tab served over it; returns (the server's context manager, db). alice and
    bob differ in two regions: "I think " (alice NOISE, bob GLOBAL) and "The circle is " (alice LANDMARK,
    bob GLOBAL)."""
    from models.zoo.processor import build_processor

    workspace = tmp_path_factory.mktemp(name)
    build_processor().save_pretrained(workspace / "tok")
    db = workspace / "workbench.db"
    with Store(db) as store:
        records = [(f"r{i}", {"conversations": [{"from": "human", "value": f"{QUESTION} ({i + 1})"},
                                                {"from": "gpt", "value": ANSWER}]}) for i in range(3)]
        ids = import_records(store, "team", records).conversation_ids
        for cid in ids[:2]:
            label(store, cid, "alice", 0, NOISE_AT, len(QUESTION), NOISE)
            label(store, cid, "alice", 1, 0, len(ANSWER), LANDMARK)
            label(store, cid, "bob", 0, NOISE_AT + len("I think "), len(QUESTION), NOISE)
            label(store, cid, "bob", 1, RED_AT, len(ANSWER), LANDMARK)
        label(store, ids[2], "bob", 0, 0, 4, LANDMARK)
    port = free_port()
    script = workspace / "launch.py"
    script.write_text(LAUNCHER.format(root=str(ROOT), workspace=str(workspace), model=str(workspace / "tok"),
                                      port=port, logins=logins))
    return running_server([sys.executable, str(script)], port, workspace / "server.log"), db


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    server, db = serve(tmp_path_factory, "team-open")
    with server as url:
        yield url, db


@pytest.fixture(scope="module")
def login_server(tmp_path_factory):
    server, db = serve(tmp_path_factory, "team-login", {"alice": (PASSWORDS["alice"], False),
                                                       "carol": (PASSWORDS["carol"], True)})
    with server as url:
        yield url, db


def wait_text(page, selector: str, text: str, timeout: float = 60_000):
    try:
        page.locator(selector, has_text=text).first.wait_for(timeout=timeout)
    except Exception:
        shown = page.locator(selector).first.inner_text(timeout=1000) if page.locator(selector).count() else "nothing"
        raise AssertionError(f"{selector} never showed {text!r}; it shows {shown!r}") from None


def textbox(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def cells(page, elem_id: str) -> list[list[str]]:
    """The rows of a Dataframe as the browser shows them."""
    return page.eval_on_selector(f"#{elem_id}", "e => [...e.querySelectorAll('[role=row].virtual-row')].map("
                                 "r => [...r.querySelectorAll('[role=gridcell]')].map(c => c.innerText.trim()))")


def choose_conversation(page, number: int):
    page.locator("#team-review-conv input").click()
    page.get_by_role("option").filter(has_text=f"#{number} ·").first.click()
    page.locator("#team-review-view .who").first.wait_for(timeout=60_000)


def test_assign_progress_agreement_review_merge_and_export(page, open_server):
    url, db = open_server
    page.goto(url)
    wait_text(page, "#team-who", "No login")
    wait_text(page, "#team-progress-summary", "No one has conversations of team assigned yet")
    textbox(page, "team-name").fill("dan")

    # assign: each conversation to both
    textbox(page, "team-annotators").fill("alice, bob")
    page.locator("#team-assign").click()
    wait_text(page, "#team-assign-status", "Assigned 6 more: alice +3, bob +3")
    wait_text(page, "#team-progress-summary", "5 of 6 assignments done")
    assert [row[:4] for row in cells(page, "team-progress")] == [["alice", "2", "3", "67%"], ["bob", "3", "3", "100%"]]
    page.locator("#team-progress-plot .js-plotly-plot").wait_for(timeout=30_000)
    screenshot(page, "team-assign")

    # agreement on characters, then on the tokens of the (tiny) default model
    page.get_by_role("tab", name="Agreement").click()
    page.locator("#team-agree").click()
    wait_text(page, "#team-agreement-summary", "over 2 conversations")
    assert "1 skipped" in page.inner_text("#team-agreement-summary")
    overall = cells(page, "team-overall")
    assert [row[0] for row in overall] == ["Cohen's κ (alice vs bob)", "Fleiss' κ", "Krippendorff's α"]
    with Store(db) as store:  # what the page shows is what the tab's logic computes
        expected = T.agreement(store, "team", "char")
    assert overall == [[str(x) for x in row] for row in expected.overall]
    assert "Landis & Koch" in page.inner_text("#team-agreement-summary")
    assert cells(page, "team-pairs")[0][:3] == ["alice", "bob", "2"]
    page.locator("#team-confusion .js-plotly-plot").wait_for(timeout=30_000)
    screenshot(page, "team-agreement")
    page.locator("#team-unit").get_by_text("tokens").click()
    page.locator("#team-agree").click()
    wait_text(page, "#team-agreement-summary", "Agreement on tokens of default")

    # review conversation #1: both versions side by side, the regions where they differ outlined
    page.get_by_role("tab", name="Review & export").click()
    wait_text(page, "#team-review-summary", "2 conversations with two or more copies · 0 reviewed")
    choose_conversation(page, 1)
    view = page.locator("#team-review-view")
    assert view.locator(".who").all_inner_texts()[0].startswith("alice")
    assert view.locator(".text .dis").count() == 4  # two regions, in each of the two columns
    background = view.locator(".text span.r2").first.evaluate("e => getComputedStyle(e).backgroundColor")
    assert background == "rgb(228, 228, 228)"  # NOISE, as the Annotate tab shows it
    wait_text(page, "#team-review-status", "2 regions where they differ")
    regions = cells(page, "team-regions")
    assert [row[3:5] for row in regions] == [["I think", "alice NOISE, bob GLOBAL"],
                                             ["The circle is", "alice LANDMARK, bob GLOBAL"]]
    assert [row[5] for row in regions] == ["alice", "alice"]
    screenshot(page, "team-review")

    # take the answer from bob, the distractor from alice: a merge
    cell = page.locator("#team-regions [data-testid=cell-1-5]")
    cell.dblclick()
    editor = cell.locator("textarea, input").first
    editor.fill("bob")
    editor.press("Enter")
    page.wait_for_timeout(300)
    page.locator("#team-merge").click()
    wait_text(page, "#team-review-status", "Accepted the merge of alice and bob")
    with Store(db) as store:
        cid = store.conversation_ids("team")[0]
        conv = store.conversation(cid)
        assert conv.reviewed_by == "dan" and store.history(cid)[-1].action == "merged alice+bob"
        assert [(role, [(s.start, s.end, s.role) for s in spans]) for role, spans in conv.labels()] == [
            (0, [(NOISE_AT, len(QUESTION), NOISE)]), (0, [(RED_AT, len(ANSWER), LANDMARK)])]
    assert cells(page, "team-regions")[1][5] == "bob"  # the choices stay on view
    page.locator("#team-review-list-box").get_by_text("Conversations that two").click()
    wait_text(page, "#team-review-list", "dan")
    screenshot(page, "team-reviewed")

    # someone else accepts meanwhile: accepting over what was shown is refused, the choices kept
    with Store(db) as store:
        store.accept(cid, store.copies(cid)["alice"].labels, reviewer="erin", expected_version=conv.version,
                     source="accepted alice")
    page.locator("#team-accept-1").click()  # "Accept bob's version"
    wait_text(page, "#team-review-status", "Not accepted")
    assert "erin" in page.inner_text("#team-review-status")
    assert cells(page, "team-regions")[1][5] == "bob"
    with Store(db) as store:
        assert store.conversation(cid).reviewed_by == "erin"
    screenshot(page, "team-stale")
    assert page.locator("#team-accept-1").inner_text() == "Accept bob's version"
    page.locator("#team-accept-1").click()  # now seen: accept over it
    wait_text(page, "#team-review-status", "Accepted bob's version")

    # export: the one reviewed conversation, ShareGPT
    page.locator("#team-export").click()
    wait_text(page, "#team-export-status", "Exported 1 reviewed conversation of team (of 3)")
    link = page.locator("#team-download a").first
    link.wait_for(timeout=30_000)
    with page.expect_download() as download:
        link.click()
    with zipfile.ZipFile(download.value.path()) as z:
        records = json.loads(z.read("team.json"))
    assert len(records) == 1 and "(1)" in records[0]["conversations"][0]["value"]
    screenshot(page, "team-export")


def log_in(browser, url: str, name: str):
    page = logged_in_page(browser, url, name, PASSWORDS[name])
    wait_text(page, "#team-who", f"Logged in as {name}")
    return page


def test_with_a_login_only_a_reviewer_assigns_and_accepts_under_their_own_name(browser, login_server):
    url, db = login_server
    alice = log_in(browser, url, "alice")
    assert "annotator" in alice.inner_text("#team-who") and not alice.locator("#team-name").is_visible()
    assert textbox(alice, "team-annotators").input_value() == "alice, carol"  # the users, by default
    alice.locator("#team-assign").click()
    wait_text(alice, "#team-assign-status", "Only a reviewer may assign")
    alice.get_by_role("tab", name="Review & export").click()
    choose_conversation(alice, 2)
    alice.locator("#team-accept-0").click()
    wait_text(alice, "#team-review-status", "Only a reviewer may accept labels")
    screenshot(alice, "team-annotator-refused")
    with Store(db) as store:
        assert store.progress("team") == {} and store.conversations("team", status="reviewed") == []

    carol = log_in(browser, url, "carol")
    assert "reviewer" in carol.inner_text("#team-who")
    carol.get_by_role("tab", name="Review & export").click()
    choose_conversation(carol, 2)
    carol.locator("#team-accept-1").click()
    wait_text(carol, "#team-review-status", "Accepted bob's version")
    assert "reviewed by carol" in carol.inner_text("#team-review-status")
    with Store(db) as store:
        cid = store.conversation_ids("team")[1]
        assert store.conversation(cid).reviewed_by == "carol"
        assert store.history(cid)[-1].author == "carol"
