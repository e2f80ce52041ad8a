"""Error rows of an index grouped by reason, with a few example keys each (as img2dataset's stats).

An error message is "what went wrong: details" (see errors.ItemError); its reason is the part
before the details, with the image key prefix, parenthesised details and numbers taken out, so
"a.jpg: decompression bomb: 9000x9000 pixels ..." and "b.jpg: decompression bomb: ..." share
the reason "decompression bomb".
"""

from __future__ import annotations

import re

EXAMPLES_PER_REASON = 3


def error_reason(key: str, message: str) -> str:
    text = (message or "").strip()
    for prefix in (f"{key}: ", f"{key} "):
        if key and text.startswith(prefix):
            text = text[len(prefix):]
            break
    text = re.split(r"[:(]", text, maxsplit=1)[0].strip()
    # Counts and sizes become N so that they group; digits inside a word stay (float16, fp32,
    # utf-8, regions-00003.h5), so the reason still reads as it was written.
    text = re.sub(r"(?<![\w.\-+])\d+(?:\.\d+)?(x\d+)?(?!\w)",
                  lambda m: "NxN" if m.group(1) else "N", text)
    return text or "unknown"


def summarize_errors(keys, messages, examples: int = EXAMPLES_PER_REASON) -> dict:
    """{reason: {"count": n, "examples": [first keys in sorted order]}}, most frequent first."""
    groups: dict[str, list[str]] = {}
    for key, message in zip(keys, messages):
        groups.setdefault(error_reason(key, message), []).append(key)
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    return {reason: {"count": len(members), "examples": sorted(members)[:examples]}
            for reason, members in ordered}


def format_error_summary(summary: dict) -> str:
    """'2 corrupt image data (e.g. 'a.jpg', 'b.png'); 1 empty file (e.g. 'c.jpg')'."""
    return "; ".join(f"{info['count']} {reason} (e.g. {', '.join(map(repr, info['examples']))})"
                     for reason, info in summary.items())
