"""One AGREE training step against one CLIP-only step, text encoding at real length, tokenising.

    python scripts/bench_training_step.py [--models agree-tiny ViT-B-32] [--repeats 3]

Reports, per model: the step-time ratio (AGREE / CLIP), the ratio of encoder work (images and
texts encoded, each weighted by its measured forward+backward cost), and the speed-up of
encoding Flickr-length captions at their real length over open_clip's full 77 positions. Then
the time to tokenise Flickr30k's 5,000 test captions (``../shared/data``, when present) with
open_clip's tokenizer and with the word-memoised one the loaders use (a fresh one each time).
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import tempfile
import time
from pathlib import Path

import open_clip
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from agree.config import loss_weights_preset  # noqa: E402
from agree.data.datamodule import AgreeDataModule  # noqa: E402
from agree.data.synthetic import SceneConfig, generate  # noqa: E402
from agree.model.clip import create_clip, encode_image, encode_text  # noqa: E402
from agree.model.module import agree_losses  # noqa: E402
from agree.model.registry import inputs_for  # noqa: E402
from agree.model.tokenizer import get_tokenizer  # noqa: E402

AGREE = loss_weights_preset("agree")
CLIP = loss_weights_preset("clip")
CAPTIONS = Path(__file__).resolve().parents[2] / "shared/data/flickr30k_captions_multi30k"


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step(model, optimizer, batch, weights):
    def step():
        optimizer.zero_grad()
        out = agree_losses(model, batch, weights)
        sum(weights[k] * v for k, v in out.items()).backward()
        optimizer.step()

    return step


def encoder_cost(model, encode, inputs):
    def step():
        model.zero_grad()
        encode(model, inputs).sum().backward()

    return step


def flickr_like_captions(n: int) -> list[str]:
    import gzip

    path = Path(__file__).resolve().parents[2] / "shared/data/flickr30k_captions_multi30k/test_2016.1.en.gz"
    if path.is_file():
        return gzip.open(path, "rt").read().splitlines()[:n]
    return ["A man in an orange hat starring at something in the street ."] * n


def bench_model(name: str, image_size: int, batch_size: int, repeats: int, root: Path) -> dict:
    layout = generate(
        root / f"scenes{image_size}",
        SceneConfig(
            image_size=image_size,
            train_images=batch_size * 2,
            val_images=4,
            test_images=4,
            vg_images_per_word=2,
        ),
    )
    tokenizer = get_tokenizer(name)
    torch.manual_seed(0)
    model = create_clip(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batches = {}
    for label, weights in (("agree", AGREE), ("clip", CLIP)):
        dm = AgreeDataModule(layout, tokenizer, batch_size=batch_size, needs=inputs_for(weights))
        dm.setup()
        torch.manual_seed(0)
        batches[label] = next(iter(dm.train_dataloader()))
    step = {
        label: timed(train_step(model, optimizer, batches[label], w), repeats)
        for label, w in (("agree", AGREE), ("clip", CLIP))
    }
    # encoder work: forward+backward cost of one image and one caption-length text
    b = batches["agree"]
    per_image = timed(encoder_cost(model, encode_image, b["images"]), repeats) / batch_size
    per_text = timed(encoder_cost(model, encode_text, b["captions"]), repeats) / batch_size
    n_images = {"agree": 4 * batch_size, "clip": batch_size}
    n_texts = {"agree": 2 * batch_size + 2 * len(b["prompts"]), "clip": batch_size}
    work = {k: n_images[k] * per_image + n_texts[k] * per_text for k in n_images}
    # text at its real length vs open_clip's 77 positions (inference, Flickr captions)
    tokens = tokenizer(flickr_like_captions(256))
    with torch.no_grad():
        full = timed(lambda: model.encode_text(tokens, normalize=True), repeats)
        short = timed(lambda: encode_text(model, tokens), repeats)
    return {
        "model": name,
        "batch": batch_size,
        "clip_step_s": step["clip"],
        "agree_step_s": step["agree"],
        "step_ratio": step["agree"] / step["clip"],
        "work_ratio": work["agree"] / work["clip"],
        "encoded": " vs ".join(f"{n_images[k]} img + {n_texts[k]} txt" for k in ("agree", "clip")),
        "text_speedup": full / short,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["agree-tiny", "ViT-B-32"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    settings = {"agree-tiny": (64, 32), "ViT-B-32": (224, 8)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            size, batch = settings.get(name, (224, 8))
            r = bench_model(name, size, batch, args.repeats, Path(tmp))
            print(
                f"{r['model']:<11} batch {r['batch']:>3}: CLIP step {r['clip_step_s']:.3f} s, "
                f"AGREE step {r['agree_step_s']:.3f} s -> step ratio {r['step_ratio']:.2f} "
                f"vs work ratio {r['work_ratio']:.2f} ({r['step_ratio'] / r['work_ratio']:.2f}x; "
                f"{r['encoded']}); "
                f"text at real length {r['text_speedup']:.1f}x faster"
            )

    tokenising()


def tokenising(repeats: int = 3) -> None:
    """Tokenising Flickr30k's test captions: open_clip's tokenizer against the word-memoised one,
    each from a fresh tokenizer (made outside the timing) and with the caches of an earlier pass."""
    files = sorted(CAPTIONS.glob("test_2016.*.en.gz"))
    if not files:
        print(f"tokenising: skipped ({CAPTIONS} not found)")
        return
    captions = [line for f in files for line in gzip.open(f, "rt", encoding="utf-8").read().splitlines()]
    batches = [captions[i : i + 128] for i in range(0, len(captions), 128)]

    def seconds(tokenizer) -> float:
        start = time.perf_counter()
        for batch in batches:
            tokenizer(batch)
        return time.perf_counter() - start

    makers = {
        "open_clip": lambda: open_clip.get_tokenizer("ViT-B-32"),
        "memo": lambda: get_tokenizer("ViT-B-32"),
    }
    fresh = {name: min(seconds(make()) for _ in range(repeats)) for name, make in makers.items()}
    kept = {name: make() for name, make in makers.items()}
    warm = {name: min(seconds(kept[name]) for _ in range(repeats + 1)) for name in makers}
    print(f"tokenising {len(captions):,} Flickr30k test captions in batches of 128:")
    for what, t in (("a fresh tokenizer", fresh), ("warm caches", warm)):
        print(
            f"    {what:<17}: open_clip {t['open_clip']:.3f} s, word-memoised {t['memo']:.3f} s "
            f"({t['open_clip'] / t['memo']:.1f}x faster)"
        )


if __name__ == "__main__":
    main()
