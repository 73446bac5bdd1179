"""The Perception Encoder's text tokenizer, without torch.

It reproduces the reference (`core/vision_encoder/tokenizer.py`, equivalently OpenCLIP's `PE-Core-*`
tokenizer) exactly: identical token ids.
"""

from __future__ import annotations

import gzip
import html
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

from pe_jax.errors import UsageError, WrongType

SOT, EOT = "<start_of_text>", "<end_of_text>"
SOT_ID, EOT_ID, PAD_ID = 49406, 49407, 0
_BPE_PATH = Path(__file__).parent.parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2  # the reference reads this many merges of the file

# Printable ASCII without '&': ftfy and html.unescape leave such text unchanged, so cleaning can skip them.
_FAST = re.compile(r"[\x20-\x25\x27-\x7e\t\n]*")

# The reference pre-tokenizes with the `regex` module (Unicode 17) and re.IGNORECASE; tokenizers uses oniguruma,
# whose Unicode tables stop at 15.1. These are the letters and digits added since, measured codepoint by codepoint
# against `regex` 2026.11: without them oniguruma would treat them as punctuation.
_NEW_LETTERS = (
    (0x558, 0x558), (0x58B, 0x58C), (0x88F, 0x88F), (0xC5C, 0xC5C), (0xCDC, 0xCDC), (0x208F, 0x208F),
    (0x209D, 0x209F), (0xA7CE, 0xA7CF), (0xA7D2, 0xA7D2), (0xA7D4, 0xA7D4), (0xA7DD, 0xA7DD), (0xA7E2, 0xA7E2),
    (0xA7F1, 0xA7F1), (0xAB6C, 0xAB6D), (0x107BB, 0x107BF), (0x10940, 0x10959), (0x10EC5, 0x10EC7),
    (0x10ED9, 0x10EEE), (0x11B0A, 0x11B0A), (0x11DB0, 0x11DDB), (0x11DF1, 0x11DF1), (0x16EA0, 0x16EB8),
    (0x16EBB, 0x16ED3), (0x16FF2, 0x16FF3), (0x187F8, 0x187FF), (0x18CD6, 0x18CDA), (0x18D09, 0x18D20),
    (0x18D80, 0x18DF2), (0x18E00, 0x19191), (0x191A0, 0x191D2), (0x1B123, 0x1B128), (0x1B168, 0x1B168),
    (0x1D6A6, 0x1D6A6), (0x1DF1F, 0x1DF24), (0x1DF2B, 0x1DF81), (0x1DF90, 0x1DF96), (0x1DFCD, 0x1DFFF),
    (0x1E6C0, 0x1E6DE), (0x1E6E0, 0x1E6E2), (0x1E6E4, 0x1E6E5), (0x1E6E7, 0x1E6ED), (0x1E6F0, 0x1E6F4),
    (0x1E6FE, 0x1E6FF), (0x2B73A, 0x2B73F), (0x2B81E, 0x2B81E), (0x2CEA2, 0x2CEAD), (0x323B0, 0x33479),
    (0x3D000, 0x3FC3F),
)
_NEW_DIGITS = ((0x11DE0, 0x11DE9), (0x1246F, 0x1246F), (0x12475, 0x1247F), (0x12550, 0x12686), (0x16FF4, 0x16FF6))


def _char_class(ranges: Iterable[tuple[int, int]]) -> str:
    return "".join(chr(a) if a == b else f"{chr(a)}-{chr(b)}" for a, b in ranges)


def _split_pattern() -> str:
    """The reference pre-tokenizer regex, rewritten so oniguruma matches exactly what `regex` does."""
    letter = r"\p{L}" + _char_class(_NEW_LETTERS)
    digit = r"\p{N}" + _char_class(_NEW_DIGITS)
    # IGNORECASE quirks of the reference: 'ſ' (long s) matches 's' in the literals, and U+0345 (which case-folds
    # to a letter) is matched by no branch at all, so it is dropped like whitespace.
    return (rf"<[sſ]tart_of_text>|<end_of_text>|'[sſ]|'t|'re|'ve|'m|'ll|'d|[{letter}]+|[{digit}]"
            rf"|[^\s{letter}{digit}\u0345]+")


