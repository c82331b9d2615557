"""app.py as a person starts it: options, localhost by default, login when asked."""
import subprocess
import sys

import pytest

from app import parse_args
from conftest import ROOT, free_port, wait_for_http


def test_defaults_are_local_and_private():
    args = parse_args([])
    assert args.host == "127.0.0.1" and args.port == 7860 and not args.share and args.auth is None
    with pytest.raises(SystemExit):
        parse_args(["--auth", "no-colon"])


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
