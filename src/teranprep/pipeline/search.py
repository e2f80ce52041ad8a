"""Searching an index/: text -> image (FAISS shortlist then TERAN re-ranking, or exhaustive),
image -> text over an indexed caption set, and word -> region alignment. The Python API.

    from teranprep.pipeline.search import Searcher
    with Searcher("index/") as s:
        for hit in s.search("a dog on a red couch", k=10).hits: print(hit.rank, hit.key, hit.score)

Re-ranking and the exhaustive scan both score with teran/scoring.score_matrix, the function
prep eval scores with, on region embeddings read from the shards; only the FAISS index and the
key table are held in memory.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import PrepError
from ..manifests.atomic import sha256_file
from ..manifests.index import CAPTIONS_NAME, HEAD_NAME, SHORTLIST_NAME, IndexStore, read_captions
from ..manifests.splits import run_caption_rule

MAX_QUERY_CHARS = 500
MAX_QUERY_TOKENS = 64
DEFAULT_SHORTLIST = 200
MAX_K = 1000
# The default N grows with the collection above SHORTLIST_GROWS_FROM images: the share of
# exhaustive TERAN's top-10 a fixed N keeps falls as the gallery grows (planted-signal data,
# benchmarks/README.md 2026-12-07: N = 200 kept 99.8% of 1k, 97.6% of 10k, 91.9% of 100k; N = 500
# kept 97.0% of 100k). N = 200 x (n / 10k)^0.4, at most MAX_DEFAULT_SHORTLIST (500 from ~100k:
# the largest N measured; the re-rank's cost grows with N).
SHORTLIST_GROWS_FROM = 10_000
SHORTLIST_GROWTH = 0.4
MAX_DEFAULT_SHORTLIST = 500


def default_shortlist(n_images: int) -> int:
    """The shortlist N a query re-ranks when none is given, for an index of n_images."""
    if n_images <= SHORTLIST_GROWS_FROM:
        return DEFAULT_SHORTLIST
    grown = DEFAULT_SHORTLIST * (n_images / SHORTLIST_GROWS_FROM) ** SHORTLIST_GROWTH
    return int(min(MAX_DEFAULT_SHORTLIST, round(grown)))


@dataclass
class Hit:
    rank: int
    key: str
    score: float


@dataclass
class SearchResult:
    query: str
    mode: str               # "two-stage" or "exhaustive"
    shortlist: int | None   # N actually used
    hits: list[Hit]
    timings_ms: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"query": self.query, "mode": self.mode, "shortlist": self.shortlist,
                "results": [asdict(h) for h in self.hits], "timings_ms": self.timings_ms}


def pad_regions(sets: list[np.ndarray], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Region sets (n_i, E) -> the padded (B, 1 + max n, E) tensor with the unscored slot 0 that
    the scoring code expects, and the lengths (n_i + 1)."""
    lengths = torch.tensor([len(s) + 1 for s in sets], dtype=torch.long)
    width = max(int(lengths.max()) if len(sets) else 1, 2)
    out = torch.zeros(len(sets), width, dim)
    for b, s in enumerate(sets):
        if len(s):
            out[b, 1:len(s) + 1] = torch.from_numpy(np.asarray(s, dtype=np.float32))
    return out, lengths