def _byte_alphabet() -> tuple[list[int], list[str]]:
    """CLIP's reversible byte -> unicode map, in vocabulary order: the 188 printable Latin-1 bytes stand for
    themselves, the 68 others (controls, space, ...) are moved to U+0100 onwards so BPE never sees whitespace."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return printable + others, [chr(b) for b in printable] + [chr(0x100 + i) for i in range(len(others))]


@lru_cache(maxsize=1)
def _vocab() -> tuple[list[str], list[tuple[str, str]]]:
    with gzip.open(_BPE_PATH, "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:_NUM_MERGES + 1]]
    chars = _byte_alphabet()[1]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
    return tokens, merges


@lru_cache(maxsize=1)
def _base_json() -> str:
    """The bare BPE tokenizer (no truncation, padding or specials added), serialized: rebuilding it costs ~1 s."""
    tokens, merges = _vocab()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_split_pattern()), behavior="removed", invert=True),  # keep matches, drop the rest
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # Registered so a pre-token that is exactly a special string maps to its id (see TextTokenizer._encode);
    # normalized=True: matched after the lower-casing normalizer of the transformers copy.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=True) for t in (SOT, EOT)])
    tok.post_processor = processors.TemplateProcessing(single=f"{SOT} $A {EOT}",
                                                       special_tokens=[(SOT, SOT_ID), (EOT, EOT_ID)])
    return tok.to_str()


def clean_text(text: str) -> str:
    """The reference cleaning: ftfy.fix_text, html.unescape twice, whitespace collapsed and stripped, lower case.

    Args:
        text: a caption or prompt.

    Example:
        >>> clean_text("  A &amp;amp;   B ")
        'a & b'
    """
    if _FAST.fullmatch(text) is None:
        import ftfy  # lazy: only non-ASCII or '&' text needs it

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    # str.split() also splits on U+001C..U+001F, which the reference's regex `\s` does not; ftfy removes those and
    # html.unescape never produces them, so the two agree.
    return " ".join(text.split()).lower()


def _check_texts(texts: str | Iterable[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, bytes | bytearray) or not isinstance(texts, Iterable):
        raise WrongType(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise WrongType(f"texts[{i}] must be str, got {type(t).__name__}: {t!r:.80}")
    return texts


class TextTokenizer:
    """PE's CLIP BPE tokenizer: `tokenizer(texts)` -> int32 ids [N, context_length], identical to the reference.

    Rows are `[SOT, tokens..., EOT, 0, 0, ...]`; longer texts keep their first `context_length - 2` tokens and end
    with EOT. The literal strings `<start_of_text>` / `<end_of_text>` in a text become the special ids, as in the
    reference.
    """

    def __init__(self, context_length: int):
        if isinstance(context_length, bool) or not isinstance(context_length, int | np.integer):
            raise WrongType(f"context_length must be an int, got {type(context_length).__name__}")
        if context_length < 2:
            raise UsageError(f"context_length must be >= 2 (room for SOT and EOT), got {context_length}")
        self.context_length = int(context_length)
        self.sot_token_id, self.eot_token_id, self.pad_token_id = SOT_ID, EOT_ID, PAD_ID
        self._bare = Tokenizer.from_str(_base_json())
        self._tok = Tokenizer.from_str(_base_json())
        # Truncation counts the two specials of the template, so it keeps [SOT] + first ctx-2 tokens + [EOT].
        self._tok.enable_truncation(self.context_length)
        self._tok.enable_padding(length=self.context_length, pad_id=PAD_ID, pad_token="!")
        self._split = pre_tokenizers.Split(Regex(_split_pattern()), behavior="removed", invert=True)
        self._byte_of = dict(zip(*reversed(_byte_alphabet()), strict=True))
        self._id_to_token = _vocab()[0]

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def _encode(self, tok: Tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        cleaned = [clean_text(t) for t in texts]
        # A special string is a special token only where the reference's regex scan lands on it ("x <end_of_text>"
        # yes, "!<end_of_text>" no: '!<' is one punctuation run). Those rare texts go in pre-split into the regex's
        # pieces, so the added-token matching sees a special string only as a whole piece.
        special = [i for i, t in enumerate(cleaned) if "_of_text>" in t and (SOT in t or EOT in t)]
        # encode_batch_fast: Rust, parallel, and skips the character offsets we never read.
        encodings = tok.encode_batch_fast(cleaned, add_special_tokens=add_special_tokens)
        if special:
            pieces = [[p for p, _ in self._split.pre_tokenize_str(cleaned[i])] for i in special]
            for i, enc in zip(special, tok.encode_batch_fast(pieces, is_pretokenized=True,
                                                             add_special_tokens=add_special_tokens), strict=True):
                encodings[i] = enc
        return [e.ids for e in encodings]

    def __call__(self, texts: str | Iterable[str]) -> np.ndarray:
        texts = _check_texts(texts)
        ids = self._encode(self._tok, texts, add_special_tokens=True)
        return np.array(ids, dtype=np.int32).reshape(len(texts), self.context_length)

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without SOT/EOT, padding or truncation (the reference's `encode`)."""
        if not isinstance(text, str):
            raise WrongType(f"text must be str, got {type(text).__name__}")
        return self._encode(self._bare, [text], add_special_tokens=False)[0]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (the cleaned, lower-cased text for ids of `encode`).

        With `skip_special_tokens`, SOT is dropped and decoding stops at the first EOT, so a padded row of
        `__call__` decodes to its text; otherwise every id is decoded as the reference's `decode` does.
        """
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in (ids[: ids.index(EOT_ID)] if EOT_ID in ids else ids) if i != SOT_ID]
        chars = "".join(self._id_to_token[i] for i in ids)
        text = bytes(self._byte_of[c] for c in chars).decode("utf-8", errors="replace").replace("</w>", " ")
        return text.strip() if skip_special_tokens else text

    def as_transformers(self) -> Any:
        """This tokenizer as a `transformers.PreTrainedTokenizerFast` (same vocabulary, merges and pre-tokenizer),
        e.g. to `save_pretrained` it next to exported weights. Needs `transformers`.

        Exact ids need pe_jax's cleaning step first: `hf_tok([clean_text(t) for t in texts])`. Its own normalizer
        only collapses whitespace and lower-cases (exact for raw printable ASCII without '&'); it lacks ftfy and html
        unescaping, and Rust lower-cases a few letters newer than Python's Unicode tables. A literal special string
        right after punctuation is a special token here but text for the reference. Padding uses the EOT id (the
        Hugging Face CLIP convention; the reference pads with 0): the text tower pools at the first EOT under a
        causal mask, so embeddings are the same.
        """
        from transformers import PreTrainedTokenizerFast  # lazy: optional dependency

        backend = Tokenizer.from_str(_base_json())
        backend.normalizer = normalizers.Sequence([
            normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase()])
        backend.enable_truncation(self.context_length)
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SOT, eos_token=EOT, pad_token=EOT,
                                       model_max_length=self.context_length, clean_up_tokenization_spaces=False)

    def __repr__(self) -> str:
        return f"TextTokenizer(context_length={self.context_length})"


@lru_cache(maxsize=8)
def get_text_tokenizer(context_length: int) -> TextTokenizer:
    """The reference `get_text_tokenizer`: PE-Core text models use 32 (B, L) or 72 (bigG) tokens.

    Args:
        context_length: tokens per text: `model.config.text.context_length`.

    Example:
        >>> ids = get_text_tokenizer(32)(["a photo of a cat"])
        >>> ids.shape, ids.dtype, ids[0, :7].tolist()  # start, five tokens, end, then zeros
        ((1, 32), dtype('int32'), [49406, 320, 1125, 539, 320, 2368, 49407])
    """
    return TextTokenizer(context_length)


def get_hf_tokenizer(context_length: int) -> Any:
    """`get_text_tokenizer(context_length).as_transformers()` (see there for exactness and padding)."""
    return get_text_tokenizer(context_length).as_transformers()
