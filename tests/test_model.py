"""Model loading: local weights, agree checkpoints, tags, and real-length text encoding."""

import open_clip
import pytest
import torch

from agree.data.datasets import token_lengths
from agree.model import clip
from agree.model.clip import ModelLoadError
from agree.model.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return clip.create_clip("agree-tiny").eval()


def features(model):
    torch.manual_seed(1)
    images = torch.randn(3, 3, 64, 64)
    tokens = get_tokenizer("agree-tiny")(["a red circle", "a blue square left of a red circle", "x"])
    with torch.no_grad():
        return clip.encode_image(model, images), clip.encode_text(model, tokens)


def test_local_weights_file_gives_identical_features(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), path)
    loaded = clip.create_clip("agree-tiny", str(path)).eval()
    for a, b in zip(features(tiny), features(loaded), strict=True):
        assert torch.equal(a, b)


def test_training_checkpoint_loads_and_checks_the_name(tiny, tmp_path):
    path = tmp_path / "last.ckpt"
    state = {f"model.{k}": v for k, v in tiny.state_dict().items()}
    torch.save({"state_dict": state, clip.CHECKPOINT_KEY: "agree-tiny"}, path)
    loaded = clip.create_clip("agree-tiny", str(path)).eval()
    for a, b in zip(features(tiny), features(loaded), strict=True):
        assert torch.equal(a, b)
    torch.save({"state_dict": state, clip.CHECKPOINT_KEY: "ViT-B-32"}, path)
    with pytest.raises(ModelLoadError, match="model.name=ViT-B-32"):
        clip.create_clip("agree-tiny", str(path))


def test_pretrained_tag_goes_through_open_clip(tiny, tmp_path, monkeypatch):
    """A tag resolves through open_clip's registry and download (stubbed to a file written here)."""
    path = tmp_path / "weights.pt"
    torch.save(tiny.state_dict(), path)
    calls = []
    monkeypatch.setattr(
        open_clip.factory, "get_pretrained_cfg", lambda name, tag: {"url": "x"} if tag == "mytag" else {}
    )
    monkeypatch.setattr(
        open_clip.factory, "download_pretrained", lambda cfg, cache_dir=None: calls.append(cfg) or str(path)
    )
    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model", lambda name: ["mytag"])
    loaded = clip.create_clip("agree-tiny", "mytag").eval()
    assert calls and torch.equal(features(loaded)[0], features(tiny)[0])


def test_openai_weights_need_quickgelu():
    with pytest.raises(ModelLoadError, match="ViT-L-14-quickgelu"):
        clip.create_clip("ViT-L-14", "openai")


@pytest.mark.parametrize(
    "name, pretrained, message",
    [
        ("no-such-model", None, "not an open_clip architecture"),
        ("agree-tiny", "/no/such/file.pt", "neither a file nor a pretrained tag"),
        ("agree-tiny", "/no/such/run/last.ckpt", "not found"),
    ],
)
def test_bad_model_settings(name, pretrained, message):
    with pytest.raises(ModelLoadError, match=message):
        clip.create_clip(name, pretrained)


def test_short_text_encoding_matches_full_length(tiny):
    tokens = get_tokenizer("agree-tiny")(
        ["a red circle left of a blue square", "a", "on the left is a cross"]
    )
    with torch.no_grad():
        short = clip.encode_text(tiny, tokens)
        full = tiny.encode_text(tokens, normalize=True)
    assert torch.allclose(short, full, atol=1e-5)


def test_length_groups_planned_on_the_host_match_full_length(tiny):
    """65 texts of many lengths: two length groups, the last one of one text joined to the first;
    the collate's host lengths and the lengths read from the tokens give open_clip's features."""
    words = "a red circle left of a blue square above the green cross".split()
    texts = [" ".join(words[: 1 + i % len(words)]) for i in range(65)]
    tokens = get_tokenizer("agree-tiny")(texts)
    with torch.no_grad():
        full = tiny.encode_text(tokens, normalize=True)
        for lengths in (None, token_lengths(tokens)):
            assert torch.allclose(clip.encode_text(tiny, tokens, lengths), full, atol=1e-5)
    assert token_lengths(tokens) == tuple(int(n) for n in tokens.argmax(-1) + 1)  # after the end token
