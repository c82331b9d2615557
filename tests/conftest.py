"""Shared fixtures: tokenizers and processors built locally (no hub), tiny models from configs,
and a real workbench server with a real headless Chromium for browser tests."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A different template family: role tags, trimmed content, a [SEP] closing each turn.
TAGGED_TEMPLATE = (
    "[CLS]{% for message in messages %}<{{ message['role'] }}> {{ message['content'] | trim }} [SEP]"
    "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
CORPUS = [
    "What color is the circle? The circle is red. How many shapes are there? There are three shapes.",
    "I think the square is green. Is the triangle on the left or the right? It is on the left.",
    "Describe the image. A blue circle, a yellow square and a green triangle.",
    "这个圆是什么颜色？ 红色。 emoji 🙂👍🏽 café naïve e\u0301 zebra giraffe hello there",
] * 20


def build_bpe_tokenizer():
    """A byte-level BPE with the Qwen2-VL special tokens and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_wordpiece_tokenizer():
    """A lower-casing WordPiece (BERT style) with a different chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", eos_token="[SEP]")
    fast.chat_template = TAGGED_TEMPLATE
    return fast


def build_qwen2vl_processor(tokenizer=None):
    """A Qwen2-VL processor over the local BPE: 28-pixel merged patches, so a 56x56 image is 4 tokens."""
    from models.vlm.processor import ImageOnlyQwen2VLProcessor, qwen_image_processor

    tokenizer = tokenizer or build_bpe_tokenizer()
    image_processor = qwen_image_processor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14,
                                           merge_size=2, temporal_patch_size=2)
    return ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template=CHATML_TEMPLATE)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return build_bpe_tokenizer()


@pytest.fixture(scope="session")
def wordpiece_tokenizer():
    return build_wordpiece_tokenizer()


@pytest.fixture(scope="session")
def qwen2vl_processor(bpe_tokenizer):
    return build_qwen2vl_processor(bpe_tokenizer)


def tiny_qwen2vl(processor, seed: int = 0, attn_implementation: str = "hsa"):
    """A randomly initialised Qwen2-VL small enough for a unit test."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(name) for name in QWEN_SPECIALS}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def save_tiny_qwen2vl(directory: Path, processor=None, seed: int = 0) -> Path:
    """A tiny random Qwen2-VL saved like any checkpoint (model, tokenizer, image processor)."""
    processor = processor or build_qwen2vl_processor()
    tiny_qwen2vl(processor, seed=seed).save_pretrained(directory)
    processor.tokenizer.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)
    return Path(directory)


def save_vision_part(directory: Path, family: str = "clip", seed: int = 0) -> Path:
    """A tiny random vision encoder of a real family (CLIP with a CLS token, SigLIP without), with its
    image processor: 56x56 images in 28-pixel patches, so four patch features per image."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, SiglipImageProcessor,
                              SiglipVisionConfig, SiglipVisionModel)

    torch.manual_seed(seed)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                 patch_size=28)
    if family == "clip":
        CLIPVisionModel(CLIPVisionConfig(**shape)).save_pretrained(directory)
        CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(directory)
    elif family == "siglip":
        SiglipVisionModel(SiglipVisionConfig(**shape)).save_pretrained(directory)
        SiglipImageProcessor(size={"height": 56, "width": 56}).save_pretrained(directory)
    else:
        raise ValueError(family)
    return Path(directory)


def save_language_part(directory: Path, family: str = "qwen3", tokenizer=None, seed: int = 0) -> Path:
    """A tiny random causal LM of a real family (Qwen3, Llama, or the Mamba+attention hybrid) with the
    local BPE tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    tokenizer = tokenizer or build_bpe_tokenizer()
    torch.manual_seed(seed)
    shape = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=8, **shape))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape))
    elif family == "hybrid":  # the parallel Mamba + attention hybrid (models.hybrid)
        from models.hybrid.testing import tiny_config
        from models.hybrid import HSAHybridForCausalLM

        model = HSAHybridForCausalLM(tiny_config(**{k: v for k, v in shape.items() if k != "max_position_embeddings"}))
    else:
        raise ValueError(family)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def save_tiny_composed(directory: Path, vision: str = "clip", lm: str = "qwen3", seed: int = 0) -> Path:
    """A composed (Llava) VLM from tiny random parts, saved like any checkpoint."""
    from models.composed import assemble, save

    parts = Path(directory).parent / f"{Path(directory).name}-parts"
    model, processor = assemble(save_vision_part(parts / vision, vision, seed), save_language_part(parts / lm, lm, seed=seed))
    return save(model, processor, directory)


def shapes_png(path: Path, color=(255, 0, 0), size: int = 56) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse([8, 8, size - 8, size - 8], fill=color)
    image.save(path)
    return path


