"""What a file a user passed actually is, in words, for one-line refusals ("a text file ...")."""

from __future__ import annotations

from pathlib import Path

_MAGIC = (
    (b"PK\x03\x04", "a zip archive"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x1f\x8b", "a gzip file"),
    (b"PAR1", "a parquet file"),
    (b"\x93NUMPY", "a numpy .npy array"),
    (b"GIF8", "a GIF image"),
)


def describe_file(path: Path, head_bytes: int = 4096) -> str:
    """'an empty file', 'a text file starting "..."', 'a pickle (protocol 4)', 'a zip archive', ..."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(head_bytes)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if size == 0:
        return "an empty file (0 bytes)"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return f"{name} of {size:,} bytes"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return f"a pickle (protocol {head[1]}) of {size:,} bytes"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the sample
            return f"binary data of {size:,} bytes"
        text = head[:exc.start].decode("utf-8")
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"a text file of {size:,} bytes starting {first!r}"
