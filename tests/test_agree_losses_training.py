"""The AGREE objective wired through the dataset and model: subsets, gradients, fallbacks, DDP."""

import os
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from agree.config import loss_weights_preset
from agree.data.datamodule import AgreeDataModule
from agree.data.datasets import CollateTrain, EntitySources, TrainCaptions
from agree.data.layout import ReleaseLayout
from agree.data.npz_images import NpzImages
from agree.data.records import TrainRecord
from agree.errors import DataFormatError
from agree.model.clip import create_clip
from agree.model.module import agree_losses
from agree.model.registry import inputs_for
from agree.model.tokenizer import get_tokenizer

WEIGHTS = {**loss_weights_preset("agree"), "swap_negatives": 0.5}  # every loss on
ENTITY_LOSSES = [name for name in WEIGHTS if name != "clip"]
MARGIN_LOSSES = ["text_mask", "vg_mask", "ground_mask"]


def weights_of(names):
    return {name: (WEIGHTS[name] if name in names else 0.0) for name in WEIGHTS}


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer("agree-tiny")


@pytest.fixture(scope="module")
def full_data(scenes, tokenizer):
    dm = AgreeDataModule(scenes, tokenizer, batch_size=8, needs=inputs_for(WEIGHTS))
    dm.setup()
    torch.manual_seed(0)
    items = [dm.train_set[i] for i in range(8)]
    return dm, items


def collate(tokenizer, items, names):
    return CollateTrain(tokenizer, inputs_for(weights_of(names)))(items)


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return create_clip("agree-tiny")


SUBSETS = (
    [("clip",)]
    + [("clip", n) for n in ENTITY_LOSSES]  # each loss added alone
    + [tuple(n for n in WEIGHTS if n != left) for left in WEIGHTS]  # each loss left out
    + [(n,) for n in ENTITY_LOSSES]  # each loss alone, without CLIP
)


@pytest.mark.parametrize("names", SUBSETS, ids=lambda n: "+".join(n))
def test_any_subset_runs_and_only_it(full_data, tokenizer, names):
    _, items = full_data
    batch = collate(tokenizer, items, names)
    out = agree_losses(fresh_model(), batch, weights_of(names))
    assert set(out) == set(names)
    total = sum(WEIGHTS[k] * v for k, v in out.items())
    assert torch.isfinite(total)
    total.backward()


def test_disabled_losses_load_and_batch_nothing(full_data, tokenizer):
    _, items = full_data
    batch = collate(
        tokenizer, [{k: it[k] for k in ("image", "caption", "image_key")} for it in items], ["clip"]
    )
    assert set(batch) == {"images", "captions", "image_keys", "caption_keys", "text_lengths"}


def test_weight_zero_skips_entity_files(scenes, tokenizer, tmp_path):
    """With the VG losses off, a missing VG folder does not matter; with them on, it is named."""
    layout = ReleaseLayout(scenes.root, tmp_path / "no-vg", scenes.image_size)
    dm = AgreeDataModule(
        layout, tokenizer, needs=inputs_for(weights_of(["clip", "prompt", "text_mask", "ground_mask"]))
    )
    dm.setup()
    dm = AgreeDataModule(layout, tokenizer, needs=inputs_for(weights_of(["clip", "vg_mask"])))
    with pytest.raises(DataFormatError, match="no-vg.*file not found"):
        dm.setup()


@pytest.mark.parametrize("margin_loss", MARGIN_LOSSES)
def test_each_margin_loss_trains_the_weights(full_data, tokenizer, margin_loss):
    """CLIP + one margin loss ends with other weights than CLIP alone (the reference's do not)."""
    _, items = full_data
    trained = {}
    for names in (["clip"], ["clip", margin_loss]):
        model = fresh_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        batch = collate(tokenizer, items, names)
        weights = {**weights_of(names), margin_loss: 1.0} if margin_loss in names else weights_of(names)
        for _ in range(2):
            optimizer.zero_grad()
            out = agree_losses(model, batch, weights)
            sum(weights[k] * v for k, v in out.items()).backward()
            optimizer.step()
        trained[len(names)] = torch.cat([p.detach().flatten() for p in model.visual.parameters()])
    assert not torch.allclose(trained[1], trained[2])
    # and the margin loss alone has a gradient
    model = fresh_model()
    out = agree_losses(model, collate(tokenizer, items, [margin_loss]), {margin_loss: 1.0})
    out[margin_loss].backward()
    assert out[margin_loss] > 0
    assert sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("margin_loss", MARGIN_LOSSES)
