"""The loss functions against direct formulas on hand-made features."""

import math

import pytest
import torch
import torch.nn.functional as F

from agree.model import losses


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def info_nce_by_hand(a, b, scale, valid=None, same=None):
    """Mean over valid i of (-log softmax_j(scale a_i.b_j)[i] - log softmax_j(scale b_i.a_j)[i]) / 2."""
    n = len(a)
    valid = valid if valid is not None else [True] * n
    terms = []
    for i in range(n):
        if not valid[i]:
            continue
        for x, y in ((a, b), (b, a)):
            cols = [j for j in range(n) if valid[j] and (j == i or not (same and same(i, j)))]
            logits = [scale * float(x[i] @ y[j]) for j in cols]
            terms.append(-(logits[cols.index(i)] - math.log(sum(math.exp(v) for v in logits))))
    return sum(terms) / (2 * sum(valid))


def test_contrastive_matches_formula():
    a = unit([1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1])
    b = unit([1, 0.2, 0], [0.1, 1, 0], [0, 1, 1], [1, 0, 1])
    scale = torch.tensor(10.0)
    assert losses.contrastive_loss(a, b, scale).item() == pytest.approx(
        info_nce_by_hand(a, b, 10.0), rel=1e-5
    )


def test_contrastive_masks_padding_and_duplicates():
    a = unit([1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1])
    b = unit([1, 0.2, 0], [0.1, 1, 0], [0, 1, 1], [1, 0, 1])
    valid = torch.tensor([True, True, False, True])
    got = losses.contrastive_loss(a, b, torch.tensor(5.0), valid_all=valid)
    assert got.item() == pytest.approx(info_nce_by_hand(a, b, 5.0, valid.tolist()), rel=1e-5)
    # rows 0 and 3 share an image id: neither is the other's negative
    keys = torch.tensor([[7, 1], [8, 2], [9, 3], [7, 4]])
    got = losses.contrastive_loss(a, b, torch.tensor(5.0), keys_all=keys)
    same = lambda i, j: bool((keys[i] == keys[j]).any())  # noqa: E731
    assert got.item() == pytest.approx(info_nce_by_hand(a, b, 5.0, same=same), rel=1e-5)


def test_contrastive_local_rows_against_gathered_candidates():
    """Rank r's loss over its rows, times its share, averages over ranks to the global loss."""
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(6, 4), dim=-1), F.normalize(torch.randn(6, 4), dim=-1)
    valid = torch.tensor([True, False, True, True, True, False])
    scale = torch.tensor(7.0)
    whole = losses.contrastive_loss(a, b, scale, valid_all=valid)
    ranks = [
        losses.contrastive_loss(a[r * 3 : r * 3 + 3], b[r * 3 : r * 3 + 3], scale, a, b, r * 3, valid)
        for r in (0, 1)
    ]
    assert (sum(ranks) / 2).item() == pytest.approx(whole.item(), rel=1e-5)


def test_slot_loss_is_mean_over_used_slots_and_ignores_padding():
    torch.manual_seed(1)
    image = F.normalize(torch.randn(4, 3), dim=-1)
    slots = F.normalize(torch.randn(4, 3, 3), dim=-1)
    valid = torch.tensor(
        [[True, True, False], [True, False, False], [True, True, False], [True, False, False]]
    )
    scale = torch.tensor(4.0)
    expected = (
        sum(info_nce_by_hand(image, slots[:, j], 4.0, valid[:, j].tolist()) for j in (0, 1)) / 2
    )  # slot 2 is padding everywhere: not averaged in
    got = losses.slot_contrastive_loss(image, slots, scale, valid)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    garbage = slots.clone()
    garbage[~valid] = 1e3
    assert losses.slot_contrastive_loss(image, garbage, scale, valid).item() == pytest.approx(
        got.item(), rel=1e-6
    )


def test_slot_loss_of_local_rows_against_gathered_slots_and_their_keys():
    """Rank r's prompt loss over its rows against every rank's slots, times its share, averages over
    ranks to the global loss; a slot sharing a key with the query's own is not its negative."""
    torch.manual_seed(2)
    image = F.normalize(torch.randn(6, 4), dim=-1)
    slots = F.normalize(torch.randn(6, 2, 4), dim=-1)
    valid = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0], [1, 1], [1, 0]], dtype=torch.bool)
    keys = torch.tensor([[0, 5], [1, 6], [0, 7], [2, 8], [3, 7], [1, 9]])[..., None]  # [N, E, 1]
    scale = torch.tensor(6.0)
    whole = losses.slot_contrastive_loss(image, slots, scale, valid, keys_all=keys)
    expected = [
        info_nce_by_hand(
            image, slots[:, j], 6.0, valid[:, j].tolist(), lambda i, k, j=j: keys[i, j] == keys[k, j]
        )
        for j in (0, 1)
    ]
    assert whole.item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert whole.item() != pytest.approx(
        losses.slot_contrastive_loss(image, slots, scale, valid).item(), rel=1e-3
    )
    ranks = [
        losses.slot_contrastive_loss(image[r : r + 3], slots[r : r + 3], scale, valid, image, slots, r, keys)
        for r in (0, 3)
    ]
    assert (sum(ranks) / 2).item() == pytest.approx(whole.item(), rel=1e-5)


