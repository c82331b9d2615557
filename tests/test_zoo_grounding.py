"""The shapes world's grounding questions: behind `grounding=True`, boxes around the drawn pixels on
the 0-1000 grid, and the default stream untouched."""
from __future__ import annotations

import numpy as np

from models.zoo import shapes
from workbench.evaluate import metrics as M


def test_grounding_is_off_by_default_and_leaves_the_stream_alone():
    plain = shapes.generate(30, seed=4, noise=shapes.TRAIN_NOISE)
    assert all(shapes.GROUNDING not in s.qtypes for s in plain)
    again = shapes.generate(30, seed=4, noise=shapes.TRAIN_NOISE, grounding=False)
    assert [s.record["conversations"] for s in plain] == [s.record["conversations"] for s in again]


def test_box_answers_enclose_the_drawn_shape():
    samples = shapes.generate(40, seed=0, split="eval", grounding=True)
    asked = 0
    for sample in samples:
        answers = [t["value"] for t in sample.record["conversations"] if t.get("semantic_type") == shapes.LANDMARK]
        pixels = np.asarray(sample.record["images"][0]).astype(int)
        for qtype, answer in zip(sample.qtypes, answers):
            if qtype != shapes.GROUNDING:
                continue
            asked += 1
            ref = M.parse_ref(answer)
            color, kind = ref.split()[1:]
            shape = sample.scene.by_kind(kind)
            assert shape.color == color
            x1, y1, x2, y2 = shapes.shape_box(sample.scene, shape)
            # the shape's own colour lies inside its pixel box and not beyond a pixel outside it
            target = np.array(shapes.COLORS[color])
            mask = (np.abs(pixels - target).max(axis=2) <= 15)
            ys, xs = np.nonzero(mask)
            assert xs.min() >= x1 - 1 and xs.max() <= x2 + 1 and ys.min() >= y1 - 1 and ys.max() <= y2 + 1
            # the answer is the grid box, and grades right against itself
            assert M.parse_box(answer) == tuple(float(v) for v in shapes.to_grid((x1, y1, x2, y2)))
            assert M.grade_box(answer, answer)["correct"]
    assert asked >= 5


def test_box_answer_format():
    assert shapes.box_answer("the red circle", (1, 2, 3, 4)) == "<ref>the red circle</ref><box>[(1, 2), (3, 4)]</box>"
    assert shapes.to_grid((0, 14, 28, 56)) == (0, 250, 500, 1000)
