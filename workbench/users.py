"""Who may log in to a workbench that others reach, and who may review.

Users come from `--auth USER:PASSWORD` (repeatable, for a quick start) or from a users file
(`--users FILE`), one user a line:

    # name:password hash[:roles]
    alice:scrypt$16384$8$1$<salt>$<hash>
    carol:scrypt$16384$8$1$<salt>$<hash>:reviewer

Passwords are kept only as salted scrypt hashes (the file is written by
`python -m workbench.users add FILE NAME`, which asks for the password). The logged-in name is the
annotator's name in the Annotate tab; a `reviewer` may also accept labels for training in the Review
panel. Users given with `--auth` have every role: the command line is for a small team that trusts
itself, the file for a lab that splits the work.
"""
from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import os
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

ROLES = ("annotator", "reviewer")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")  # what a name may be: it is written into the history
SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1}  # about 50 ms a check: cheap for a login, dear for a guesser


class UsersError(ValueError):
    """A users file or a user that cannot be used; the message names the line or the user."""


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **SCRYPT, dklen=32)
    encode = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"scrypt${SCRYPT['n']}${SCRYPT['r']}${SCRYPT['p']}${encode(salt)}${encode(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether `password` matches the hash `encoded` (in constant time for a given hash)."""
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest, validate=True)
        if len(expected) != 32:  # a shortened hash would match on its prefix
            return False
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt, validate=True), n=int(n), r=int(r),
                             p=int(p), dklen=32, maxmem=2 ** 27)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    roles: frozenset[str] = frozenset({"annotator"})

    @property
    def reviewer(self) -> bool:
        return "reviewer" in self.roles


def check_name(name: str) -> str:
    if not NAME.fullmatch(name or ""):
        raise UsersError(f"user name {name!r}: letters, digits and . _ @ - only (at most 64, starting with a "
                         "letter or digit)")
    return name


class Users:
    """The users of one server. `check` is the login test Gradio's `launch(auth=...)` calls."""

    def __init__(self, users=()):
        self._users: dict[str, User] = {}
        for user in users:
            if user.name in self._users:
                raise UsersError(f"user {user.name!r} is given twice")
            self._users[user.name] = user
        # a login with an unknown name costs a hash too, so timing does not tell which names exist
        self._decoy = hash_password(secrets.token_hex(8))

    @classmethod
    def from_pairs(cls, pairs) -> "Users":
        """`USER:PASSWORD` strings from the command line: hashed here, kept in memory only, every role."""
        users = []
        for pair in pairs:
            name, sep, password = pair.partition(":")
            if not sep or not password:
                raise UsersError(f"--auth takes USER:PASSWORD, got {name!r} without a password")
            users.append(User(check_name(name), hash_password(password), frozenset(ROLES)))
        return cls(users)

    @classmethod
    def from_file(cls, path) -> "Users":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UsersError(f"cannot read the users file {path}: {error}") from None
        users = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(":")
            if len(parts) not in (2, 3) or not parts[1].startswith("scrypt$"):
                raise UsersError(f"{path.name} line {number}: expected name:scrypt-hash[:roles] "
                                 "(write users with `python -m workbench.users add FILE NAME`)")
            roles = {"annotator", *(r.strip() for r in parts[2].split(",") if r.strip())} if len(parts) == 3 \
                else {"annotator"}
            unknown = roles - set(ROLES)
            if unknown:
                raise UsersError(f"{path.name} line {number}: unknown role(s) {sorted(unknown)}; roles are {ROLES}")
            try:
                users.append(User(check_name(parts[0]), parts[1], frozenset(roles)))
            except UsersError as error:
                raise UsersError(f"{path.name} line {number}: {error}") from None
        try:
            return cls(users)
        except UsersError as error:
            raise UsersError(f"{path.name}: {error}") from None

    def check(self, name: str, password: str) -> bool:
        user = self._users.get(name)
        ok = verify_password(password or "", user.password_hash if user else self._decoy)
        return ok and user is not None

    def __contains__(self, name) -> bool:
        return name in self._users

    def __len__(self) -> int:
        return len(self._users)

    def get(self, name: str | None) -> User | None:
        return self._users.get(name) if name else None

    @property
    def names(self) -> list[str]:
        return sorted(self._users)

    def with_user(self, user: User) -> "Users":
        return Users([u for u in self._users.values() if u.name != user.name] + [user])

    def without(self, name: str) -> "Users":
        if name not in self._users:
            raise UsersError(f"there is no user {name!r}")
        return Users([u for u in self._users.values() if u.name != name])

    def save(self, path) -> None:
        """Write the users file atomically, readable by its owner only (it holds password hashes)."""
        path = Path(path)
        lines = ["# HSA Workbench users: name:scrypt-hash[:roles]; edit with python -m workbench.users"]
        for user in sorted(self._users.values(), key=lambda u: u.name):
            extra = sorted(user.roles - {"annotator"})
            lines.append(f"{user.name}:{user.password_hash}" + (f":{','.join(extra)}" if extra else ""))
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write("\n".join(lines) + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.users", description="Edit a users file.")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="add a user or set their password (asked for, or read from stdin)")
    add.add_argument("file", type=Path)
    add.add_argument("name")
    add.add_argument("--reviewer", action="store_true", help="may also accept labels in the Review panel")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    remove = commands.add_parser("remove", help="remove a user")
    remove.add_argument("file", type=Path)
    remove.add_argument("name")
    listing = commands.add_parser("list", help="list the users and their roles")
    listing.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    try:
        users = Users.from_file(args.file) if args.command != "add" or args.file.exists() else Users()
        if args.command == "list":
            for name in users.names:
                print(name, ",".join(sorted(users.get(name).roles)))
            return 0
        if args.command == "remove":
            users.without(args.name).save(args.file)
            print(f"removed {args.name}")
            return 0
        check_name(args.name)
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        else:
            password = getpass.getpass(f"password for {args.name}: ")
            if password != getpass.getpass("again: "):
                raise UsersError("the two passwords differ")
        if len(password) < 8:
            raise UsersError("a password needs at least 8 characters")
        roles = frozenset({"annotator", "reviewer"} if args.reviewer else {"annotator"})
        users.with_user(User(args.name, hash_password(password), roles)).save(args.file)
        print(f"saved {args.name} ({', '.join(sorted(roles))}) in {args.file}")
        return 0
    except UsersError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
