"""Batch layout: left padding, packing plans and packed inputs checked against hand-computed cases."""

from __future__ import annotations

import torch

from lmedit.forward import build_inputs, left_pad, plan_packed


def test_left_pad_positions_ignore_padding():
    ids, mask, positions = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_packed_plan_fills_rows_and_respects_limits():
    lengths = [5, 9, 3, 7, 2, 8, 4]
    plan = plan_packed(lengths, max_sequences=4, max_tokens=24, row_capacity=10)
    seen = sorted(i for batch in plan for row in batch for i in row)
    assert seen == list(range(len(lengths)))
    for batch in plan:
        width = max(sum(lengths[i] for i in row) for row in batch)
        assert width <= 10 and len(batch) * width <= 24
        assert sum(len(row) for row in batch) <= 4
    assert any(len(row) > 1 for batch in plan for row in batch)  # short sequences share rows


def test_packed_inputs_isolate_sequences_and_restart_positions():
    inputs = build_inputs([[0, 1], [2]], [[5, 6], [7, 8, 9], [4]], pad_id=0, mask_dtype=torch.float32)
    assert inputs.input_ids.tolist() == [[5, 6, 7, 8, 9], [0, 0, 0, 0, 4]]
    assert inputs.position_ids.tolist() == [[0, 1, 0, 1, 2], [0, 0, 0, 0, 0]]
    allowed = inputs.attention_mask[0, 0] == 0
    assert allowed[3].tolist() == [False, False, True, True, False]  # 2nd sequence sees only itself, causally
    assert allowed[1].tolist() == [True, True, False, False, False]
    assert inputs.starts == {0: (0, 0), 1: (0, 2), 2: (1, 4)}
    # padding attends to itself only, so no row of the mask is empty (an empty row gives NaN)
    assert bool((inputs.attention_mask[1, 0] == 0).any(dim=-1).all())
