"""The word-memoised CLIP BPE gives open_clip's token ids: Flickr30k's captions (every test and
validation caption, every fifth training one) and texts that take ftfy's and html's repairs."""

import gzip
import random
import string

import open_clip
import torch

from agree.model.tokenizer import WordMemoTokenizer, get_tokenizer

from .conftest import SHARED_DATA, shared_data

CAPTIONS = SHARED_DATA / "flickr30k_captions_multi30k"


def flickr30k_captions() -> list[str]:
    files = sorted(shared_data(CAPTIONS).glob("*.en.gz"))
    assert files, f"{CAPTIONS} holds no *.en.gz captions"
    captions = []
    for f in files:
        lines = gzip.open(f, "rt", encoding="utf-8").read().splitlines()
        captions += lines[:: 5 if f.name.startswith("train") else 1]
    return captions


def test_flickr30k_captions_have_open_clips_ids():
    captions = flickr30k_captions()
    assert len(captions) > 35_000
    ours, theirs = get_tokenizer("ViT-B-32"), open_clip.get_tokenizer("ViT-B-32")
    assert isinstance(ours, WordMemoTokenizer)
    for start in range(0, len(captions), 5000):
        batch = captions[start : start + 5000]
        assert torch.equal(ours(batch), theirs(batch)), f"captions {start}..{start + len(batch)}"


def test_texts_that_ftfy_or_html_change():
    texts = [
        "Tom &amp; Jerry &amp;amp; friends",  # unescaped twice
        "a caf\u00c3\u00a9 with a \u201ccurly\u201d sign",  # mojibake and curly quotes: ftfy repairs
        "two\tdogs\r\nrun\x0b",  # control characters and line breaks
        "\uff21\uff22 wide letters, \ufb01ne ligature",
        "   ",
        "",
        "\u00e9t\u00e9 \u4e2d\u6587 emoji \U0001f600",
    ]
    rng = random.Random(0)
    texts += ["".join(rng.choice(string.printable) for _ in range(rng.randrange(60))) for _ in range(2000)]
    ours, theirs = get_tokenizer("ViT-B-32"), open_clip.get_tokenizer("ViT-B-32")
    assert torch.equal(ours(texts), theirs(texts))
    assert ours.encode(texts[0]) == theirs.encode(texts[0])


def test_cut_at_the_context_length_with_and_without_the_end_token():
    long = " ".join(["a man in a red shirt"] * 20)
    theirs = open_clip.get_tokenizer("agree-tiny")
    plain = get_tokenizer("agree-tiny")
    assert torch.equal(plain([long, "a dog"]), theirs([long, "a dog"]))
    cut = get_tokenizer("agree-tiny", eot_on_truncation=False)([long])[0]
    whole = [theirs.sot_token_id, *theirs.encode(long), theirs.eot_token_id]
    assert cut.tolist() == whole[: theirs.context_length] and cut[-1] != theirs.eot_token_id
