"""open_clip's CLIP BPE tokenizer with each word's token ids kept: the same ids, 3-6x faster.

Tokenisation runs on the host for every caption, entity prompt and masked caption (11 texts per
AGREE training sample), so its cost is what feeds a GPU. open_clip's ``SimpleTokenizer`` keeps each
word's BPE merges but redoes, at every occurrence, the byte mapping and the vocabulary lookups,
and runs ftfy's text repair on every text. Here a word's ids are computed once, and a text of
printable ASCII without ``&`` skips ftfy and ``html.unescape``, which leave such a text unchanged
(``tests/test_tokenizer.py`` checks every Flickr30k caption against open_clip).
"""

from __future__ import annotations

import numpy as np
import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer, _clean_lower, whitespace_clean

from agree.model.clip import ModelLoadError


class WordMemoTokenizer:
    """Token ids [N, context_length] of open_clip's ``SimpleTokenizer`` (without a reduction).

    ``eot_on_truncation``: open_clip ends a text cut at the context length with the end-of-text
    token; False cuts it plainly, as the release's tokenizer (start token, BPE tokens, end token,
    then the cut).
    """

    def __init__(self, tokenizer: SimpleTokenizer, eot_on_truncation: bool = True):
        self.bpe = tokenizer
        self.eot_on_truncation = eot_on_truncation
        self.context_length = tokenizer.context_length
        self.sot_token_id, self.eot_token_id = tokenizer.sot_token_id, tokenizer.eot_token_id
        self._word_ids: dict[str, list[int]] = {}

    @staticmethod
    def applies_to(tokenizer) -> bool:
        """Whether ``tokenizer`` is the plain CLIP BPE this class reproduces."""
        return isinstance(tokenizer, SimpleTokenizer) and tokenizer.reduction_fn is None

    def _clean(self, text: str) -> str:
        """open_clip's cleaning ("lower": ftfy, unescaped, spaces collapsed, lower case)."""
        fast = self.bpe.clean_fn is _clean_lower and text.isascii() and text.isprintable() and "&" not in text
        return whitespace_clean(text.strip()).lower() if fast else self.bpe.clean_fn(text)

    def encode(self, text: str) -> list[int]:
        """The BPE token ids of ``text`` (no start or end token), as ``SimpleTokenizer.encode``."""
        t, ids = self.bpe, []
        for word in t.pat.findall(self._clean(text)):
            word_ids = self._word_ids.get(word)
            if word_ids is None:
                mapped = "".join(t.byte_encoder[b] for b in word.encode("utf-8"))
                word_ids = self._word_ids[word] = [t.encoder[piece] for piece in t.bpe(mapped).split(" ")]
            ids += word_ids
        return ids

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        context_length = context_length or self.context_length
        # filled through numpy: torch.tensor per row (open_clip's way) cost more than the encoding
        result = np.zeros((len(texts), context_length), dtype=np.int64)
        for i, text in enumerate(texts):
            tokens = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(tokens) > context_length:
                tokens = tokens[:context_length]
                if self.eot_on_truncation:
                    tokens[-1] = self.eot_token_id
            result[i, : len(tokens)] = tokens
        return torch.from_numpy(result)


def get_tokenizer(name: str, eot_on_truncation: bool = True):
    """The tokenizer of open_clip model ``name`` (returns [N, context_length] token ids): the CLIP
    BPE through :class:`WordMemoTokenizer`, any other as open_clip makes it."""
    tokenizer = open_clip.get_tokenizer(name)
    if WordMemoTokenizer.applies_to(tokenizer):
        return WordMemoTokenizer(tokenizer, eot_on_truncation)
    if not eot_on_truncation:
        raise ModelLoadError(
            f"text.eot_on_truncation=false needs a CLIP BPE tokenizer, not {type(tokenizer).__name__}"
        )
    return tokenizer
