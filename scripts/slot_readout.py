"""What a shapes model's image tokens carry: how well a linear read-out tells each image token's slot
(and the kind it shows) from the vision features and from the language model's residual stream after
each layer, for cells with a shape and empty cells apart. Read-outs are fitted (L-BFGS, small L2) on
70% of the tokens of fresh conversations and scored on the rest.

Then whether the answers find those tokens: at every query that predicts an answer's word about a
shape ("The circle is at the| top| left", "The red shape is a| circle"), the attention each layer's
best head gives that shape's image token among the image's four (`ShapeLookup`; about 0.25 is no
preference), in scenes of 2-3 shapes, for cell words and for the other words apart.

    .venv/bin/python scripts/slot_readout.py [--model DIR] [--n 400]
"""
from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from models.zoo import DEFAULT_VLM_DIR  # noqa: E402


def fit_and_score(features, labels, train, classes: int):
    """Held-out correctness of a linear read-out fitted on the `train` rows (standardised features)."""
    import torch

    mean, std = features[train].mean(0), features[train].std(0) + 1e-6
    x = (features - mean) / std
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[train] @ weight + bias, labels[train]) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (x[~train] @ weight + bias).argmax(1) == labels[~train]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_VLM_DIR)
    parser.add_argument("--n", type=int, default=400, help="conversations (4 image tokens each)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from models.zoo import shapes
    from models.zoo.build import ShapeLookup, attention_inputs
    from models.data.align import HSACollator

    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
    collate = HSACollator(processor)
    samples = shapes.generate(args.n, seed=7, split="readout")
    layers: dict[str, list] = {}
    kinds = []
    lookup, found, about_cells = ShapeLookup(processor.tokenizer), [], []
    text_layers = model.model.language_model.layers
    for start in range(0, len(samples), 50):
        chunk = samples[start:start + 50]
        batch = collate([s.record for s in chunk])
        merged = []
        hook = model.model.visual.merger.register_forward_hook(lambda module, inputs, output: merged.append(output))
        answers = lookup.answer_tokens(batch)
        batch.pop("labels")
        with torch.no_grad(), attention_inputs(model, range(len(text_layers))) as inputs:
            out = model(**batch, output_hidden_states=True)
            queries = lookup.queries(batch["input_ids"], answers, [s.scene for s in chunk])
            queries = queries[torch.tensor([len(chunk[b].scene.shapes) > 1 for b in queries[:, 0].tolist()],
                                           dtype=torch.bool)]
            image_positions = ShapeLookup.image_positions(batch["input_ids"], model.config.image_token_id)
            found.append(torch.stack([ShapeLookup.attention_to_named(layer.self_attn, *inputs[i], image_positions, queries)
                                      for i, layer in enumerate(text_layers)]))  # (layers, queries, heads)
            predicted = batch["input_ids"][queries[:, 0], queries[:, 1] + 1]
            about_cells.append(torch.tensor([word in lookup.cell_words for word in predicted.tolist()], dtype=torch.bool))
        hook.remove()
        image = batch["input_ids"] == model.config.image_token_id
        layers.setdefault("vision", []).append(merged[0])
        for k, hidden in enumerate(out.hidden_states[1:], start=1):
            layers.setdefault(f"after layer {k}", []).append(hidden[image])
        for sample in chunk:
            by_slot = {s.slot: s.kind for s in sample.scene.shapes}
            kinds += [1 + shapes.KINDS.index(by_slot[slot]) if slot in by_slot else 0 for slot in shapes.SLOTS]
    kinds = torch.tensor(kinds)
    slots = torch.arange(len(kinds)) % len(shapes.SLOTS)  # image tokens run over the slots in reading order
    train = torch.rand(len(kinds), generator=torch.Generator().manual_seed(0)) < 0.7
    shown = kinds[~train] > 0
    print(f"{args.model}: held-out accuracy of linear read-outs over {int((~train).sum())} image tokens")
    print(f"{'features':<14} {'slot':>6} {'slot (shape)':>13} {'slot (empty)':>13} {'kind':>6}")
    for name, parts in layers.items():
        features = torch.cat(parts)
        slot_ok = fit_and_score(features, slots, train, len(shapes.SLOTS)).float()
        kind_ok = fit_and_score(features, kinds, train, 1 + len(shapes.KINDS)).float()
        print(f"{name:<14} {slot_ok.mean():>6.3f} {slot_ok[shown].mean():>13.3f} {slot_ok[~shown].mean():>13.3f} "
              f"{kind_ok.mean():>6.3f}")
    found, about_cells = torch.cat(found, dim=1), torch.cat(about_cells)
    for name, rows in (("cell words", about_cells), ("colour and kind words", ~about_cells)):
        print(f"\nattention on the shape's image token at {int(rows.sum())} queries predicting {name} "
              f"(scenes of 2-3 shapes; about 0.25 = none)")
        for i, heads in enumerate(found[:, rows].mean(1)):
            print(f"layer {i}: best head {heads.max():.2f} (head {int(heads.argmax())}), all heads "
                  + " ".join(f"{h:.2f}" for h in heads.tolist()))


if __name__ == "__main__":
    main()
