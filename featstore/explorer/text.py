"""Untrusted text made safe to show: HTML-escaped, control and direction characters made visible.

Corpus tokens may hold markup, control characters, or bidirectional marks that would reorder the
rest of a line; each such character is shown as a visible escape (`\\u202e`), a newline as `⏎`,
a tab as `→`, and everything is HTML-escaped (quotes included, so it is safe in attributes).
"""

from __future__ import annotations

import html
import unicodedata

SHOWN = {"\n": "⏎", "\t": "→", "\r": "␍"}


def visible(text: str) -> str:
    """`text` with every control (Cc), format (Cf: bidi marks, zero-width) or unassigned
    character replaced by its `\\uXXXX` escape."""
    out = []
    for ch in text:
        if ch in SHOWN:
            out.append(SHOWN[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cn", "Co", "Cs", "Zl", "Zp"):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def esc(value: object) -> str:
    """Any value as safe HTML text (also safe inside a quoted attribute)."""
    if isinstance(value, float):
        return "" if value != value else f"{value:.4g}"
    return html.escape(visible("" if value is None else str(value)), quote=True)
