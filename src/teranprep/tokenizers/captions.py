"""Words and WordPiece ids of many normalised captions at once, through a per-chunk cache.

Both tokenizers split on whitespace before anything else and never look across that split
(spaCy's tokenizer handles each whitespace-separated substring on its own; BERT's normaliser is
per character and its pre-tokenizer splits on whitespace and punctuation). A caption's tokens are
then the concatenation of its chunks' tokens, so each distinct chunk is tokenized once, batched
through nlp.pipe and encode_batch, and captions are assembled from the cache: COCO's 600k
captions hold ~30k distinct chunks. A tokenizer for which that does not hold (byte-level BPE
marks the space before a word) fails the check in `CaptionTokenizer.check` and is run caption
by caption in batches instead.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .text import word_tokens
from .wordpiece import WordPiece

# Captions that exercise the places where the chunk rule could break: clitics, abbreviations,
# URLs, e-mail, numbers, ellipses, accents, ligatures, CJK (BERT pads it with spaces), Greek
# final sigma (lower-casing depends on the next character).
PROBES = ("A dog's ball, (red)!", "Don't stop-and-go U.S. traffic... at 3.5m/s",
          "e-mail me@x.com or http://a.b/c?d=1 :) <3", "Caf\u00e9 na\u00efve \ufb01sh \u00c9T\u00c9",
          "\u4e2d\u6587 \u5b57a b\u5b57 \u0391\u039b\u039f\u0395\u03a3 \u039f\u0394\u039f\u03a3.",
          "\"quoted\" 'single' [x] {y} #tag @who 1,000 $5 50% 9pm", "hello...world!? --- ##s [CLS]")


def _gather(idx: np.ndarray, starts: np.ndarray, lengths: np.ndarray, values: np.ndarray):
    """values[starts[i]:starts[i] + lengths[i]] for each i in idx, concatenated, and those lengths."""
    lens = lengths[idx]
    out_starts = np.cumsum(lens) - lens
    positions = np.repeat(starts[idx] - out_starts, lens) + np.arange(int(lens.sum()))
    return values[positions], lens


class CaptionTokenizer:
    """Turns normalised captions into (words, input_ids) as Arrow list arrays, plus a truncation
    count; `chunk_cache` says which path runs."""

    def __init__(self, wordpiece: WordPiece, max_tokens: int):
        self.wordpiece = wordpiece
        self.max_tokens = max_tokens
        backend = wordpiece.backend
        backend.no_truncation()
        # The special tokens around a caption, e.g. [CLS] ... [SEP]: full = prefix + bare + suffix.
        full = backend.encode("a").ids
        bare = backend.encode("a", add_special_tokens=False).ids
        start = next((i for i in range(len(full) - len(bare) + 1)
                      if full[i:i + len(bare)] == bare), None)
        self._prefix = np.array(full[:start] if start is not None else [], np.int32)
        self._suffix = np.array(full[start + len(bare):] if start is not None else [], np.int32)
        self._room = max_tokens - len(self._prefix) - len(self._suffix)
        # The cache: chunk -> its number; per number, where its words and ids start and how many.
        self._index: dict[str, int] = {}
        self._words: list[str] = []
        self._ids: list[int] = []
        self._spans = {"word_start": [], "word_len": [], "id_start": [], "id_len": []}
        self._arrays = None
        self.chunk_cache = start is not None and self._room > 0 and self._agrees(PROBES)

    def check(self, sample: Sequence[str]) -> bool:
        """Keeps the chunk cache only if it gives what whole-caption tokenization gives on `sample`."""
        self.chunk_cache = self.chunk_cache and self._agrees(sample)
        return self.chunk_cache

    def _agrees(self, texts: Sequence[str]) -> bool:
        texts = [" ".join(t.split()) for t in texts]
        chunked, whole = self._by_chunk(texts), self._by_caption(texts)
        return (chunked[0].to_pylist() == whole[0].to_pylist()
                and chunked[1].to_pylist() == whole[1].to_pylist() and chunked[2] == whole[2])

    def __call__(self, texts: Sequence[str]):
        """(words, input_ids, how many were truncated) of normalised captions; the first two are
        pyarrow ListArrays (list<string>, list<int32>), one entry per caption."""
        return self._by_chunk(texts) if self.chunk_cache else self._by_caption(texts)

    def _by_caption(self, texts):
        import pyarrow as pa
        ids, truncated = self.wordpiece.encode(texts, self.max_tokens)
        return (pa.array(word_tokens(texts), pa.list_(pa.string())),
                pa.array(ids, pa.list_(pa.int32())), truncated)

    def _learn(self, chunks: list[str]) -> None:
        backend = self.wordpiece.backend
        backend.no_truncation()
        encodings = backend.encode_batch(chunks, add_special_tokens=False)
        spans = self._spans
        for chunk, words, encoding in zip(chunks, word_tokens(chunks), encodings):
            self._index[chunk] = len(self._index)
            spans["word_start"].append(len(self._words))
            spans["word_len"].append(len(words))
            spans["id_start"].append(len(self._ids))
            spans["id_len"].append(len(encoding.ids))
            self._words += words
            self._ids += encoding.ids
        self._arrays = {name: np.array(values, np.int64) for name, values in spans.items()}
        self._arrays["words"] = np.array(self._words, dtype=object)
        self._arrays["ids"] = np.array(self._ids, np.int32)

    def _by_chunk(self, texts):
        import pyarrow as pa
        # All chunks of the batch in one C-level split; a caption has (spaces + 1) chunks.
        chunk_counts = np.fromiter((t.count(" ") + 1 for t in texts), np.int64, len(texts))
        flat = " ".join(texts).split(" ") if texts else []
        new = sorted(set(flat) - self._index.keys())
        if new:
            self._learn(new)
        if not texts:
            return (pa.array([], pa.list_(pa.string())), pa.array([], pa.list_(pa.int32())), 0)
        a = self._arrays
        idx = np.fromiter(map(self._index.__getitem__, flat), np.int64, len(flat))
        first_chunk = np.cumsum(chunk_counts) - chunk_counts

        words, word_lens = _gather(idx, a["word_start"], a["word_len"], a["words"])
        word_counts = np.add.reduceat(word_lens, first_chunk)
        word_offsets = np.concatenate([[0], np.cumsum(word_counts)]).astype(np.int32)

        body, id_lens = _gather(idx, a["id_start"], a["id_len"], a["ids"])
        body_counts = np.add.reduceat(id_lens, first_chunk)
        kept = np.minimum(body_counts, self._room)
        truncated = int((body_counts > self._room).sum())
        if truncated:  # drop each caption's body tokens past `room`
            position = np.arange(len(body)) - np.repeat(np.cumsum(body_counts) - body_counts,
                                                        body_counts)
            body = body[position < np.repeat(self._room, len(body))]
        n_pre, n_suf = len(self._prefix), len(self._suffix)
        lengths = kept + n_pre + n_suf
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        ids = np.empty(int(offsets[-1]), np.int32)
        starts = offsets[:-1]
        body_dest = (np.repeat(starts + n_pre, kept)
                     + np.arange(len(body)) - np.repeat(np.cumsum(kept) - kept, kept))
        ids[body_dest] = body
        for k, token in enumerate(self._prefix):
            ids[starts + k] = token
        for k, token in enumerate(self._suffix):
            ids[starts + n_pre + kept + k] = token
        return (pa.ListArray.from_arrays(pa.array(word_offsets), pa.array(words, pa.string())),
                pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids)),
                truncated)