def wait_for(predicate, timeout: float = 20.0, step: float = 0.05):
    """Poll until `predicate()` is truthy (and return it), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise TimeoutError("condition not reached")


# --- the real workbench in a real browser -------------------------------------------------------

def end_runs(manager) -> None:
    """Close a test's run manager and SIGKILL whatever of its runs is left: the process group and every
    process carrying the run's marker (DDP ranks, or any child, in sessions of their own)."""
    import signal

    from workbench.jobs.processes import run_marker, run_processes

    manager.close()
    for run in manager.list():
        for pid in run_processes(run.pgid, run_marker(run.pid, run.proc_start)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def manager(tmp_path):
    """A run manager for training runs (one at a time, 5 s to stop); no process outlives the test."""
    from workbench.jobs import RunManager

    m = RunManager(tmp_path / "runs", max_concurrent=1, grace_s=5.0, monitor=False, workdir=tmp_path)
    yield m
    end_runs(m)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the workbench exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the workbench did not answer at {url}:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def running_server(command: list[str], port: int, log: Path, env: dict | None = None):
    """A server process (its own session, output to `log`) until the block ends; yields its URL."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
def workbench_workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(scope="session")
def workbench_url(workbench_workspace):
    """`python app.py` on a free port, as a person would start it; yields its URL."""
    port = free_port()
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--workspace", str(workbench_workspace)]
    with running_server(command, port, workbench_workspace / "server.log") as url:
        yield url


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="session")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: scripts/test.sh installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    yield page
    context.close()


SCREENSHOTS = Path(os.environ.get("WORKBENCH_SCREENSHOTS", "/tmp/screens"))


def logged_in_page(browser, url: str, user: str, password: str):
    """A page of its own (a fresh browser context: its own cookies) on `url`, past Gradio's login form."""
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(url)
    page.wait_for_selector("input[type=password]", timeout=120_000)
    page.fill("input[type=text]", user)
    page.fill("input[type=password]", password)
    page.keyboard.press("Enter")
    return page


def screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


# a dataset small enough for tests that never train on it, large enough for the checks: an empty one is
# refused, and the default eval split holds out one record and leaves one
TINY_DATASET = json.dumps([{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "Hello."}]}
                           for q in ("Hi", "Hello")])


# --- the annotation store on both engines: SQLite and a real PostgreSQL server ---------------------

STORE_ENGINES = ("sqlite", "postgresql")
SKIP_POSTGRES = os.environ.get("HSA_SKIP_POSTGRES") == "1"


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server of our own for the session (initdb + pg_ctl, as the postgres user when run
    as root), stopped and removed at the end. Missing binaries fail the PostgreSQL half of the store
    tests (scripts/test.sh installs Debian's postgresql), unless HSA_SKIP_POSTGRES=1 says to skip it."""
    from workbench.store.pgserver import PostgresNotFound, PostgresServer

    try:
        server, missing = PostgresServer().start(), None
    except PostgresNotFound as e:
        server, missing = None, str(e)
    if missing:
        if SKIP_POSTGRES:
            pytest.skip(f"HSA_SKIP_POSTGRES=1: {missing}")
        pytest.fail(f"{missing}; set HSA_SKIP_POSTGRES=1 to skip the PostgreSQL half of the store tests", pytrace=False)
    try:
        from workbench.store import Store

        # a template with the store's schema: each test's database is a copy of it, migrated already
        with Store(with_images(server.create_database("hsa_template"), server.root / "images")):
            pass
        yield server
    finally:
        server.stop()


_databases = iter(range(10 ** 9))


@contextlib.contextmanager
def postgres_database(server, image_dir: Path, *, template: str = "hsa_template"):
    """A fresh database on `server` (a copy of `template`) for one test; yields its store URL (images in
    `image_dir`), dropped afterwards even if a connection was left open."""
    name = f"t{os.getpid()}_{next(_databases)}"
    url = server.create_database(name, template=template)
    try:
        yield with_images(url, image_dir)
    finally:
        server.drop_database(name)


def with_images(url: str, image_dir) -> str:
    return f"{url}{'&' if '?' in url else '?'}image_dir={image_dir}"


@pytest.fixture(params=STORE_ENGINES)
def store_url(request, tmp_path):
    """Where a test's store lives, once per engine: a SQLite file path (images beside it), or the URL
    of a fresh PostgreSQL database (images in tmp_path/db/images, given in the URL)."""
    if request.param == "sqlite":
        yield str(tmp_path / "db" / "workbench.db")
        return
    server = request.getfixturevalue("postgres_server")
    with postgres_database(server, tmp_path / "db" / "images") as url:
        yield url


@pytest.fixture
def store(store_url):
    """A Store on each engine (see store_url), closed after the test."""
    from workbench.store import Store

    with Store(store_url) as opened:
        yield opened


@pytest.fixture
def blank_postgres_url(postgres_server, tmp_path):
    """A PostgreSQL database with no tables (the store creates its schema on opening)."""
    with postgres_database(postgres_server, tmp_path / "db" / "images", template="template0") as url:
        yield url


def sql(store, query: str, **params) -> list[tuple]:
    """Rows of a query straight on a store's database (either engine), outside the store's API."""
    import sqlalchemy as sa

    with store.engine.connect() as db:
        return [tuple(row) for row in db.execute(sa.text(query), params)]


def table_counts(store) -> dict:
    return {t: sql(store, f"SELECT COUNT(*) FROM {t}")[0][0]
            for t in ("conversations", "turns", "spans", "images", "revisions")}


def check_integrity(store) -> None:
    """SQLite: integrity_check and foreign_key_check; PostgreSQL checks both on every write."""
    if store.kind == "sqlite":
        assert sql(store, "PRAGMA integrity_check")[0][0] == "ok"
        assert sql(store, "PRAGMA foreign_key_check") == []


def empty_store(store) -> None:
    """Remove every row of a store (between hypothesis examples on one PostgreSQL database)."""
    tables = "assignments, copies, revisions, images, spans, turns, conversations, datasets"
    if store.kind == "postgresql":
        sql_write(store, f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
    else:
        for table in tables.split(", "):
            sql_write(store, f"DELETE FROM {table}")


def sql_write(store, query: str, **params) -> None:
    import sqlalchemy as sa

    with store.engine.begin() as db:
        db.execute(sa.text(query), params)
