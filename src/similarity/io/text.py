"""Bytes to text lines, with the encoding checked as it streams.

Text inputs (CSV, TSV, JSON Lines) are decoded here rather than by ``io.TextIOWrapper`` so that a
bad byte is reported with its absolute offset and line, as a ``InputEncodingError`` (a ``RunError``:
exit 2 in the CLI, a failed job in the batch pipeline), never a ``UnicodeDecodeError`` traceback.

Encoding: ``None`` means UTF-8, with a byte-order mark honoured (UTF-8, UTF-16 LE/BE) and NUL
bytes taken as the sign of UTF-16 without a mark. Any other name is used as given (``cp1252``,
``latin-1``, ``utf-16``...). Lines are split on ``\\n``, ``\\r\\n`` and ``\\r`` only (what the csv
module and JSON Lines treat as line ends), each kept with its ending.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from typing import BinaryIO

from ..errors import ConfigError, InputEncodingError

_BOMS = (
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_SNIFF = 4096
_CHUNK = 1 << 16
#: What the message suggests for a file that is not UTF-8 (what Excel writes on Windows).
LEGACY_HINT = "cp1252"


def check_encoding(name: str, flag: str = "--encoding") -> str:
    """``name`` if Python knows the codec, else ``ConfigError`` naming the flag."""
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise ConfigError(f"{flag}: unknown encoding {name!r} (e.g. utf-8, cp1252, latin-1, utf-16)") from None


def pick_encoding(head: bytes, encoding: str | None) -> str:
    """The codec to read a stream starting with ``head`` with (see the module's docstring)."""
    if encoding is not None:
        name = check_encoding(encoding)
        if name == "utf-8":
            return "utf-8-sig"
        if (name, head[:2]) in (("utf-16-le", codecs.BOM_UTF16_LE), ("utf-16-be", codecs.BOM_UTF16_BE)):
            return "utf-16"  # the mark is not text: the codec that reads it drops it
        return encoding
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return codec
    if b"\x00" in head[:_SNIFF]:
        raise InputEncodingError(
            "the input holds NUL bytes: it looks like UTF-16 without a byte-order mark; "
            "rerun with --encoding utf-16-le (or utf-16-be), or save it as UTF-8"
        )
    return "utf-8-sig"


class TextLines:
    """Iterate the lines of a binary stream decoded with ``encoding`` (``None``: detect, see above).
    ``raw`` must support ``peek`` (``io.BufferedReader``, ``gzip.GzipFile``)."""

    def __init__(self, raw: BinaryIO, encoding: str | None = None, chunk: int = _CHUNK) -> None:
        self._raw = raw
        peek = getattr(raw, "peek", None)
        head = peek(_SNIFF)[:_SNIFF] if peek is not None else b""
        self.encoding = pick_encoding(head, encoding)
        self._explicit = encoding is not None
        self._chunk = chunk
        #: Lines handed out so far (the next line's number is ``line + 1``).
        self.line = 0

    def _error(self, exc: UnicodeDecodeError, fed: int, pending: bytes, data: bytes, newlines: int) -> Exception:
        window = pending + data
        offset = fed - len(pending) + exc.start
        line = newlines - pending.count(b"\n") + window[: exc.start].count(b"\n") + 1
        bad = window[exc.start : exc.end][:4].hex(" ")
        shown = self.encoding.replace("-sig", "")
        if self._explicit:
            fix = "check the file's encoding and rerun with the right --encoding"
        else:
            fix = (
                f"if it was saved by Excel or another Windows program, rerun with --encoding {LEGACY_HINT} "
                "(or the file's real encoding: latin-1, utf-16, ...); if only a few bytes are damaged, "
                "repair them, e.g. `iconv -f utf-8 -t utf-8 -c IN > OUT` drops them"
            )
        return InputEncodingError(f"the input is not valid {shown} at byte {offset} (line {line}: bytes {bad}): {fix}")

    def __iter__(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder(self.encoding)("strict")
        fed = newlines = 0
        carry = ""
        while True:
            data = self._raw.read(self._chunk)
            final = not data
            pending = decoder.getstate()[0]
            try:
                text = decoder.decode(data, final)
            except UnicodeDecodeError as exc:
                raise self._error(exc, fed, pending, data, newlines) from None
            fed += len(data)
            newlines += data.count(b"\n")
            carry += text
            if not final and "\n" not in text and "\r" not in text:
                continue  # no line ends yet (one long quoted field): do not rescan what is held
            hold = "" if final or not carry.endswith("\r") else "\r"  # maybe the first half of "\r\n"
            body = carry[: len(carry) - len(hold)]
            rest = ""
            # str.splitlines also splits on \v, \f, \x1c-\x1e, \x85, \u2028, \u2029: join those back.
            for piece in body.splitlines(keepends=True):
                rest += piece
                if rest.endswith(("\n", "\r")):
                    self.line += 1
                    yield rest
                    rest = ""
            carry = rest + hold
            if final:
                if carry:
                    self.line += 1
                    yield carry
                return
