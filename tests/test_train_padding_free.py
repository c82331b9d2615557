"""Padding-free batches (workbench.train.data.PadCollator with `positions`): a batch's records one after another
in one row, attention kept within each record. The loss and every gradient must be those of the padded batch,
with HSA on and off, for the default VLM (images, NOISE turns) and for text decoders; models whose masks would
not keep the records apart get no padding-free batches."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import models.hsa  # noqa: F401  (registers "hsa")
import models.hsa.attention as attention
from models.data.align import Aligned
from models.hsa import NOISE
from models.vlm.processor import load_processor
from workbench.train import DEFAULT_MODEL, data, parse_config
from workbench.train.run import load_model


@pytest.fixture(scope="module")
def processor():
    return load_processor(str(DEFAULT_MODEL))


@pytest.fixture(scope="module")
def items(processor, tmp_path_factory):
    from models.zoo import shapes

    out = tmp_path_factory.mktemp("shapes")
    shapes.export_sharegpt(shapes.generate(7, seed=2, noise=shapes.TRAIN_NOISE), out, name="shapes")
    records = json.loads((out / "shapes.json").read_text())
    records.insert(2, {"conversations": [{"from": "human", "value": "Hi there, no picture today."},
                                         {"from": "gpt", "value": "Hello."}]})
    prepared = data.prepare(records, processor, image_root=out, max_length=1024, cache_dir=tmp_path_factory.mktemp("c"))
    return prepared.items, out


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("hsa", [True, False])
def test_the_default_vlm_learns_the_same_from_a_padding_free_batch(processor, items, hsa, tmp_path):
    records, image_root = items
    config = parse_config({"dataset": str(image_root / "shapes.json"), "base_model": str(DEFAULT_MODEL),
                           "hsa": hsa, "dtype": "float32", "lora_dropout": 0.0})
    model = load_model(config)
    model.train()
    positions = data.record_positions(model)
    assert positions is not None
    # without HSA too: "hsa" without semantic_ids is SDPA that attends record by record in these batches
    assert model.get_base_model().config._attn_implementation == "hsa"
    padded = data.PadCollator(processor, image_root=image_root, hsa=hsa)
    packed = data.PadCollator(processor, image_root=image_root, hsa=hsa, positions=positions)
    for batch_items in (records[:4], records[4:8], records[1:3]):
        batch = packed(batch_items)
        assert batch["input_ids"].shape == (1, sum(len(i) for i in batch_items)) and "attention_mask" not in batch
        assert batch["position_ids"].shape == (4, 1, batch["input_ids"].shape[1])
        assert_same(loss_and_grads(model, padded(batch_items)), loss_and_grads(model, batch))


def text_items(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        length = int(torch.randint(6, 30, (1,), generator=gen))
        ids = torch.randint(3, 120, (length,), generator=gen)
        roles = torch.randint(0, 3, (length,), generator=gen)
        labels = torch.where(torch.rand(length, generator=gen) < 0.5, ids, torch.full_like(ids, -100))
        labels[0] = -100
        out.append(data.Item(ids, labels, roles))
    return out


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("hsa", [True, False])
def test_text_decoders_learn_the_same_from_a_padding_free_batch(name, hsa):
    from test_hsa_models import text_model

    model = text_model(name, "hsa" if hsa else "sdpa").train()
    model.config.use_cache = False
    positions = data.record_positions(model)
    assert positions is not None
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=0)
    processor = SimpleNamespace(tokenizer=tokenizer)
    padded = data.PadCollator(processor, hsa=hsa)
    packed = data.PadCollator(processor, hsa=hsa, positions=positions)
    batch_items = text_items()
    batch = packed(batch_items)
    assert batch["position_ids"].shape == batch["input_ids"].shape
    assert_same(loss_and_grads(model, padded(batch_items)), loss_and_grads(model, batch))


def test_each_record_keeps_its_own_positions_and_its_first_label_is_not_predicted():
    batch_items = text_items(3, seed=4)
    batch = data.PadCollator(SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0)),
                             positions=data._text_positions)(batch_items)
    start = 0
    for item in batch_items:
        stop = start + len(item)
        assert batch["position_ids"][0, start:stop].tolist() == list(range(len(item)))
        assert batch["labels"][0, start] == -100
        assert torch.equal(batch["labels"][0, start + 1:stop], item.labels[1:])
        assert torch.equal(batch["semantic_ids"][0, start:stop], item.semantic_ids)
        start = stop


def test_models_whose_masks_would_not_keep_records_apart_get_padded_batches():
    for model_type in ("hsa_hybrid", "falcon_h1", "llava", "qwen2_5_vl", None):
        model = SimpleNamespace(config=SimpleNamespace(model_type=model_type))
        assert data.record_positions(model) is None, model_type


def block_mask(lengths, pad=0):
    length = sum(lengths) + pad
    segment = torch.cat([torch.full((n,), k) for k, n in enumerate(lengths)] + [torch.full((pad,), -1)])
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = causal & (segment[:, None] == segment[None, :]) & (segment[None, :] >= 0)
    return mask[None, None]


def test_packed_segments_are_read_off_the_models_mask_and_nothing_else_is():
    assert attention._packed_segments(block_mask([3, 5, 2]), 10) == [[(0, 3), (3, 8), (8, 10)]]
    assert attention._packed_segments(block_mask([10]), 10) is None  # one record: plain causal
    assert attention._packed_segments(block_mask([3, 5], pad=2), 10) is None  # padding: not a packed row
    window = torch.ones(8, 8, dtype=torch.bool).tril() & ~torch.ones(8, 8, dtype=torch.bool).tril(-3)
    assert attention._packed_segments(window[None, None], 8) is None  # a sliding window is not records
    assert attention._packed_segments(None, 8) is None


def test_segment_attention_equals_the_dense_rule_on_the_packed_mask():
    gen = torch.Generator().manual_seed(8)
    lengths = [7, 12, 5, 9]
    n = sum(lengths)
    roles = torch.randint(0, 3, (1, n), generator=gen)
    roles[0, 7:19] = NOISE  # a record of NOISE only: plain causal attention there
    q = torch.randn(1, 4, n, 8, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, n, 8, generator=gen, requires_grad=True)
    v = torch.randn(1, 2, n, 8, generator=gen, requires_grad=True)
    mask = block_mask(lengths)
    module = SimpleNamespace(training=False, is_causal=True)
    kind, plan = attention._cpu_plan(module, q, k, mask, roles)
    assert kind == "segments"
    fast = attention.segment_attention(q, k, v, plan)
    allowed = attention.hsa_allowed(module, q, k, mask, roles)
    slow = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    weights = torch.randn(fast.shape, generator=gen)
    for a, b in zip(torch.autograd.grad((fast * weights).sum(), (q, k, v)),
                    torch.autograd.grad((slow * weights).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_records_positions_are_made_once_a_run_and_never_given_to_another_record():
    calls = []

    def positions(a):
        calls.append(len(a))
        return torch.arange(len(a))[None]
    collate = data.PadCollator(SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0)), positions=positions)
    first = text_items(3, seed=5)
    want = collate(first)
    assert len(calls) == 3
    assert all(torch.equal(collate(first)[k], want[k]) for k in want) and len(calls) == 3  # kept
    del want
    for seed in range(6, 12):  # new items, some perhaps where freed ones were: each gets its own positions
        others = text_items(3, seed=seed)
        batch = collate(others)
        assert batch["position_ids"][0].tolist() == [p for item in others for p in range(len(item))]


def test_padding_free_false_gives_padded_batches_and_the_runs_own_attention(tmp_path):
    """The opt-out: `padding_free: false` keeps batches padded (as before, and as a run elsewhere pads them),
    and a run without HSA keeps plain SDPA."""
    from workbench.train.run import padding_free_positions

    base = {"dataset": str(tmp_path / "d.json"), "base_model": str(DEFAULT_MODEL), "hsa": False, "dtype": "float32"}
    padded = parse_config(base | {"padding_free": False}, base_dir=tmp_path)
    model = load_model(padded)
    assert padding_free_positions(model, padded) is None
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    free = parse_config(base, base_dir=tmp_path)
    assert free.padding_free and padding_free_positions(load_model(free), free) is not None
