"""Batched extraction: batches read one ahead in a thread, features in input order, errors kept."""

import pytest
import torch

from agree.retrieval.features import extract

CPU = torch.device("cpu")


def test_features_come_back_in_batch_order() -> None:
    batches = [torch.full((2, 3), float(i)) for i in range(5)]
    out = extract(lambda x: x * 2, iter(batches), CPU, "test")
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.cat(batches) * 2)


def test_a_failing_batch_reaches_the_caller() -> None:
    def batches():
        yield torch.ones(1, 3)
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        extract(lambda x: x, batches(), CPU, "test")
