"""The entity rules shared by training, evaluation and preparation (``agree.data.entities``)."""

import torch

from agree.data.entities import kept_entities, scatter_slots, slot_mask


def test_kept_entities_drops_long_ones_then_keeps_the_first():
    entities = ["a dog", "a very long entity of eight words here", "grass", "a red ball", "sky"]
    assert kept_entities(entities, 7) == ["a dog", "grass", "a red ball", "sky"]
    assert kept_entities(entities, 7, 2) == ["a dog", "grass"]
    assert kept_entities(entities, None, 2) == entities[:2]  # the release at test time: any length
    assert kept_entities(entities, 1) == ["grass", "sky"]


def test_slot_mask_marks_the_first_slots_of_each_row():
    assert slot_mask([0, 2, 5], 3).tolist() == [[False] * 3, [True, True, False], [True] * 3]
    assert slot_mask([], 4).shape == (0, 4)


def test_scatter_slots_puts_rows_in_the_valid_slots_in_order_and_keeps_gradients():
    valid = slot_mask([2, 0, 1], 3)
    rows = torch.arange(6.0).reshape(3, 2).requires_grad_()
    slots = scatter_slots(rows, valid)
    assert slots.shape == (3, 3, 2)
    assert torch.equal(slots[valid], rows.detach()) and not slots[~valid].any()
    slots.sum().backward()
    assert torch.equal(rows.grad, torch.ones(3, 2))
