"""Logins for a shared workbench (issue 23): hashed passwords, a users file, roles, the CLI that writes it."""
import stat
import subprocess
import sys

import pytest

from workbench.users import User, Users, UsersError, hash_password, verify_password


def test_a_password_is_kept_as_a_salted_hash_that_verifies_only_itself():
    encoded = hash_password("correct horse")
    assert "correct horse" not in encoded and encoded.startswith("scrypt$")
    assert verify_password("correct horse", encoded)
    assert not verify_password("correct hors", encoded) and not verify_password("", encoded)
    assert hash_password("correct horse") != encoded  # salted: the same password hashes differently
    for broken in ("", "scrypt$1$2", "md5$x$y$z$a$b", "scrypt$16384$8$1$!!$??", encoded[:-4]):
        assert not verify_password("correct horse", broken)


def test_pairs_from_the_command_line_log_in_with_every_role():
    users = Users.from_pairs(["alice:pa:ss", "bob:secret"])
    assert users.check("alice", "pa:ss") and users.check("bob", "secret")  # a colon may be in a password
    assert not users.check("alice", "secret") and not users.check("mallory", "secret") and not users.check("", "")
    assert users.get("alice").reviewer and users.names == ["alice", "bob"]
    for bad in (["alice"], ["alice:"], ["a b:pw"], ["alice:x", "alice:y"]):
        with pytest.raises(UsersError):
            Users.from_pairs(bad)


def test_a_users_file_round_trips_with_roles_and_owner_only_permissions(tmp_path):
    path = tmp_path / "users.txt"
    Users([User("alice", hash_password("a-password")),
           User("carol", hash_password("c-password"), frozenset({"annotator", "reviewer"}))]).save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "a-password" not in path.read_text()
    users = Users.from_file(path)
    assert users.check("alice", "a-password") and users.check("carol", "c-password")
    assert not users.get("alice").reviewer and users.get("carol").reviewer


@pytest.mark.parametrize("text, message", [
    ("alice:plaintext\n", "line 1: expected name:scrypt-hash"),
    ("# c\n\nalice:scrypt$1$1$1$a$b:admin\n", "line 3: unknown role"),
    ("al ice:scrypt$1$1$1$a$b\n", "line 1: user name"),
    ("alice:scrypt$1$1$1$a$b\nalice:scrypt$1$1$1$a$b\n", "given twice"),
])
def test_a_bad_users_file_is_refused_naming_the_line(tmp_path, text, message):
    path = tmp_path / "users.txt"
    path.write_text(text)
    with pytest.raises(UsersError, match=message):
        Users.from_file(path)


def test_a_missing_users_file_is_a_clear_error(tmp_path):
    with pytest.raises(UsersError, match="cannot read the users file"):
        Users.from_file(tmp_path / "nope.txt")


def cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "workbench.users", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=60)


def test_the_cli_adds_lists_changes_and_removes_users(tmp_path):
    path = tmp_path / "users.txt"
    assert cli("add", path, "alice", "--password-stdin", stdin="alice-password\n").returncode == 0
    assert cli("add", path, "carol", "--reviewer", "--password-stdin", stdin="carol-password\n").returncode == 0
    listed = cli("list", path).stdout.splitlines()
    assert listed == ["alice annotator", "carol annotator,reviewer"]
    assert cli("add", path, "alice", "--password-stdin", stdin="new-password\n").returncode == 0  # a new password
    users = Users.from_file(path)
    assert users.check("alice", "new-password") and not users.check("alice", "alice-password")
    short = cli("add", path, "bob", "--password-stdin", stdin="short\n")
    assert short.returncode == 2 and "at least 8" in short.stderr and "bob" not in Users.from_file(path)
    assert cli("remove", path, "alice").returncode == 0 and Users.from_file(path).names == ["carol"]
    missing = cli("remove", path, "alice")
    assert missing.returncode == 2 and "no user 'alice'" in missing.stderr