def test_margin_reduction_mean_is_the_sum_over_the_pairs(full_data, tokenizer, margin_loss):
    """``margin_reduction=mean`` divides each margin loss by its pairs: entity slots or rows."""
    _, items = full_data
    batch = collate(tokenizer, items, [margin_loss])
    pairs = int(batch["entity_valid"].sum()) if margin_loss == "text_mask" else len(items)
    model = fresh_model()
    summed = agree_losses(model, batch, {margin_loss: 1.0}, margin=2.0)[margin_loss]  # every pair active
    mean = agree_losses(model, batch, {margin_loss: 1.0}, margin=2.0, margin_reduction="mean")[margin_loss]
    assert summed > 0 and mean.item() == pytest.approx(summed.item() / pairs, rel=1e-5)


def test_fallbacks_and_padding(scenes, tokenizer):
    """No entities, no VG object, no grounded label: fallbacks of SPEC §1, and padding masked out."""
    images = NpzImages(scenes.images_npz("train"), 64)
    records = [
        TrainRecord("0", "999", "a red circle", (), (("object", 0.5),)),  # nothing at all
        TrainRecord("1", "998", "a blue square left of a red circle", ("a blue square",) + ("x",) * 9, ()),
    ]
    sources = EntitySources(
        grounding=NpzImages(scenes.grounding_npz, 64),
        image_objects={},
        vg_ids={"circle": []},
        vg_images=NpzImages(scenes.vg_images_npz, 64),
        vg_masked=NpzImages(scenes.vg_mask_images_npz, 64),
    )
    dataset = TrainCaptions(records, images, inputs_for(WEIGHTS), sources, max_entities=5)
    items = [dataset[0], dataset[1]]
    for item in items:
        assert torch.equal(item["vg_image"], item["image"]) and item["vg_text"] == item["caption"]
        for masked in (item["vg_masked"], item["ground_masked"]):
            changed = (masked != item["image"]).any(0)
            assert changed.sum() == dataset.square**2  # one black square, 32 px at 224
    assert items[0]["entities"] == [] and len(items[1]["entities"]) == 5
    batch = CollateTrain(tokenizer, inputs_for(WEIGHTS), 5)(items)
    assert batch["entity_valid"].tolist() == [[False] * 5, [True] * 5]
    assert len(batch["prompts"]) == 5 and batch["masked_captions"].shape[1] == batch["captions"].shape[1]
    out = agree_losses(fresh_model(), batch, WEIGHTS)
    assert all(torch.isfinite(v) for v in out.values())
    # a batch where no caption has an entity at all
    empty = CollateTrain(tokenizer, inputs_for(WEIGHTS), 5)([items[0], items[0]])
    out = agree_losses(fresh_model(), empty, WEIGHTS)
    assert out["prompt"] == 0 and out["text_mask"] == 0


