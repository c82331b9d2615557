"""Issue 19.7 for the tabs that load a model or a tokenizer (Chat, Masks, Attention, Annotate): on a server
that others can reach, a model typed into the tab is an embedded model, a hub id, a finished run, or a folder
in the workspace or an --allow-path folder; any other folder on the disk is refused in the tab. Real files,
a real tiny model and processor outside the workspace, a link from the workspace to them."""
from __future__ import annotations

import json
import os

import pytest

from conftest import save_tiny_qwen2vl
from models.zoo import EMBEDDED
from workbench.paths import PathRefused
from workbench.ui.context import AppContext


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    """A tiny VLM (with its processor) outside the workspace, a copy in the allowed folder, a link to the
    outside one from the workspace."""
    root = tmp_path_factory.mktemp("disk")
    outside = save_tiny_qwen2vl(root / "outside" / "model", seed=3)
    allowed = save_tiny_qwen2vl(root / "shared" / "model", seed=3)
    workspace = root / "ws"
    workspace.mkdir()
    os.symlink(outside, workspace / "link-model")
    return root, outside, allowed


@pytest.fixture
def exposed(disk):
    root, _, _ = disk
    return AppContext.create(root / "ws", allowed_paths=[root / "shared"], confined=True)


def attacks(disk) -> list[str]:
    root, outside, _ = disk
    return [str(outside), "../outside/model", "link-model", "link-model/.", str(root / "ws" / "link-model"),
            "~/" + os.path.relpath(outside, os.path.expanduser("~")), "/etc", "Qwen/../../outside/model"]


def test_model_source_follows_the_path_rule(disk, exposed):
    root, outside, allowed = disk
    for attack in attacks(disk):
        with pytest.raises(PathRefused, match="outside the workspace"):
            exposed.model_source(attack, "model")
    for name in ["", "default", *EMBEDDED]:
        exposed.model_source(name)  # embedded names stay allowed
    assert exposed.model_source("Qwen/Qwen2.5-VL-3B-Instruct") == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert exposed.model_source(str(allowed)) == str(allowed.resolve())
    (exposed.workspace / "mine").mkdir(exist_ok=True)
    assert exposed.model_source("mine") == str(exposed.workspace / "mine")
    local = AppContext.create(root / "ws-local")
    assert local.model_source(str(outside)) == str(outside)  # a local server loads what its user names


def test_a_hub_id_that_is_a_folder_where_the_server_runs_is_a_path(disk, exposed, tmp_path, monkeypatch):
    """transformers loads 'owner/name' from the current folder when such a folder exists there: on a
    confined server that is a path like any other, not a hub id."""
    root, outside, _ = disk
    monkeypatch.chdir(root)
    # the loader gets the workspace's folder of that name (there is none: "not found"), never root/outside/model
    assert exposed.model_source("outside/model") == str(exposed.workspace / "outside" / "model")
    assert AppContext.create(root / "ws-local").model_source("outside/model") == "outside/model"


def test_the_masks_tab_refuses_a_tokenizer_outside(disk, exposed):
    from workbench.ui.masks import EXAMPLE_MARKED, show_mask

    root, outside, allowed = disk
    quiet = lambda *a, **k: None  # noqa: E731
    for attack in attacks(disk):
        status = show_mask(EXAMPLE_MARKED, attack, None, 0, exposed, progress=quiet)[3]
        assert status.startswith("**Cannot show this conversation:** model") and "outside the workspace" in status, \
            (attack, status)
    assert "HSA blocks" in show_mask(EXAMPLE_MARKED, str(allowed), None, 0, exposed, progress=quiet)[3]


def test_the_attention_tab_refuses_a_model_outside(disk, exposed):
    from workbench.chat import ModelPool
    from workbench.ui.attention import ModelCache, show

    loaded = []

    def loader(name):
        loaded.append(name)
        raise RuntimeError("not loading in this test")

    cache = ModelCache(loader=loader, pool=ModelPool())
    text = json.dumps({"conversations": [{"from": "human", "value": "hi"}]})
    for attack in attacks(disk):
        outputs = show(text, attack, [], 0, 0, True, 0, "on", 0, 0, exposed, cache)
        assert outputs[1].startswith("**Cannot show attention:** model") and "outside the workspace" in outputs[1]
    assert loaded == []


