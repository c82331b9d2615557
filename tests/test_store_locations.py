"""Where the store lives: paths and URLs (sqlite:///, postgresql://), the image folder a URL carries,
and the places that hand a database to a Store: the app's --db, training and evaluation configs, the
path rule of a server that others can reach."""
from __future__ import annotations

from pathlib import Path

import pytest

from workbench.paths import PathRefused, PathRule
from workbench.store import Store, StoreError, import_records
from workbench.store.engine import LocationError, locate


def record(user="What colour is the circle?"):
    return {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": "Red."}]}


def test_paths_and_urls_name_the_same_kinds_of_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = locate("data/w.db")
    assert plain.kind == "sqlite" and plain.path == tmp_path / "data" / "w.db" and plain.image_dir is None
    assert locate(tmp_path / "data" / "w.db").path == plain.path
    assert locate("sqlite:///data/w.db").path == plain.path  # SQLAlchemy's relative form
    assert locate(f"sqlite:///{tmp_path}/data/w.db").path == plain.path  # and its absolute one
    with_images = locate(f"sqlite:///data/w.db?image_dir={tmp_path}/pics")
    assert with_images.image_dir == tmp_path / "pics" and "image_dir" not in str(with_images.url)
    for url in ("postgresql://ann@db.lab/hsa", "postgres://ann@db.lab/hsa", "postgresql+psycopg://ann@db.lab/hsa",
                "postgresql+psycopg2://ann@db.lab/hsa"):
        pg = locate(url)
        assert pg.kind == "postgresql" and pg.path is None and pg.url.drivername == "postgresql+psycopg"
        assert pg.url.database == "hsa" and pg.url.host == "db.lab"
    secret = locate("postgresql://ann:s3cret@db.lab:5433/hsa?image_dir=/srv/images")
    assert "s3cret" not in secret.display and "s3cret" not in secret.identity and secret.image_dir == Path("/srv/images")
    assert locate(secret.as_string()).url == secret.url  # what another process is given opens the same database
    for bad, why in [("mysql://ann@db/hsa", "unsupported database"), ("postgresql://ann@db", "names no database"),
                     ("sqlite:///:memory:", "needs a file"), ("", "not a database path")]:
        with pytest.raises(LocationError, match=why):
            locate(bad)
    with pytest.raises(LocationError) as e:
        locate("oracle://ann:s3cret@db/x")
    assert "s3cret" not in str(e.value)


def test_a_sqlite_url_opens_the_same_store_as_its_path(tmp_path):
    path = tmp_path / "db" / "w.db"
    with Store(f"sqlite:///{path}") as store:
        assert store.path == path and store.image_dir == tmp_path / "db" / "images" and store.url == str(path)
        [cid] = import_records(store, "d", [("record 0", record())]).conversation_ids
    with Store(path) as store:
        assert store.conversation(cid).turns[0].text == "What colour is the circle?"
    with Store(f"sqlite:///{path}?image_dir={tmp_path}/pics") as store:
        assert store.image_dir == tmp_path / "pics"
        with Store(store.url) as again:  # Store.url carries the image folder to another process
            assert again.image_dir == tmp_path / "pics" and again.path == path
    with pytest.raises(StoreError, match="unsupported database"):
        Store("mysql://x@y/z")


def test_a_postgresql_store_url_carries_its_images(store_url):
    with Store(store_url) as store:
        assert Store(store.url).image_dir == store.image_dir
        if store.kind == "postgresql":
            assert store.path is None and "image_dir=" in store.url and store.name.startswith("postgresql://")


def test_an_unreachable_postgresql_server_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="cannot reach the annotation database postgresql://nobody@/nothing"):
        Store(f"postgresql://nobody@/nothing?host={tmp_path}&port=1", busy_timeout_s=2)


def test_the_apps_db_flag_takes_a_path_or_a_url(tmp_path):
    import app
    from workbench.ui.context import AppContext

    assert app.parse_args(["--db", "postgresql://ann@db/hsa"]).db == "postgresql://ann@db/hsa"
    default = AppContext.create(tmp_path / "ws")
    assert default.db_path == tmp_path / "ws" / "workbench.db" and default.image_dir == tmp_path / "ws" / "images"
    assert AppContext.create(tmp_path / "ws", db_path=str(tmp_path / "x.db")).db_path == tmp_path / "x.db"
    assert AppContext.create(tmp_path / "ws", db_path=f"sqlite:///{tmp_path}/y.db").db_path == tmp_path / "y.db"
    pg = AppContext.create(tmp_path / "ws", db_path="postgresql://ann@db/hsa", confined=True)
    assert pg.db_path == f"postgresql://ann@db/hsa?image_dir={tmp_path / 'ws' / 'images'}"
    assert pg.image_dir == tmp_path / "ws" / "images"
    given = AppContext.create(tmp_path / "ws", db_path="postgresql://ann@db/hsa?image_dir=/srv/pics")
    assert given.db_path == "postgresql://ann@db/hsa?image_dir=/srv/pics" and given.image_dir == Path("/srv/pics")
    # a server that others can reach opens its own database, not one a form names
    assert pg.paths.path(pg.db_path, "store_db") == pg.db_path
    with pytest.raises(PathRefused, match="opens the annotation database it was started with only"):
        pg.paths.path("postgresql://ann@elsewhere/other", "store_db")


def test_the_path_rule_checks_the_file_of_a_sqlite_url(tmp_path):
    rule = PathRule(tmp_path / "ws", confined=True)
    (tmp_path / "ws").mkdir()
    assert rule.path("sqlite:///db.sqlite", "store_db") == "sqlite:///db.sqlite"
    assert rule.path(f"sqlite:///{tmp_path}/ws/db.sqlite", "store_db") == f"sqlite:///{tmp_path}/ws/db.sqlite"
    with pytest.raises(PathRefused, match="outside the workspace"):
        rule.path("sqlite:////etc/other.db", "store_db")
    with pytest.raises(PathRefused, match="outside the workspace"):
        rule.path(f"sqlite:///{tmp_path}/ws/db.sqlite?image_dir=/etc", "store_db")
    assert PathRule(tmp_path / "ws").path("postgresql://ann@db/x", "store_db") == "postgresql://ann@db/x"  # not confined


def test_training_and_evaluation_configs_take_a_database_url(store_url, tmp_path):
    from workbench.evaluate.run import parse_config as eval_config
    from workbench.train.config import _check_store_dataset, parse_config
    from workbench.train.run import load_records

    with Store(store_url) as store:
        import_records(store, "d", [(f"record {i}", record(f"Q{i}?")) for i in range(4)])
        location = store.url
    config = parse_config({"dataset": "store:d", "store_db": location}, base_dir=tmp_path)
    assert config.store_db == location  # a URL is not a path relative to the config's folder
    problems: list[str] = []
    _check_store_dataset(config, problems)
    assert problems == []
    assert [c.turns[0].text for c in load_records(config)] == [f"Q{i}?" for i in range(4)]
    missing = parse_config({"dataset": "store:nope", "store_db": location}, base_dir=tmp_path)
    _check_store_dataset(missing, problems)
    assert problems == ["store dataset 'nope' has no conversations (datasets: d)"]
    assert eval_config({"models": ["default"], "dataset": "store:d", "store_db": location, "output_dir": "out"},
                       base_dir=tmp_path).store_db == location
