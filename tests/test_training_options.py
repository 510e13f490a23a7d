"""Training speed options change speed and memory, not the losses: checkpointing, compile, fused AdamW."""

import pytest
import torch

from agree.config import loss_weights_preset
from agree.data.datamodule import AgreeDataModule
from agree.model.module import AgreeModule
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
