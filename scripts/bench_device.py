"""Device benchmark: how close training and feature extraction come to the model's own ceiling.

    python scripts/bench_device.py [--models NAME ...] [--steps 10] [--workers N] [--batch-sizes 8 16 32]

One run on whatever device is present (CUDA when available, else CPU):
(a) ceiling: the AGREE training step (all six losses) and the CLIP step on one batch already in
    device memory, with the training optimizer (``AgreeModule.optimizer``: AdamW, fused on CUDA);
(b) the same steps fed by AgreeDataModule from release-format npz files at the model's
    resolution, with ``--workers`` loader workers: the ratio fed/ceiling of their times;
(c) feature extraction of the test images and captions through ``agree.evaluate``'s code path
    against a pure forward loop over tensors already on the device: the ratio path/pure of their
    times, both warmed up; creating the model and the tokenizer and moving the model to the device
    are timed apart (a fixed cost, not the extraction's throughput);
(d) peak memory of the AGREE step per batch size, each in a fresh process with the training
    optimizer (CUDA: allocated device memory; CPU: the process's peak RSS during the steps);
(e) achieved FLOP/s of (a) and (b), FLOPs counted with torch's FlopCounterMode over the real step
    (the counter open_clip's model profiler uses).
On CPU: the tiny model at 64 px in float32. On a GPU: ViT-B/32 and ViT-L/14 with random weights at
224 px under bf16 autocast.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


from hydra import compose, initialize_config_module  # noqa: E402
from lightning.fabric.utilities.apply_func import move_data_to_device  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from agree.config import allow_tf32, ensure_data, loss_weights_preset  # noqa: E402
from agree.data.datamodule import AgreeDataModule  # noqa: E402
from agree.data.layout import ReleaseLayout  # noqa: E402
from agree.data.records import read_test_images, read_test_texts  # noqa: E402
from agree.model import clip as clip_module  # noqa: E402
from agree.model import tokenizer as tokenizer_module  # noqa: E402
from agree.model.clip import create_clip, encode_image, encode_text  # noqa: E402
from agree.model.module import AgreeModule, agree_losses  # noqa: E402
from agree.model.registry import inputs_for  # noqa: E402
from agree.model.tokenizer import get_tokenizer  # noqa: E402
from agree.retrieval import extraction  # noqa: E402

WEIGHTS = {"agree": loss_weights_preset("agree"), "clip": loss_weights_preset("clip")}
# (model group, open_clip name without QuickGELU: random weights), image size, batch, batch sizes for (d)
CPU_MODELS = {"agree-tiny": ("tiny", 64, 32, (8, 16, 32))}
GPU_MODELS = {"ViT-B-32": ("vit_b32", 224, 128, (32, 64, 128)), "ViT-L-14": ("vit_l14", 224, 32, (8, 16, 32))}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def config(name: str, group: str, size: int, train_images: int, batch: int, root: Path, device: torch.device):
    """The evaluation config of the benchmark (its data section also describes the training data),
    extracting in batches of ``batch``."""
    overrides = [
        f"model={group}",
        f"model.name={name}",
        "model.pretrained=null",
        f"model.image_size={size}",
        f"data.root={root}",
        f"data.synthetic.train_images={train_images}",
        "data.synthetic.val_images=8",
        f"data.synthetic.test_images={200 if device.type == 'cpu' else 1000}",
        "data.synthetic.vg_images_per_word=2",
        f"batch_size={batch}",
        f"device={device.type}",
        f"output_dir={root}/eval",
    ]
    with initialize_config_module("agree.conf", version_base="1.3"):
        return compose("evaluate", overrides)


def trained_model(name: str, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """(open_clip model on ``device``, the optimizer ``agree.train`` gives it), random weights."""
    module = AgreeModule(name, None, WEIGHTS["agree"]).to(device)
    return module.model, module.optimizer()


def training_step(model, optimizer, weights: dict[str, float], device: torch.device):
    def step(batch: dict) -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            parts = agree_losses(model, batch, weights)
            total = sum(weights[k] * v for k, v in parts.items())
        total.backward()
        optimizer.step()

    return step


def seconds_per_call(fn, batches, device: torch.device) -> float:
    """Mean seconds per call of ``fn`` over ``batches`` (an iterator; the first call warms up)."""
    fn(next(batches))
    sync(device)
    start, calls = time.perf_counter(), 0
    for batch in batches:
        fn(batch)
        calls += 1
    sync(device)
    return (time.perf_counter() - start) / calls


def step_flops(step, batch: dict) -> int:
    with FlopCounterMode(display=False) as counter:
        step(batch)
    return counter.get_total_flops()


def bench_training(layout, cfg, device, steps: int, workers: int, batch: int) -> dict:
    model, optimizer = trained_model(cfg.model.name, device)
    out = {}
    for label, weights in WEIGHTS.items():
        tokenizer = get_tokenizer(cfg.model.name)
        dm = AgreeDataModule(layout, tokenizer, batch, num_workers=workers, needs=inputs_for(weights))
        dm.setup()
        step = training_step(model, optimizer, weights, device)
        loader = dm.train_dataloader()
        resident = move_data_to_device(next(iter(loader)), device)
        ceiling = seconds_per_call(step, itertools.repeat(resident, steps + 1), device)
        epochs = itertools.chain.from_iterable(iter(loader) for _ in itertools.count())
        fed_batches = (move_data_to_device(b, device) for b in itertools.islice(epochs, steps + 1))
        fed = seconds_per_call(step, fed_batches, device)
        flops = step_flops(step, resident)
        out[label] = {"ceiling": ceiling, "fed": fed, "flops": flops, "samples": batch}
    return out


class Timed:
    """Wraps ``module.name`` for the duration of a ``with``: the seconds its calls took; ``then``,
    applied to each result, is timed apart (``then_seconds``)."""

    def __init__(self, module, name: str, then=None):
        self.module, self.name, self.then = module, name, then
        self.seconds = self.then_seconds = 0.0

    def __enter__(self):
        self.original = getattr(self.module, self.name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = self.original(*args, **kwargs)
            middle = time.perf_counter()
            if self.then is not None:
                result = self.then(result)
            self.seconds += middle - start
            self.then_seconds += time.perf_counter() - middle
            return result

        setattr(self.module, self.name, timed)
        return self

    def __exit__(self, *exc) -> None:
        setattr(self.module, self.name, self.original)


def bench_extraction(layout, cfg, device, repeats: int = 2) -> dict:
    """Best of ``repeats`` runs of each side, alternated after one untimed run of each (the first
    forward of a shape pays one-time costs: oneDNN primitives on CPU, kernels on CUDA).

    evaluate's path is timed without creating the model and the tokenizer and without moving the
    model to the device (fixed costs, not the extraction's throughput; timed apart): the pure loop
    starts from a model on the device too.
    """
    texts, images = read_test_texts(layout.test_texts), read_test_images(layout.test_images)
    model = create_clip(cfg.model.name).to(device).eval()
    size, bs = cfg.model.image_size, cfg.batch_size
    pixels = torch.randn(len(images), 3, size, size, device=device)
    tokens = get_tokenizer(cfg.model.name)([t.text for t in texts]).to(device)

    def on_device(created: torch.nn.Module) -> torch.nn.Module:
        created = created.to(device)
        sync(device)
        return created

    def path() -> tuple[float, float, float]:
        sync(device)
        start = time.perf_counter()
        with (
            Timed(clip_module, "create_clip", then=on_device) as made,
            Timed(tokenizer_module, "get_tokenizer") as tokenizer,
        ):
            extraction.model_features(cfg, texts, images, None, layout, None, device)
        sync(device)
        setup = made.seconds + tokenizer.seconds
        return time.perf_counter() - start - setup - made.then_seconds, setup, made.then_seconds

    def pure() -> float:
        sync(device)
        start = time.perf_counter()
        with torch.no_grad(), autocast(device):
            for i in range(0, len(pixels), bs):
                encode_image(model, pixels[i : i + bs])
            for i in range(0, len(tokens), bs):
                encode_text(model, tokens[i : i + bs])
        sync(device)
        return time.perf_counter() - start

    path(), pure()
    runs = [(path(), pure()) for _ in range(repeats)]
    (best_path, setup, transfer), best_pure = min(r[0] for r in runs), min(r[1] for r in runs)
    return {
        "path": best_path,
        "setup": setup,
        "transfer": transfer,
        "pure": best_pure,
        "images": len(images),
        "texts": len(texts),
    }


def peak_memory_child(name: str, size: int, batch: int, root: str) -> None:
    """Two AGREE steps on one resident batch; prints the peak memory in GiB (or OOM)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    allow_tf32(True)
    layout = ReleaseLayout(Path(root), Path(root) / "VG", size)
    dm = AgreeDataModule(layout, get_tokenizer(name), batch_size=batch, needs=inputs_for(WEIGHTS["agree"]))
    dm.setup()
    model, optimizer = trained_model(name, device)
    step = training_step(model, optimizer, WEIGHTS["agree"], device)
    resident = move_data_to_device(next(iter(dm.train_dataloader())), device)
    reset_peak_rss()
    try:
        for _ in range(2):
            step(resident)
        sync(device)
    except torch.OutOfMemoryError:
        print("OOM")
        return
    if device.type == "cuda":
        print(f"{torch.cuda.max_memory_allocated() / 2**30:.2f}")
    else:
        print(f"{peak_rss_gib():.2f}")


def reset_peak_rss() -> None:
    """Restart the process's peak-RSS count (Linux: VmHWM), so it covers the steps only."""
    clear_refs = Path("/proc/self/clear_refs")
    if clear_refs.exists():
        clear_refs.write_text("5")


def peak_rss_gib() -> float:
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_memory(name: str, size: int, batch_sizes, root: Path) -> str:
    cells = []
    for batch in batch_sizes:
        done = subprocess.run(
            [sys.executable, __file__, "--memory-child", name, str(size), str(batch), str(root)],
            capture_output=True,
            text=True,
            check=True,
        )
        value = done.stdout.strip().splitlines()[-1]
        cells.append(f"batch {batch}: {value}{'' if value == 'OOM' else ' GiB'}")
    return ", ".join(cells)


def report(name: str, device, train: dict, extraction: dict, memory: str, seconds: float) -> None:
    """The figures of one model; the ratios are of times (1.00: no loss against the ceiling)."""
    print(f"{name} on {device_name(device)}{' (bf16 autocast)' if device.type == 'cuda' else ''}")
    for label, r in train.items():
        images = (4 if label == "agree" else 1) * r["samples"]  # an AGREE sample encodes 4 images
        tflops = {k: r["flops"] / r[k] / 1e12 for k in ("ceiling", "fed")}
        print(
            f"  {label:<5} step, batch {r['samples']}: ceiling {r['ceiling'] * 1e3:7.1f} ms "
            f"({r['samples'] / r['ceiling']:7.1f} samples/s, {images / r['ceiling']:7.1f} images/s, "
            f"{tflops['ceiling']:.3f} TFLOP/s); DataModule-fed {r['fed'] * 1e3:7.1f} ms "
            f"({r['samples'] / r['fed']:7.1f} samples/s, {tflops['fed']:.3f} TFLOP/s) "
            f"-> fed/ceiling {r['fed'] / r['ceiling']:.2f}"
        )
    e = extraction
    print(
        f"  extraction of {e['images']} images + {e['texts']} captions: evaluate's path {e['path']:.2f} s, "
        f"pure forward loop {e['pure']:.2f} s -> path/pure {e['path'] / e['pure']:.2f} "
        f"({e['images'] / e['path']:.0f} images/s with their captions); apart: creating the model and "
        f"tokenizer {e['setup']:.2f} s, moving the model to the device {e['transfer']:.2f} s"
    )
    print(f"  peak memory of the AGREE step: {memory}")
    print(f"  ({seconds:.0f} s for this model)")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", help="open_clip names (default: the device's set)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--workers", type=int, help="loader workers (default: data.num_workers)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="batch sizes of (d)")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        name, size, batch, root = args.memory_child
        peak_memory_child(name, int(size), int(batch), root)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    allow_tf32(True)
    table = GPU_MODELS if device.type == "cuda" else CPU_MODELS
    models = {name: table.get(name, ("tiny", 224, 32, (8, 16, 32))) for name in args.models or list(table)}
    # one generated dataset per image size, its training split holding the largest batch of any model
    largest: dict[int, int] = {}
    for _, size, batch, batch_sizes in models.values():
        largest[size] = max(largest.get(size, 0), batch, *(args.batch_sizes or batch_sizes))
    with tempfile.TemporaryDirectory() as tmp:
        for name, (group, size, batch, batch_sizes) in models.items():
            start = time.perf_counter()
            root = Path(tmp) / f"scenes-{size}"
            batch_sizes = args.batch_sizes or batch_sizes
            cfg = config(name, group, size, 4 * largest[size], 2 * max(batch, *batch_sizes), root, device)
            layout = ensure_data(cfg.data)
            workers = cfg.data.num_workers if args.workers is None else args.workers
            train = bench_training(layout, cfg, device, args.steps, workers, batch)
            extraction = bench_extraction(layout, cfg, device)
            memory = peak_memory(name, size, batch_sizes, root)
            report(name, device, train, extraction, memory, time.perf_counter() - start)


if __name__ == "__main__":
    main()
