"""Text atoms shared by the report's modules: HTML escaping and how numbers are shown.

`_esc` escapes text for HTML (quotes included) and makes control characters visible, `_code` wraps
escaped text in <code>; `_num` formats a number, showing a missing one (None, NaN) as "–", and `_mean`
averages the values that are present. Kept apart so that every other module can use them without
importing the page itself.
"""

from __future__ import annotations

import html
import math

import numpy as np

# control characters are not allowed in HTML text: C0 ones become their Unicode pictures (␀ ␁ ...)
_CONTROLS = str.maketrans(
    {c: 0x2400 + c for c in range(32) if chr(c) not in "\t\n\r"}
    | {0x7F: 0x2421}
    | dict.fromkeys(range(0x80, 0xA0), 0xFFFD)
)


def _esc(text) -> str:
    """HTML-escaped text (quotes included) with control characters made visible."""
    return html.escape(str(text), quote=True).translate(_CONTROLS)


def _code(text) -> str:
    return f"<code>{_esc(str(text))}</code>"


def _num(value, spec: str = ".3f") -> str:
    if value is None or isinstance(value, str) or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _mean(values) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else math.nan