def test_slot_loss_with_one_used_slot_is_that_slots_loss():
    """One used slot: the mean over used slots is that slot's InfoNCE, divided by 1."""
    torch.manual_seed(3)
    image = F.normalize(torch.randn(3, 4), dim=-1)
    slots = F.normalize(torch.randn(3, 2, 4), dim=-1)
    valid = torch.tensor([[True, False], [True, False], [False, False]])
    got = losses.slot_contrastive_loss(image, slots, torch.tensor(5.0), valid)
    expected = info_nce_by_hand(image, slots[:, 0], 5.0, valid[:, 0].tolist())
    assert expected > 0 and got.item() == pytest.approx(expected, rel=1e-5)


def test_slot_loss_without_any_used_slot_gives_zero_with_graph():
    image = torch.randn(2, 3, requires_grad=True)
    slots = torch.randn(2, 2, 3, requires_grad=True)
    got = losses.slot_contrastive_loss(image, slots, torch.tensor(1.0), torch.zeros(2, 2, dtype=torch.bool))
    got.backward()
    assert got.item() == 0 and image.grad is not None and slots.grad is not None


def test_no_valid_rows_gives_zero_with_graph():
    a = torch.randn(2, 3, requires_grad=True)
    got = losses.contrastive_loss(a, a, torch.tensor(1.0), valid_all=torch.tensor([False, False]))
    got.backward()
    assert got.item() == 0 and a.grad is not None


def test_margin_ranking_matches_formula():
    pos = torch.tensor([0.5, 0.1, 0.3])
    neg = torch.tensor([[0.4, 0.6], [0.0, 0.2], [0.9, 0.3]])
    valid = torch.tensor([[True, True], [True, False], [True, True]])
    scale, margin = torch.tensor(10.0), 0.5
    expected = sum(
        max(0.0, margin - 10.0 * (pos[i] - neg[i, j]).item()) / 10.0
        for i in range(3)
        for j in range(2)
        if valid[i, j]
    )
    got = losses.margin_ranking_loss(pos, neg, scale, margin, valid)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the reference's margin 0, per row
    one = losses.margin_ranking_loss(pos, neg[:, 0], scale)
    assert one.item() == pytest.approx(
        sum(max(0.0, -(pos[i] - neg[i, 0]).item()) for i in range(3)), rel=1e-5
    )
    # a rank's share: the sum over 3 of 6 global rows counts twice
    assert losses.margin_ranking_loss(pos, neg[:, 0], scale, global_size=6).item() == pytest.approx(
        2 * one.item()
    )


def test_margin_ranking_mean_divides_by_the_global_pairs():
    """``margin_reduction=mean``: the sum over the pairs that count, over their global number."""
    pos = torch.tensor([0.5, 0.1, 0.3])
    neg = torch.tensor([[0.4, 0.6], [0.0, 0.2], [0.9, 0.3]])
    valid = torch.tensor([[True, True], [True, False], [True, True]])
    scale = torch.tensor(10.0)
    summed = losses.margin_ranking_loss(pos, neg, scale, 0.5, valid)
    mean = losses.margin_ranking_loss(pos, neg, scale, 0.5, valid, global_pairs=valid.sum())
    assert summed.item() > 0 and mean.item() == pytest.approx(summed.item() / 5, rel=1e-6)
    # this rank's 3 rows of 6, 10 pairs in all: DDP's mean over 2 ranks gives (sum + sum') / 10
    half = losses.margin_ranking_loss(pos, neg, scale, 0.5, valid, global_size=6, global_pairs=10)
    assert half.item() == pytest.approx(2 * summed.item() / 10, rel=1e-6)
    assert losses.margin_ranking_loss(pos, neg, scale, -9.0, valid, global_pairs=0).item() == 0
    # one pair in the global batch: the mean is that pair's hinge
    one = torch.tensor([[False, False], [False, False], [True, False]])
    alone = losses.margin_ranking_loss(pos, neg, scale, 0.5, one, global_pairs=1)
    assert alone.item() == pytest.approx((0.5 - 10.0 * (0.3 - 0.9)) / 10.0, rel=1e-5)  # 0.65


@pytest.mark.parametrize("which", ["positive", "negative"])
def test_margin_ranking_has_gradients(which):
    pos = torch.tensor([0.1, 0.2], requires_grad=True)
    neg = torch.tensor([0.3, 0.4], requires_grad=True)
    losses.margin_ranking_loss(pos, neg, torch.tensor(10.0)).backward()
    grad = (pos if which == "positive" else neg).grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_losses_on_a_gpu_equal_the_cpu_values():
    """Every tensor a loss makes is on its inputs' device (on CPU, ``device=`` cannot be told apart)."""
    torch.manual_seed(3)
    a, b = F.normalize(torch.randn(4, 3), dim=-1), F.normalize(torch.randn(4, 3), dim=-1)
    slots = F.normalize(torch.randn(4, 2, 3), dim=-1)
    keys, valid = torch.tensor([[1], [2], [1], [3]]), torch.rand(4, 2) < 0.7

    def values(device: str) -> list[float]:
        a_, b_, slots_, keys_, valid_, scale = (
            x.to(device) for x in (a, b, slots, keys, valid, torch.tensor(5.0))
        )
        return [
            losses.contrastive_loss(a_, b_, scale, keys_all=keys_).item(),
            losses.contrastive_loss(a_, b_, scale).item(),
            losses.slot_contrastive_loss(a_, slots_, scale, valid_).item(),
            losses.margin_ranking_loss(a_[:, 0], b_[:, 0], scale).item(),
            losses.swap_negatives_loss(a_, b_, slots_[:, 0], valid_[:, 0], scale, keys_all=keys_).item(),
        ]

    assert values("cuda") == pytest.approx(values("cpu"), rel=1e-5)
