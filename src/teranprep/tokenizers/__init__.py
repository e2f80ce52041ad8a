"""Caption text: normalisation and spaCy words (text.py), WordPiece ids (wordpiece.py), both in
batches through a chunk cache (captions.py), and the bundled MiniLM (pretrained.py)."""

from .captions import CaptionTokenizer
from .pretrained import MINILM_NAME, MINILM_SAFETENSORS_SHA256, minilm_dir
from .text import is_valid_utf8, normalize_caption, printable, word_tokens, words_of
from .wordpiece import DEFAULT_TOKENIZER, WordPiece, load_wordpiece, vocab_sha256

__all__ = ["CaptionTokenizer", "MINILM_NAME", "MINILM_SAFETENSORS_SHA256", "minilm_dir", "is_valid_utf8",
           "normalize_caption", "printable", "word_tokens", "words_of", "DEFAULT_TOKENIZER",
           "WordPiece", "load_wordpiece", "vocab_sha256"]
