"""Caption normalisation, spaCy words and WordPiece ids against hand-computed expectations."""

from __future__ import annotations

import hashlib
import json

import pytest

from teranprep.errors import PrepError
from teranprep.manifests.splits import read_split
from teranprep.pipeline.splits import build_splits, detect_format, seeded_split
from teranprep.tokenizers import (MINILM_SAFETENSORS_SHA256, load_wordpiece, minilm_dir,
                                  normalize_caption, word_tokens, words_of)


@pytest.fixture(scope="module")
def vocab():
    lines = (minilm_dir() / "vocab.txt").read_text("utf-8").splitlines()
    return {token: i for i, token in enumerate(lines)}


@pytest.fixture(scope="module")
def minilm():
    return load_wordpiece()


def ids_of(vocab, *pieces):
    return [vocab["[CLS]"], *(vocab[p] for p in pieces), vocab["[SEP]"]]


def test_normalisation_applies_nfkc_collapses_whitespace_and_keeps_case():
    # full-width A, no-break space, tab, newline, the fi ligature, e + combining acute
    assert normalize_caption("  \uff21\u00a0dog\tand\n a  \ufb01sh e\u0301  ") == "A dog and a fish \u00e9"
    assert normalize_caption(" \t\n\u3000 ") == ""


def test_word_tokens_split_punctuation_and_clitics_lower_cased():
    assert words_of("A dog's ball, (red)!") == ["a", "dog", "'s", "ball", ",", "(", "red", ")", "!"]
    assert words_of("Don't  STOP") == ["do", "n't", "stop"]
    assert words_of("Caf\u00e9 NA\u00cfVE") == ["caf\u00e9", "na\u00efve"]
    assert word_tokens(["two", "", "three words"]) == [["two"], [], ["three", "words"]]


def test_wordpiece_ids_match_the_bert_uncased_vocabulary(vocab, minilm):
    texts = ["A dog's ball, (red)!", "Caf\u00e9 na\u00efve \ufb01sh", "RUNNING dogs"]
    ids, truncated = minilm.encode([normalize_caption(t) for t in texts], max_tokens=128)
    assert ids[0] == ids_of(vocab, "a", "dog", "'", "s", "ball", ",", "(", "red", ")", "!")
    assert ids[1] == ids_of(vocab, "cafe", "naive", "fish")  # accents stripped, ligature split
    assert ids[2] == ids_of(vocab, "running", "dogs")
    assert truncated == 0


def test_long_captions_are_cut_at_max_tokens_and_counted(vocab, minilm):
    ids, truncated = minilm.encode(["dog " * 300, "a dog", "a b c d e f g h"], max_tokens=10)
    assert ids[0] == ids_of(vocab, *["dog"] * 8)
    assert ids[1] == ids_of(vocab, "a", "dog")
    assert ids[2] == ids_of(vocab, "a", "b", "c", "d", "e", "f", "g", "h")  # exactly 10: not cut
    assert truncated == 1


def test_identity_records_the_vocab_file_sha256_and_the_package_is_verified(minilm):
    assert minilm.vocab_sha256 == hashlib.sha256((minilm_dir() / "vocab.txt").read_bytes()).hexdigest()
    weights = minilm_dir() / "model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == MINILM_SAFETENSORS_SHA256
    with pytest.raises(PrepError, match="model.safetensors: sha256"):
        minilm_dir(expected_sha256="0" * 64)


