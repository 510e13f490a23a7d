"""Training speed options change speed and memory, not the losses: checkpointing, compile, fused AdamW."""

import pytest
import torch

from agree.config import loss_weights_preset
from agree.data.datamodule import AgreeDataModule
from agree.data.datasets import CollateTrain, CollateVal
from agree.model.clip import create_clip, encode_image, encode_text
from agree.model.module import AgreeModule, agree_losses, compile_towers
from agree.model.registry import inputs_for
from agree.model.tokenizer import get_tokenizer

WEIGHTS = loss_weights_preset("agree")


@pytest.fixture(scope="module")
def batch(scenes):
    dm = AgreeDataModule(scenes, get_tokenizer("agree-tiny"), batch_size=4, needs=inputs_for(WEIGHTS))
    dm.setup()
    torch.manual_seed(0)
    return next(iter(dm.train_dataloader()))


def module(**options) -> AgreeModule:
    torch.manual_seed(0)
    return AgreeModule("agree-tiny", None, WEIGHTS, **options)


def losses_and_grads(m: AgreeModule, batch: dict) -> tuple[dict, dict]:
    torch.manual_seed(1)  # the margin losses' fallback masks draw random squares
    parts = m.compute_losses(batch)
    sum(WEIGHTS[k] * v for k, v in parts.items()).backward()
    grads = {name: p.grad.clone() for name, p in m.model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in parts.items()}, grads


def close(got: torch.Tensor, want: torch.Tensor, name: str, **tolerance: float) -> None:
    torch.testing.assert_close(got, want, **tolerance, msg=lambda detail: f"{name}: {detail}")


def test_grad_checkpointing_gives_the_same_losses_and_gradients(batch) -> None:
    plain = losses_and_grads(module(), batch)
    checkpointed_module = module(grad_checkpointing=True)
    assert checkpointed_module.model.transformer.grad_checkpointing
    checkpointed = losses_and_grads(checkpointed_module, batch)
    assert plain[0].keys() == checkpointed[0].keys() == {k for k, w in WEIGHTS.items() if w > 0}
    for got, want in zip(checkpointed, plain, strict=True):
        assert got.keys() == want.keys()
        for name in want:
            close(got[name], want[name], name, rtol=1e-5, atol=1e-6)


def test_fused_adamw_takes_the_same_steps(batch) -> None:
    trained = []
    for fused in (False, True):
        m = module(fused_adamw=fused, lr=1e-3)
        optimizer = m.optimizer()
        assert optimizer.defaults["fused"] is fused
        # one step: later steps' gradients differ by rounding, which Adam's normalisation amplifies
        # for parameters whose gradient is noise-sized
        losses_and_grads(m, batch)
        optimizer.step()
        trained.append(dict(m.model.named_parameters()))
    assert module().optimizer().defaults["fused"] is False  # the default on CPU
    for name, param in trained[0].items():
        close(trained[1][name], param, name, rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # compiling the tiny model takes minutes on 2 CPU cores (153 s measured)
def test_compiled_towers_give_the_same_losses(batch) -> None:
    plain = losses_and_grads(module(), batch)[0]
    compiled = losses_and_grads(module(compile=True), batch)[0]
    for name in plain:
        close(compiled[name], plain[name], name, rtol=1e-4, atol=1e-5)


def test_compiled_towers_compile_one_graph_per_grad_mode(scenes) -> None:
    """Training steps of other batch sizes and text lengths, validation batches with a remainder
    and a last length group of one text: each tower is compiled once for training and once per
    validation mode (no_grad under gloo, inference_mode under NCCL), never again for a shape."""
    from torch._dynamo.utils import counters

    tokenizer = get_tokenizer("agree-tiny")
    dm = AgreeDataModule(scenes, tokenizer, needs=inputs_for(WEIGHTS))
    dm.setup()
    torch.manual_seed(0)
    words = ["a red circle", "a blue square", "a green cross", "left", "the shape"]
    train = [{**dm.train_set[i], "entities": words[: 2 + i % 4]} for i in range(8)]
    val = [dm.val_set[i] for i in range(len(dm.val_set))]
    torch._dynamo.reset()
    counters.clear()
    try:
        model = create_clip("agree-tiny")
        compile_towers(model, backend="eager")
        graphs = []
        for items in (train[:3], train):  # 24 texts in one length group, then 72 in two (64 + 8)
            out = agree_losses(model, CollateTrain(tokenizer, inputs_for(WEIGHTS))(items), WEIGHTS)
            sum(WEIGHTS[k] * v for k, v in out.items()).backward()
        graphs.append(counters["stats"]["unique_graphs"])
        model.eval()
        for mode in (torch.no_grad, torch.inference_mode):
            with mode():
                for items in (val, val[:3], val + val[:1]):  # 65 captions: 64 + 1 join in one group
                    batch = CollateVal(tokenizer)(items)
                    encode_image(model, batch["images"])
                    encode_text(model, batch["captions"], batch["text_lengths"]["captions"])
            graphs.append(counters["stats"]["unique_graphs"])
    finally:
        torch._dynamo.reset()
    assert graphs == [2, 4, 6]
