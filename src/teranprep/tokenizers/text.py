"""Caption normalisation (one function for build-splits' captions and search's queries) and word
tokens: NFKC, collapsed whitespace, the caption rule, lower case, spaCy blank English."""

from __future__ import annotations

import unicodedata
from functools import lru_cache
from typing import Iterable


# The caption rule: what is done to a caption's text beyond NFKC and whitespace. TERAN's reference
# token-dropping rule never scores a caption's last word piece (it was meant for the final '.'), so
# "final-period" gives every caption that lacks one a final '.', and its last word counts.
# build-splits records the rule it applied (splits/manifest.json parameters.caption_rule), a run
# carries it in its lineage, an index in its manifest, and search normalises queries by the same
# rule, so a query is tokenized exactly as the captions eval ranked were.
CAPTION_RULES = ("final-period", "as-given")
DEFAULT_CAPTION_RULE = "final-period"
# Splits built before the rule was recorded applied none.
UNRECORDED_CAPTION_RULE = "as-given"


def normalize_caption(raw: str, rule: str = UNRECORDED_CAPTION_RULE) -> str:
    """NFKC, then every run of whitespace to one space, trimmed; then the caption rule
    ("final-period": a non-empty caption not ending in '.' gets one). Case is kept (see `words_of`)."""
    if rule not in CAPTION_RULES:
        raise ValueError(f"unknown caption rule {rule!r}; one of {', '.join(CAPTION_RULES)}")
    text = " ".join(unicodedata.normalize("NFKC", raw).split())
    if rule == "final-period" and text and not text.endswith("."):
        text += "."
    return text


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
