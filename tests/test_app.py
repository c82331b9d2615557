"""app.py as a person starts it: options, localhost by default, login when asked."""
import subprocess
import sys

import pytest

from app import parse_args
from conftest import ROOT, free_port, wait_for_http


def test_defaults_are_local_and_private():
    args = parse_args([])
    assert args.host == "127.0.0.1" and args.port == 7860 and not args.share and args.logins is None
    with pytest.raises(SystemExit):
        parse_args(["--auth", "no-colon"])


def test_logins_come_from_several_auth_pairs_and_a_users_file(tmp_path, capsys):
    """Issue 23: a login per person; the file's users keep their roles, --auth users may do everything."""
    from workbench.users import User, Users, hash_password

    users = tmp_path / "users.txt"
    Users([User("alice", hash_password("alice-password"))]).save(users)
    logins = parse_args(["--auth", "ada:lovelace", "--auth", "bob:builder", "--users", str(users)]).logins
    assert logins.names == ["ada", "alice", "bob"]
    assert logins.check("alice", "alice-password") and logins.check("bob", "builder")
    assert logins.get("ada").reviewer and not logins.get("alice").reviewer
    for argv, message in ((["--users", str(tmp_path / "none.txt")], "cannot read the users file"),
                          (["--auth", "alice:x", "--users", str(users)], "in users.txt and in --auth"),
                          (["--auth", "a:1", "--auth", "a:2"], "given twice")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_auth_is_required_when_asked(tmp_path):
    from gradio_client import Client

    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--workspace",
                                   str(tmp_path / "ws"), "--auth", "ada:lovelace"], cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_http(url, server, log)
        with pytest.raises(Exception):
            Client(url, verbose=False)
        client = Client(url, auth=("ada", "lovelace"), verbose=False)
        assert "/chat" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert (tmp_path / "ws" / "exports").is_dir()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_taken_port_names_the_option_to_use(tmp_path):
    """Issue 20.23: the message speaks of --port, not of Gradio's GRADIO_SERVER_PORT."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--workspace",
                               str(tmp_path / "ws")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"Port {port}" in done.stderr and "--port" in done.stderr and "GRADIO_SERVER_PORT" not in done.stderr


def test_the_start_lines_speak_of_the_options(workbench_url, workbench_workspace):
    """Issue 20.23: no `launch(share=True)` in what a person reads at start, and only the documented
    endpoints are public (20.18: not the page's own /lambda_… and /handler_… handlers)."""
    from conftest import wait_for
    from gradio_client import Client

    log = workbench_workspace / "server.log"
    wait_for(lambda: "HSA Workbench on" in log.read_text(), timeout=30)
    text = log.read_text()
    assert "--share" in text and "share=True" not in text and "GRADIO_SERVER_PORT" not in text
    endpoints = Client(workbench_url, verbose=False).view_api(print_info=False, return_format="dict")
    assert sorted(endpoints["named_endpoints"]) == ["/attention", "/chat", "/hsa_mask"]
    assert not endpoints["unnamed_endpoints"]
