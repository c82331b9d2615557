"""What every tab needs to know about this running workbench."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from models.zoo import DEFAULT_VLM_DIR as DEFAULT_VLM
from models.zoo import EMBEDDED
from workbench.paths import PathRule, is_database_url, sqlite_url_path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class AppContext:
    workspace: Path  # every file the workbench writes or serves lives under here
    # the annotation database, as Store() opens it: a SQLite file, or a database URL (PostgreSQL, with its
    # ?image_dir=, which defaults to WORKSPACE/images); see database_location
    db_path: Path | str
    runs_dir: Path  # training runs: one directory each
    default_model: Path = DEFAULT_VLM
    allowed_paths: tuple[Path, ...] = ()  # folders the operator named (--allow-path) besides the workspace
    confined: bool = False  # others can reach the server: forms name files in the workspace and those only
    users: object = None  # workbench.users.Users when there is a login: the logged-in name is the annotator's

    def person(self, typed: str | None, request=None) -> str:
        """Who is at a browser: with a login, the logged-in user (a name box then only shows it; what a
        browser sends in it is ignored); without one, the name typed in."""
        if self.users is not None:
            return (getattr(request, "username", None) or "") if request is not None else ""
        return (typed or "").strip()

    def may_review(self, who: str) -> bool:
        """Reviewers (and, without a login, anyone who gives a name) accept labels for training."""
        if self.users is None:
            return bool(who)
        user = self.users.get(who)
        return user is not None and user.reviewer

    @classmethod
    def create(cls, workspace: Path, db_path: Path | None = None, default_model: Path | None = None,
               allowed_paths=(), confined: bool = False, users=None):
        workspace = Path(workspace).resolve()
        for sub in ("uploads", "exports", "runs", "tmp"):
            (workspace / sub).mkdir(parents=True, exist_ok=True)
        return cls(workspace=workspace, db_path=database_location(db_path, workspace),
                   runs_dir=workspace / "runs", default_model=Path(default_model or DEFAULT_VLM),
                   allowed_paths=tuple(Path(p).resolve() for p in allowed_paths), confined=confined, users=users)

    @property
    def paths(self) -> PathRule:
        """The rule for paths typed into a form (workbench.paths): the workspace, the allowed folders and
        the annotation database; embedded models, the default model and hub ids."""
        return PathRule(self.workspace, allowed=(*self.allowed_paths, *self.database_files()), confined=self.confined,
                        models=(self.default_model,), databases=(self.db_path,) if isinstance(self.db_path, str) else ())

    def database_files(self) -> tuple[Path, ...]:
        """The SQLite database file of the store, if it is one (a PostgreSQL store has none here)."""
        if isinstance(self.db_path, Path):
            return (self.db_path,)
        file = sqlite_url_path(self.db_path)
        return (Path(file).resolve(),) if file else ()

    @property
    def image_dir(self) -> Path:
        """Where the annotation store keeps its images (what the pages show of it)."""
        if isinstance(self.db_path, Path):
            return self.db_path.parent / "images"
        from workbench.store.engine import locate

        location = locate(self.db_path)
        return location.image_dir or (location.path.parent / "images" if location.path else self.workspace / "images")

    def resolve_model(self, name: str | None) -> str:
        """'' / 'default' -> the default model; an embedded model's name ('composed', ...) -> its
        directory; anything else is a path or a hub id."""
        name = (name or "").strip()
        if name in ("", "default"):
            return str(self.default_model)
        return str(EMBEDDED.get(name, name))

    def model_source(self, name: str | None, what: str = "model") -> str:
        """What a loader gets for a model a form names: '' / 'default' and the embedded names -> their
        folder, a hub id as given, a path resolved against the workspace. On a server that others can
        reach, a path outside the workspace and the allowed folders is refused (PathRefused, naming
        `what`): the one rule of workbench.paths, for every tab that loads a model or tokenizer."""
        return self.paths.model(self.resolve_model(name), what)

    @staticmethod
    def embedded_names() -> list[str]:
        """The embedded models that are built (their directory has a config), by name."""
        return [name for name, directory in EMBEDDED.items() if (directory / "config.json").is_file()]

    def inside_workspace(self, path: str | Path) -> Path:
        """The resolved path, refused when it would leave the workspace (uploads, exports)."""
        resolved = (self.workspace / path).resolve()
        if resolved != self.workspace and self.workspace not in resolved.parents:
            raise ValueError(f"{path} is outside the workspace {self.workspace}")
        return resolved


def database_location(value, workspace: Path) -> Path | str:
    """The app's annotation database from `--db`: none -> WORKSPACE/workbench.db; a path or a sqlite:///
    URL without ?image_dir= -> the file (resolved); any other URL as given, a PostgreSQL one with
    ?image_dir=WORKSPACE/images added when it names none (every process of the app, and the runs it
    starts, then keep images in one place)."""
    if not value:
        return (Path(workspace) / "workbench.db").resolve()
    text = str(value).strip()
    if not is_database_url(text):
        return Path(text).expanduser().resolve()
    file = sqlite_url_path(text)
    if file is not None and "image_dir=" not in text:
        return Path(file).expanduser().resolve()
    if file is None and "image_dir=" not in text:
        text += ("&" if "?" in text else "?") + f"image_dir={Path(workspace).resolve() / 'images'}"
    return text


@functools.lru_cache(maxsize=4)
def cached_processor(name: str):
    """Tokenizers/processors are loaded once per model name and shared by the tabs (read-only use)."""
    from models.vlm.processor import load_processor

    return load_processor(name)
