"""Caption normalisation and word tokens: NFKC, collapsed whitespace, lower case, spaCy blank English."""

from __future__ import annotations

import unicodedata
from functools import lru_cache
from typing import Iterable


def normalize_caption(raw: str) -> str:
    """NFKC, then every run of whitespace to one space, trimmed. Case is kept (see `words_of`)."""
    return " ".join(unicodedata.normalize("NFKC", raw).split())


def is_valid_utf8(text: str) -> bool:
    """False when `text` holds lone surrogates: undecodable input bytes or bad JSON escapes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """`text` with undecodable bytes shown as \\xNN (and bad surrogates as \\udNNN), for reports."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@lru_cache(maxsize=1)
def blank_english():
    import spacy
    return spacy.blank("en")


def word_tokens(normalized: Iterable[str], batch_size: int = 2000) -> list[list[str]]:
    """spaCy blank-English tokens of already normalised captions, lower-cased, batched with nlp.pipe."""
    nlp = blank_english()
    return [[token.text for token in doc]
            for doc in nlp.pipe((text.lower() for text in normalized), batch_size=batch_size)]


def words_of(raw: str) -> list[str]:
    """The word tokens of one raw caption (normalise, lower-case, tokenize)."""
    return word_tokens([normalize_caption(raw)])[0]