def test_the_chat_tab_refuses_a_model_outside(disk, exposed):
    from models.vlm import GenerationSettings
    from workbench.chat import ChatTurn, ModelPool
    from workbench.ui.chat import ChatBackend, answer

    loaded = []

    class Backend(ChatBackend):
        def _load(self, name, adapter):
            loaded.append(name)
            raise RuntimeError("not loading in this test")

    backend = Backend(exposed, pool=ModelPool())
    state = {"a": [ChatTurn("user", "hi")], "b": []}
    for attack in attacks(disk):
        *_, (after, status) = answer(backend, state, [attack], "", True, GenerationSettings())
        assert status.startswith(f"**Cannot load {attack}:** model") and "outside the workspace" in status
        assert after["a"][-1].failed and "outside the workspace" in after["a"][-1].failed
    assert loaded == []
    for allowed_choice in ["default", "composed", "Qwen/Qwen2.5-VL-3B-Instruct", str(disk[2])]:
        *_, (_, status) = answer(backend, state, [allowed_choice], "", True, GenerationSettings())
        assert "not loading in this test" in status
    assert len(loaded) == 4


def test_the_annotate_tab_refuses_a_tokenizer_or_model_outside(disk, exposed):
    from workbench.store import Store, import_records
    from workbench.ui.annotate import Annotator, _model_loader, _processor_loader

    with Store(exposed.db_path) as store:
        report = import_records(store, "d", [("r", {"conversations": [{"from": "human", "value": "What color?"},
                                                                       {"from": "gpt", "value": "Red."}]})])
        annotator = Annotator(store, _processor_loader(exposed), _model_loader(exposed))
        conv = store.conversation(report.conversation_ids[0])
        for attack in attacks(disk):
            view, note = annotator.view(conv, attack)
            assert "outside the workspace" in note and "showing words" in note, (attack, note)
            with pytest.raises(PathRefused, match="outside the workspace"):
                annotator.suggest(conv.id, attack, "model")
        view, note = annotator.view(conv, str(disk[2]))
        assert note == "" and view.source == str(disk[2])


@pytest.mark.slow
def test_a_shared_server_loads_no_model_from_outside(disk, tmp_path):
    """The same on a real `app.py --auth --allow-path` server, through the tabs' API endpoints: the Masks
    tab's tokenizer, the Attention tab's model and the Chat tab's model (/chat) are refused by name."""
    import sys

    from gradio_client import Client

    from conftest import ROOT, free_port, running_server

    root, outside, allowed = disk
    workspace = tmp_path / "ws-server"
    workspace.mkdir()
    os.symlink(outside, workspace / "link-model")
    port = free_port()
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--workspace", str(workspace),
               "--auth", "ada:lovelace", "--allow-path", str(root / "shared")]
    with running_server(command, port, workspace / "server.log") as url:
        client = Client(url, auth=("ada", "lovelace"), verbose=False)
        text = json.dumps({"conversations": [{"from": "human", "value": "What color?"},
                                             {"from": "gpt", "value": "Red.", "semantic_type": "LANDMARK"}]})
        for model in [str(outside), "link-model", "../" * 12 + str(outside).lstrip("/")]:
            status = client.predict(text, model, [], 0, api_name="/hsa_mask")[3]
            assert "Cannot show this conversation:** model" in status and "outside the workspace" in status, status
            status = client.predict(text, model, [], 0, 0, True, 0, "on", 0, 0, api_name="/attention")[0]  # no State
            assert "Cannot show attention:** model" in status and "outside the workspace" in status, status
            with pytest.raises(Exception, match="outside the workspace"):
                client.predict({"text": "What color?", "files": []}, [], model, {}, api_name="/chat")
        assert "HSA blocks" in client.predict(text, str(allowed), [], 0, api_name="/hsa_mask")[3]
    log = (workspace / "server.log").read_text()
    # refusals, not failures: Gradio logs each gr.Error it answers (/chat), and nothing else went wrong
    ends = [line for line in log.splitlines() if line and not line[0].isspace() and "Error" in line.split(":")[0]]
    assert ends and all(line.startswith("gradio.exceptions.Error: \"model ") for line in ends), ends
