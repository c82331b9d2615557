"""Issue 19.7: one rule for the paths a form may name, with real files, folders and links."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from models.zoo import EMBEDDED
from workbench.paths import PathRefused, PathRule, is_hub_id, reachable_by_others
from conftest import TINY_DATASET


@pytest.fixture
def disk(tmp_path):
    workspace, outside, allowed = tmp_path / "ws", tmp_path / "outside", tmp_path / "shared-data"
    for folder in (workspace, outside, allowed):
        folder.mkdir()
    (workspace / "data.json").write_text(TINY_DATASET)
    (outside / "secret.json").write_text(TINY_DATASET)
    (allowed / "big.json").write_text(TINY_DATASET)
    os.symlink(outside, workspace / "link-out")  # a link inside the workspace to a folder outside
    return workspace, outside, allowed


# what was tried against a server reachable by others: each must be refused
ATTACKS = ["/etc/passwd", "/etc", "../outside/secret.json", "link-out/secret.json", "~/.ssh/id_rsa",
           "data.json/../../outside/secret.json", "./../outside", "/proc/self/environ", "a\0b"]


def test_a_server_reachable_by_others_reads_only_the_workspace_and_the_allowed_folders(disk):
    workspace, outside, allowed = disk
    rule = PathRule(workspace, allowed=(allowed,), confined=True)
    assert rule.path("data.json", "dataset") == workspace / "data.json"
    assert rule.path(str(workspace / "data.json")) == workspace / "data.json"
    assert rule.path(str(allowed / "big.json")) == allowed / "big.json"
    assert rule.path("sub/new.json") == workspace / "sub" / "new.json"  # inside, even if not there yet
    for attack in [*ATTACKS, str(outside / "secret.json")]:
        with pytest.raises(PathRefused, match="dataset"):
            rule.path(attack, "dataset")
    with pytest.raises(PathRefused, match=r"outside the workspace \(.*/ws\) and the allowed folders \(.*shared-data\).*--allow-path"):
        rule.path("/etc/passwd", "dataset")


def test_a_local_server_reads_what_its_user_names(disk):
    workspace, outside, _ = disk
    rule = PathRule(workspace, confined=False)
    assert rule.path(str(outside / "secret.json")) == outside / "secret.json"
    assert rule.path("../outside/secret.json") == outside / "secret.json"
    assert rule.path("link-out/secret.json") == outside / "secret.json"


def test_models_embedded_names_and_hub_ids_stay_allowed_other_paths_follow_the_rule(disk, tmp_path):
    workspace, outside, allowed = disk
    default_model = tmp_path / "operator-model"
    rule = PathRule(workspace, allowed=(allowed,), confined=True, models=(default_model,))
    for name in EMBEDDED:
        assert rule.model(name) == name
    assert rule.model(str(EMBEDDED["default"])) == str(EMBEDDED["default"].resolve())
    assert rule.model(str(default_model)) == str(default_model)
    for hub_id in ["Qwen/Qwen2.5-VL-3B-Instruct", "openai/clip-vit-base-patch32", "gpt2"]:
        assert rule.model(hub_id) == hub_id
    (workspace / "models" / "mine").mkdir(parents=True)
    assert rule.model("models/mine") == str(workspace / "models" / "mine")  # in the workspace: that folder
    for attack in [*ATTACKS, str(outside), "../outside", "Qwen/../../outside", str(EMBEDDED["default"].parent.parent)]:
        with pytest.raises(PathRefused, match="base_model"):
            rule.model(attack)
    assert PathRule(workspace, confined=False).model(str(outside)) == str(outside)


def test_hub_ids_are_not_paths():
    assert is_hub_id("Qwen/Qwen2.5-VL-3B-Instruct") and is_hub_id("gpt2") and is_hub_id("org_x/model.v2")
    for path in ["/abs/model", "../x", "a/b/c", "~/m", "./m", "org/..", "org/--x", "", "a b"]:
        assert not is_hub_id(path), path


def test_who_can_reach_the_server():
    for host in ["127.0.0.1", "localhost", "::1", "127.0.0.2", "[::1]"]:
        assert not reachable_by_others(host), host
    for host in ["0.0.0.0", "::", "192.168.1.5", "10.0.0.1", "my-laptop.lan"]:
        assert reachable_by_others(host), host
    assert reachable_by_others("127.0.0.1", share=True) and reachable_by_others("127.0.0.1", auth=True)