class Searcher:
    """An opened index: model (text side used), shortlist head, FAISS index, key table."""

    def __init__(self, index_dir: Path, *, tokenizer: str | None = None, device: str = "cpu"):
        import faiss
        from ..safe_torch import load_torch_file
        from ..teran.shortlist import ShortlistHead
        from ..teran.checkpoint import load_model
        self.store = IndexStore(index_dir)
        m = self.store.manifest
        self.root = self.store.root
        from ..manifests.remote import local_file
        ckpt = local_file(m["lineage"]["checkpoint"], "checkpoint")  # a URL: fetched into the cache
        if not ckpt.is_file():
            raise PrepError(f"{ckpt}: the checkpoint this index was built with is gone; rebuild the "
                            f"index or put the checkpoint back")
        if sha256_file(ckpt) != m["lineage"]["checkpoint_sha256"]:
            raise PrepError(f"{ckpt}: changed since {self.root} was built (sha256 differs); "
                            "rebuild the index with `prep index ... --overwrite`")
        self.model, self.ckpt = load_model(ckpt, device)
        self.device = device
        self.head = ShortlistHead.from_payload(load_torch_file(self.root / HEAD_NAME))
        self.faiss = faiss.read_index(str(self.root / SHORTLIST_NAME))
        if self.faiss.ntotal != len(self.store):
            raise PrepError(f"{self.root / SHORTLIST_NAME}: {self.faiss.ntotal} vectors for "
                            f"{len(self.store)} ok images; run `prep verify {self.root}`")
        self.alignment = m["alignment"]
        self.embed_dim = int(m["embed_dim"])
        self.warning = m.get("warning")
        # Queries are normalised as the run's training captions were (index manifests from
        # before the record: the rule of the run the index names).
        self.caption_rule = m.get("caption_rule") or run_caption_rule(m["lineage"].get("trained_on"))
        self._tokenizer_name = tokenizer or m.get("tokenizer")
        self._tokenizer = None
        self._captions = None

    # ------------------------------------------------------------ text side
    def tokenize(self, text: str) -> list[int]:
        from ..tokenizers import load_wordpiece, normalize_caption
        if not isinstance(text, str) or not text.strip():
            raise PrepError("empty query: type a few words")
        if len(text) > MAX_QUERY_CHARS:
            raise PrepError(f"query of {len(text)} characters; the limit is {MAX_QUERY_CHARS}")
        if self._tokenizer is None:
            name = self._tokenizer_name
            # Original TERAN checkpoints name bert-base-uncased, whose vocabulary the bundled MiniLM shares.
            self._tokenizer = load_wordpiece("minilm" if name == "bert-base-uncased" else name).backend
            positions = int(self.ckpt["text_config"].get("max_position_embeddings", 512))
            self._tokenizer.enable_truncation(min(MAX_QUERY_TOKENS, positions))
        # build-splits' normalisation, by the rule the run's captions carry: a query is tokenized
        # as that caption was, so its scores (and ranks) are eval's
        return list(self._tokenizer.encode(normalize_caption(text, self.caption_rule)).ids)

    def token_strings(self, ids: list[int]) -> list[str]:
        if self._tokenizer is None:
            self.tokenize("a")
        return [self._tokenizer.id_to_token(i) or "?" for i in ids]

    @torch.no_grad()
    def encode_query(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(ids) < 2:
            raise PrepError("query has no tokens after tokenisation")
        t = torch.tensor([list(ids)], dtype=torch.long)
        lengths = torch.tensor([len(ids)])
        return self.model.encode_captions(t.to(self.device), lengths.to(self.device)).float().cpu(), lengths

    def _word_mask(self, words, lengths):
        from ..teran.alignment import word_keep_mask
        return word_keep_mask(lengths, words.shape[1], self.alignment["drop_tokens"])

    def query_vector(self, words, lengths) -> np.ndarray:
        with torch.no_grad():
            return self.head.text_vectors(words, self._word_mask(words, lengths)).numpy()

    # ------------------------------------------------------------ scoring
    def score_rows(self, rows, words, lengths) -> np.ndarray:
        """TERAN alignment scores of the images at shortlist rows `rows` for one encoded query."""
        regions, rlens = self.store.read_padded(rows)
        return self._score(torch.from_numpy(regions), torch.from_numpy(rlens), words, lengths)[:, 0]

    def _score(self, regions, rlens, words, lengths) -> np.ndarray:
        from ..teran.scoring import score_matrix
        from ..manifests.values import require_finite_scores
        al = self.alignment
        scores = score_matrix(regions, rlens, words, lengths, mode=al["mode"], drop_tokens=al["drop_tokens"],
                              word_max_floor_zero=al["word_max_floor_zero"], image_block=100)
        require_finite_scores(scores, what=f"search in {self.root}", hint="the index's model or its "
                              f"region embeddings hold NaN/inf; check with `prep verify {self.root} --full`")
        return scores

    def exhaustive_scores(self, words, lengths) -> np.ndarray:
        """(n_images,) scores of every indexed image, one shard at a time (shortlist row order)."""
        scores = np.empty(len(self.store), dtype=np.float32)
        for code in range(len(self.store.shard_names)):
            flat, offsets, positions = self.store.read_shard_block(code)
            sets = [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
            for b0 in range(0, len(sets), 1000):
                regions, rlens = pad_regions(sets[b0:b0 + 1000], self.embed_dim)
                scores[positions[b0:b0 + 1000]] = self._score(regions, rlens, words, lengths)[:, 0]
        return scores

    def search(self, query: str | None = None, *, ids: list[int] | None = None, k: int = 10,
               shortlist: int | None = None, exhaustive: bool = False) -> SearchResult:
        """The top `k` images for a text query (or its WordPiece `ids`), best first."""
        if (query is None) == (ids is None):
            raise PrepError("search: pass a query text or its token ids, not both")
        if not 1 <= int(k) <= MAX_K:
            raise PrepError(f"-k {k}: must be within 1..{MAX_K}")
        if exhaustive and shortlist is not None:
            raise PrepError("--shortlist and --exhaustive exclude each other")
        n = len(self.store)
        timings = {}
        t0 = time.perf_counter()
        ids = self.tokenize(query) if ids is None else list(ids)
        words, lengths = self.encode_query(ids)
        t1 = time.perf_counter()
        timings["encode"] = (t1 - t0) * 1e3
        if exhaustive:
            scores = self.exhaustive_scores(words, lengths)
            rows = np.arange(n)
            used = None
            timings["rerank"] = (time.perf_counter() - t1) * 1e3
        else:
            used = min(int(shortlist or default_shortlist(n)), n)
            if used < 1:
                raise PrepError(f"--shortlist {shortlist}: must be >= 1")
            _, found = self.faiss.search(self.query_vector(words, lengths), used)
            rows = np.sort(found[0][found[0] >= 0])  # key order: ties break as in the exhaustive scan
            t2 = time.perf_counter()
            timings["shortlist"] = (t2 - t1) * 1e3
            scores = self.score_rows(rows, words, lengths)
            timings["rerank"] = (time.perf_counter() - t2) * 1e3
        order = np.argsort(-scores, kind="stable")[:k]
        hits = [Hit(rank + 1, str(self.store.keys[rows[i]]), float(scores[i])) for rank, i in enumerate(order)]
        timings["total"] = (time.perf_counter() - t0) * 1e3
        return SearchResult(query if query is not None else " ".join(map(str, ids)),
                            "exhaustive" if exhaustive else "two-stage", used, hits,
                            {key: round(v, 3) for key, v in timings.items()})

    # ------------------------------------------------------------ alignment and image -> text
    def image_info(self, key: str) -> dict:
        try:
            row = self.store.position(key)
        except KeyError:
            raise PrepError(f"{key!r}: not an image of the index {self.root}") from None
        w, h = (int(v) for v in self.store.sizes[row])
        return {"row": row, "width": w, "height": h}

    def alignment_of(self, key: str, query: str) -> dict:
        """For each word piece of `query`, the region of `key` it aligns with best (cosine), and the
        region's box in original-image pixels."""
        info = self.image_info(key)
        ids = self.tokenize(query)
        words, lengths = self.encode_query(ids)
        emb, boxes = self.store.read_rows([info["row"]], boxes=True)[0]
        tokens = self.token_strings(ids)
        out = []
        if len(emb):
            sims = words[0] @ torch.from_numpy(np.asarray(emb, np.float32)).T  # (W, n)
            best = sims.max(dim=1)
            kept = self._word_mask(words, lengths)[0]
            for pos in (int(p) for p in kept.nonzero()[:, 0]):
                r = int(best.indices[pos])
                out.append({"position": pos, "word": tokens[pos], "region": r,
                            "score": round(float(best.values[pos]), 5),
                            "box": [round(float(v), 2) for v in boxes[r]]})
        return {"key": key, "width": info["width"], "height": info["height"], "query": query,
                "words": out}

    def search_captions(self, key: str, k: int = 10) -> list[dict]:
        """The indexed captions ranked for image `key` (exhaustive over the caption set)."""
        if not (self.root / CAPTIONS_NAME).is_file():
            raise PrepError(f"{self.root}: no caption set indexed; rebuild with `prep index ... "
                            "--captions SPLITS`")
        if not 1 <= int(k) <= MAX_K:
            raise PrepError(f"-k {k}: must be within 1..{MAX_K}")
        info = self.image_info(key)
        if self._captions is None:
            self._captions = read_captions(self.root / CAPTIONS_NAME)
        c = self._captions
        emb, _ = self.store.read_rows([info["row"]])[0]
        regions, rlens = pad_regions([emb], self.embed_dim)
        offsets = c["offsets"]
        scores = np.empty(len(offsets) - 1, dtype=np.float32)
        for c0 in range(0, len(scores), 500):
            c1 = min(len(scores), c0 + 500)
            lens = torch.from_numpy(np.diff(offsets[c0:c1 + 1]))
            words = torch.zeros(c1 - c0, int(lens.max()), self.embed_dim)
            for j in range(c1 - c0):
                words[j, :lens[j]] = torch.from_numpy(c["words"][offsets[c0 + j]:offsets[c0 + j + 1]].astype(np.float32))
            scores[c0:c1] = self._score(regions, rlens, words, lens)[0]
        order = np.argsort(-scores, kind="stable")[:k]
        return [{"rank": r + 1, "caption_id": int(c["caption_id"][i]), "image_key": c["image_key"][i],
                 "caption": c["raw"][i], "score": float(scores[i])} for r, i in enumerate(order)]

    def close(self) -> None:
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def search(index_dir: Path, query: str, *, k: int = 10, shortlist: int | None = None,
           exhaustive: bool = False, tokenizer: str | None = None) -> SearchResult:
    """One query against an index (opens and closes it; keep a Searcher for many queries)."""
    with Searcher(index_dir, tokenizer=tokenizer) as searcher:
        return searcher.search(query, k=k, shortlist=shortlist, exhaustive=exhaustive)