class HostReads(TorchDispatchMode):
    """Counts the ops that make the host wait for a CUDA device: a value read on the host
    (``item``, ``bool``, ``int``: ``_local_scalar_dense``), an output whose shape depends on values
    (``nonzero``, ``masked_select``, indexing by a boolean mask) and ``masked_scatter``'s backward
    (a ``masked_select`` inside)."""

    OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        by_mask = name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1])
        self.count += name in self.OPS or name == "masked_scatter_backward" or by_mask
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_nothing_back_from_the_device(full_data, tokenizer):
    """Text lengths come from the collate (host), padding is masked rather than indexed out: neither
    the forward nor the backward of an AGREE step reads a value back, whatever the number of entity
    slots and of text length groups (``encode_text`` groups 64 texts)."""
    _, items = full_data
    words = ["a red circle", "a blue square", "a green cross", "left", "the shape"]
    seen = set()
    for n, slots in ((2, 1), (8, 3), (8, 5)):
        batch = CollateTrain(tokenizer, inputs_for(WEIGHTS), slots)(
            [{**it, "entities": words[:slots]} for it in (items * 2)[:n]]
        )
        texts = sum(len(batch[k]) for k in ("captions", "prompts", "masked_captions", "vg_prompts"))
        seen.add((slots, -(-texts // 64)))
        for weights in (WEIGHTS, {"clip": 1.0}):
            model = fresh_model()
            with HostReads() as forward:
                out = agree_losses(model, batch, weights)
            with HostReads() as backward:
                sum(weights[k] * v for k, v in out.items()).backward()
            assert (forward.count, backward.count) == (0, 0), (n, slots, list(weights))
    assert len(seen) == 3 and {groups for _, groups in seen} == {1, 2}  # 1 to 5 slots, 1 or 2 groups


def test_missing_grounding_key_is_named(scenes):
    images = NpzImages(scenes.images_npz("train"), 64)
    records = [TrainRecord("0", "999", "a red circle", (), (("a red circle", 0.9),))]
    sources = EntitySources(grounding=NpzImages(scenes.grounding_npz, 64))
    with pytest.raises(DataFormatError, match="grounded entity '999_a red circle'"):
        TrainCaptions(records, images, frozenset({"ground_masked"}), sources)


# --------------------------------------------------------------------------------------------
# two processes (gloo) give the loss and gradients of one process on the same global batch


def _rank_worker(rank: int, world: int, folder: str) -> None:
    import torch.distributed as dist

    # a collective entered by one rank only fails within the timeout instead of hanging the test
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/rendezvous",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    state = torch.load(f"{folder}/inputs.pt", weights_only=False)
    results = []
    for weights in state["cases"]:
        model = fresh_model()
        model.load_state_dict(state["model"])
        out = agree_losses(model, state["batches"][rank], weights)
        total = sum(weights[k] * v for k, v in out.items())
        total.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        dist.all_reduce(grads)  # what DDP does to gradients (then divides by the world size)
        results.append({"losses": {k: v.item() for k, v in out.items()}, "grads": grads / world})
    torch.save(results, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def assert_two_processes_equal_one(tokenizer, items, cases, folder) -> None:
    """Each rank computes each case's losses on its half of ``items``; their mean and the averaged
    gradients equal one process's on all of them."""
    model = fresh_model(3)
    full = CollateTrain(tokenizer, inputs_for(WEIGHTS), 5)(items)
    halves = [CollateTrain(tokenizer, inputs_for(WEIGHTS), 5)(items[r * 4 : r * 4 + 4]) for r in (0, 1)]
    torch.save({"model": model.state_dict(), "batches": halves, "cases": cases}, folder / "inputs.pt")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_rank_worker, args=(2, str(folder)), nprocs=2, join=True)
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for i, weights in enumerate(cases):
        model.zero_grad()
        single = agree_losses(model, full, weights)
        sum(weights[k] * v for k, v in single.items()).backward()
        for name, value in single.items():
            mean = sum(r[i]["losses"][name] for r in ranks) / 2
            assert mean == pytest.approx(value.item(), rel=1e-4, abs=1e-6), name
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        assert torch.allclose(ranks[0][i]["grads"], grads, rtol=1e-3, atol=1e-6), list(weights)


def test_two_processes_equal_one(full_data, tokenizer, tmp_path):
    _, items = full_data
    assert_two_processes_equal_one(tokenizer, items, [WEIGHTS], tmp_path)


def test_a_rank_without_entities_enters_every_collective(full_data, tokenizer, tmp_path):
    """Rank 1's captions have no entity and its samples no VG object (the fallback: own image and
    caption): each loss that gathers features, alone and with the others, still runs the same
    collectives on both ranks (forward and backward) and gives the single-process values."""
    _, items = full_data
    bare = [{**it, "entities": [], "vg_image": it["image"], "vg_text": it["caption"]} for it in items[4:]]
    cases = [{"clip": 1.0}, {"prompt": 1.0}, {"vg_contrast": 1.0}, WEIGHTS]
    assert_two_processes_equal_one(tokenizer, items[:4] + bare, cases, tmp_path)
