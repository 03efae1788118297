"""Untrusted text at the terminal: names from files shown as data, stdin read as UTF-8 or refused.

Device path: the standard library only.

Labels, roles, tensor, layer, member and file names all come from files a user may not have made. Printed
raw, an ESC or OSC sequence in one (`\\x1b]0;title\\x07`, `\\x1b[31m`) would drive the user's terminal, and a
bidi override (U+202E) would reorder what the user reads. `shown` is the one place that makes such text
printable: every C0/C1 control character, DEL, bidi control, line separator and lone surrogate becomes a
visible escape (`\\x1b`, `\\u202e`), and absurdly long text is cut. It escapes for the terminal, not for rich:
the CLI adds rich's markup escaping on top where it prints through rich.
"""

from __future__ import annotations

import functools
from typing import BinaryIO, Iterator

from ..errors import InputError

# A name longer than this is cut (a label file caps labels at 200 characters; anything longer is not a name).
MAX_NAME_CHARS = 200
# A path may hold a few names and deep folders: cut only past this.
MAX_PATH_CHARS = 1000
ELLIPSIS = "…"

# Characters a terminal acts on instead of showing: C0 controls (ESC, BEL, CR, BS, LF…), DEL, C1 controls (CSI
# U+009B, OSC U+009D, which some terminals honour as 8-bit escapes), Unicode's bidi embeddings, overrides and
# isolates (U+202A–U+202E, U+2066–U+2069) and marks (U+200E, U+200F, U+061C), the line and paragraph separators,
# and lone surrogates (undecodable bytes smuggled in by surrogateescape, which no UTF-8 stream can print).
_HIDDEN = [
    *range(0x00, 0x20), *range(0x7F, 0xA0), 0x061C, 0x200E, 0x200F, 0x2028, 0x2029,
    *range(0x202A, 0x202F), *range(0x2066, 0x206A), *range(0xD800, 0xE000),
]
_ESCAPES = {code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" for code in _HIDDEN}


def shown(text: object, *, limit: int | None = MAX_NAME_CHARS, keep: str = "") -> str:
    """`text` (str() of anything) safe to print: control, bidi and separator characters as visible escapes, and
    over `limit` characters (None: no limit) cut in the middle to an ellipsis, so a path keeps its file name.
    Characters in `keep` (e.g. "\\n") pass as they are."""
    text = str(text)
    if limit is not None and len(text) > limit:
        head = (limit - 1) // 2
        text = text[:head] + ELLIPSIS + text[len(text) - (limit - 1 - head):]
    return text.translate(_escapes(keep))


@functools.lru_cache(maxsize=8)
def _escapes(keep: str) -> dict[int, str]:
    return {code: escape for code, escape in _ESCAPES.items() if chr(code) not in keep}


def utf8_lines(stream: BinaryIO, *, max_bytes: int) -> Iterator[str]:
    """Lines of a binary stream (stdin's bytes) decoded as UTF-8 whatever the locale, each read with a bounded
    readline; a line that is not UTF-8, or longer than `max_bytes`, raises InputError naming it."""
    for number, raw in enumerate(iter(lambda: stream.readline(max_bytes + 1), b""), start=1):
        if len(raw) > max_bytes:
            raise InputError(f"stdin line {number} is longer than {max_bytes // 1024} KiB — one line is one time step")
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"stdin line {number} is not UTF-8 (0x{raw[exc.start]:02x} at byte {exc.start + 1}) — "
                "send JSON text encoded as UTF-8"
            ) from None