def test_a_local_tokenizer_dir_is_used_and_recorded(tmp_path, make_features):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "##s", "."]
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in tokens), "utf-8")
    tiny = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tiny.normalizer = normalizers.BertNormalizer(lowercase=True)
    tiny.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tiny.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tiny, unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", pad_token="[PAD]").save_pretrained(tmp_path / "tiny")
    captions = tmp_path / "caps.jsonl"
    captions.write_text("\n".join(json.dumps({"image": k, "caption": c}) for k, c in
                                  [("x.jpg", "A cat."), ("y.jpg", "Dogs"), ("z.jpg", "a zebra")]))
    features, _ = make_features(["x.jpg", "y.jpg", "z.jpg"], n_boxes=1, dim=4)
    result = build_splits(captions, features=features, out=tmp_path / "splits",
                          tokenizer=str(tmp_path / "tiny"), val=1, test=1)
    assert result.manifest["tokenizer"]["name"] == "tiny"
    assert result.manifest["tokenizer"]["vocab_sha256"] == \
        hashlib.sha256((tmp_path / "vocab.txt").read_bytes()).hexdigest()
    frames = {n: read_split(tmp_path / "splits", n) for n in ("train", "val", "test")}
    ids = {k: list(v) for f in frames.values() for k, v in zip(f.image_key, f.input_ids)}
    # the default caption rule gives "Dogs" and "a zebra" their final '.' (id 9)
    assert result.manifest["parameters"]["caption_rule"] == "final-period"
    assert ids == {"x.jpg": [2, 5, 6, 9, 3], "y.jpg": [2, 7, 8, 9, 3], "z.jpg": [2, 5, 1, 9, 3]}
    as_given = build_splits(captions, features=features, out=tmp_path / "as-given",
                            tokenizer=str(tmp_path / "tiny"), val=1, test=1, caption_rule="as-given")
    assert as_given.manifest["parameters"]["caption_rule"] == "as-given"
    assert "caption rule: as-given" in as_given.summary()
    frames = {n: read_split(tmp_path / "as-given", n) for n in ("train", "val", "test")}
    ids = {k: list(v) for f in frames.values() for k, v in zip(f.image_key, f.input_ids)}
    assert ids == {"x.jpg": [2, 5, 6, 9, 3], "y.jpg": [2, 7, 8, 3], "z.jpg": [2, 5, 1, 3]}
    with pytest.raises(PrepError, match="--caption-rule"):
        build_splits(captions, features=features, out=tmp_path / "bad", val=1, test=1, caption_rule="dot")
    with pytest.raises(PrepError, match="cannot load a tokenizer"):
        load_wordpiece(str(tmp_path / "no-such-model"))


def test_caption_rule_is_one_normalisation_and_old_splits_say_they_carry_none(tmp_path):
    from teranprep.manifests.splits import caption_rule_of, run_caption_rule
    assert normalize_caption(" a  dog ", "final-period") == "a dog."
    assert normalize_caption("a dog.", "final-period") == "a dog."
    assert normalize_caption("a dog!", "final-period") == "a dog!."
    assert normalize_caption("  ", "final-period") == ""  # still empty: dropped as empty
    assert normalize_caption(" a  dog ") == normalize_caption(" a  dog ", "as-given") == "a dog"
    with pytest.raises(ValueError):
        normalize_caption("a", "period")
    # splits from before the record carry no rule; a run names its own, else its splits'
    assert caption_rule_of({"parameters": {"seed": 0}}) == "as-given"
    assert run_caption_rule({"caption_rule": "final-period", "splits": "/nowhere"}) == "final-period"
    assert run_caption_rule({"splits": str(tmp_path / "gone"), "splits_manifest_sha256": "0"}) == "as-given"
    assert run_caption_rule(None) == "final-period"  # an original TERAN checkpoint


def test_pipeline_rows_carry_words_and_ids_of_the_normalised_caption(tmp_path, make_features, vocab):
    captions = tmp_path / "caps.csv"
    long_caption = " ".join(["dog"] * 200)
    captions.write_text('image,caption\nk.jpg,"  Two\u00a0\uff24ogs,\n running! "\n'
                        f"k.jpg,{long_caption}\nm.jpg,a cat\nn.jpg,a cat\n", "utf-8")
    features, _ = make_features(["k.jpg", "m.jpg", "n.jpg"], n_boxes=1, dim=4)
    result = build_splits(captions, features=features, out=tmp_path / "splits", val=1, test=1,
                          seed=3, max_tokens=12)
    rows = {}
    for name in ("train", "val", "test"):
        frame = read_split(tmp_path / "splits", name)
        rows.update({cid: (list(w), list(i), raw) for cid, w, i, raw in
                     zip(frame.caption_id, frame.words, frame.input_ids, frame.raw)})
    assert rows[0] == (["two", "dogs", ",", "running", "!", "."],  # the caption rule's '.'
                       ids_of(vocab, "two", "dogs", ",", "running", "!", "."),
                       "  Two\u00a0\uff24ogs,\n running! ")  # raw is kept as written
    assert rows[1][0] == ["dog"] * 200 + ["."] and rows[1][1] == ids_of(vocab, *["dog"] * 10)
    assert result.manifest["truncated"] == 1
    assert result.manifest["tokenizer"]["max_tokens"] == 12


def test_seeded_split_rule_and_format_detection(tmp_path):
    keys = [f"k{i}" for i in range(10)]
    split = seeded_split(reversed(keys), val=2, test=3, seed=11)
    ranked = sorted(keys, key=lambda k: hashlib.sha256(b"11\x00" + k.encode()).digest())
    assert {k for k, s in split.items() if s == "val"} == set(ranked[:2])
    assert {k for k, s in split.items() if s == "test"} == set(ranked[2:5])
    with pytest.raises(PrepError, match="no training image"):
        seeded_split(keys, val=5, test=5, seed=0)
    (tmp_path / "one_line.json").write_text(json.dumps({"images": []}))
    (tmp_path / "lines.txt").write_text('{"image": "a", "caption": "b"}\n{"image": "c", "caption": "d"}\n')
    (tmp_path / "table.txt").write_text("image,caption\na,b\n")
    assert detect_format(tmp_path / "one_line.json") == "karpathy"
    assert detect_format(tmp_path / "lines.txt") == "jsonl"
    assert detect_format(tmp_path / "table.txt") == "csv"
    assert detect_format(tmp_path / "table.txt", "jsonl") == "jsonl"


def _direct(minilm, texts, max_tokens):
    """Whole-caption tokenization, one caption at a time: the reference the batched paths must match."""
    from tokenizers import Tokenizer
    backend = Tokenizer.from_str(minilm.backend.to_str())
    backend.no_padding()
    backend.enable_truncation(max_tokens)
    return [words_of(t) for t in texts], [backend.encode(t).ids for t in texts]


def test_chunk_cache_gives_what_whole_caption_tokenization_gives(minilm):
    from hypothesis import given, settings, strategies as st
    from teranprep.tokenizers.captions import CaptionTokenizer

    tokenizer = CaptionTokenizer(minilm, max_tokens=9)
    assert tokenizer.chunk_cache
    alphabet = st.sampled_from(list("aAbZ .,'!?-()/:@#$%&\"\u00e9\u00c9\u00df\u03a3\u03c3\u4e2d\u00a0\t"
                                    "\ufb01\uff21\u0301\u200b0123456789"))

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(st.lists(st.text(alphabet, min_size=1, max_size=40), min_size=1, max_size=8))
    def check(raws):
        texts = [normalize_caption(r) or "x" for r in raws]
        words, ids, truncated = tokenizer(texts)
        want_words, want_ids = _direct(minilm, texts, 9)
        assert words.to_pylist() == want_words
        assert ids.to_pylist() == want_ids
        assert truncated == sum(len(i) > 9 for i in _direct(minilm, texts, 512)[1])

    check()


def test_a_tokenizer_that_marks_spaces_falls_back_to_whole_captions():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from teranprep.tokenizers.captions import CaptionTokenizer
    from teranprep.tokenizers.wordpiece import WordPiece

    # byte-level BPE folds the space into the next token ("Ġdog"): chunks are not independent
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["a dog runs", "the dog and a cat", "cats run"] * 5,
                            trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    wordpiece = WordPiece(name="bpe", vocab_sha256="", tokenizer_sha256="", backend=bpe)
    tokenizer = CaptionTokenizer(wordpiece, max_tokens=64)
    assert not tokenizer.chunk_cache
    texts = ["a dog runs", "the cat"]
    words, ids, _ = tokenizer(texts)
    assert ids.to_pylist() == [bpe.encode(t).ids for t in texts]
    assert words.to_pylist() == [["a", "dog", "runs"], ["the", "cat"]]
