"""Bounded readers: what a file is, and how much it says it holds, are checked before a byte is allocated for it.

Device path: the standard library and numpy only. One reader per format, used wherever edge-rnn reads a file it did
not just write:

- `open_regular`: a regular file, or a one-line error saying what the path is instead — missing, a directory, a
  FIFO (opening one blocks until a writer comes), a character or block device (`/dev/zero` never ends), a socket —
  and its size checked against a cap. The path is opened non-blocking and checked again on the open descriptor,
  so a path swapped for a FIFO between the two checks cannot hang the reader.
- `read_bytes_capped` / `read_text_capped` / `read_json_capped`: whole files, read with a limit one byte past the
  cap (files in /proc say they are empty; a growing file is stopped at the cap); JSON also bounded in nesting.
- `read_npy_header` / `load_npy` / `read_npz`: the .npy header's shape × item size checked against the cap and
  against the bytes the file (or zip member) holds before an array is allocated; arrays are then filled in chunks
  from the stream, so memory grows with the bytes actually present, never with what a header claims.
- `open_zip` / `check_member_sizes`: a zip's central directory is bounded (its size and number of entries) before
  `zipfile` parses it, and its members' declared uncompressed sizes before any is read. Python's zipfile never
  inflates a member past the size the central directory declares (more data fails its CRC), so the declared sizes
  bound what reading a member can allocate, even when the compressed data lies.

Caps here are the device's (the device path cannot import edge_rnn.config); the workstation's own caps (a Keras
archive, weights a model may hold, text corpora, labels, TF_CONFIG) live in edge_rnn/config.py. Both are listed
in the README's table of caps.
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Sequence

import numpy as np

from ..errors import DataError, EdgeRnnError

# What a file may make one command hold: every cap below keeps a command's resident memory under this, with
# the copies the command makes of what it read (a converted dtype, a batch, a model's own weights).
MEMORY_BUDGET_BYTES = 2 * 1024**3
# One array read into memory (a .npy input, an .npz member): 512 MiB is ~170,000 float32 28×28 digits.
MAX_ARRAY_BYTES = 512 * 1024**2
# Every array of one file read into memory together (an .npz's members, inflated): half the budget, since
# the command converts what it read (to the graph's dtype, to batches) beside it.
MAX_ARRAYS_BYTES = MEMORY_BUDGET_BYTES // 2
# Arrays in one .npz: a model's inputs and its outputs' targets, a checkpoint's 14 arrays, a bundle's references.
MAX_NPZ_MEMBERS = 64
# A zip's central directory is parsed whole by `zipfile` into one Python object per entry (~0.5 KB each): an
# .npz or .keras of at most a thousand members needs a few hundred KB; 4 MiB bounds that parse at ~90,000 entries.
MAX_ZIP_DIRECTORY_BYTES = 4 * 1024**2
# JSON nesting: manifests nest ~5 levels, Keras configs ~15 (model → layers → Bidirectional → cell → initializer);
# deeper JSON would only exhaust a recursive walk of it (the parser's own limit is ~1,000).
MAX_JSON_DEPTH = 64
# Bytes read per call while filling an array from a stream.
_CHUNK = 16 * 1024**2

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def size_text(n: int) -> str:
    """A byte count for messages: `512 MiB`, `64 KiB`, `1.5 GiB`, `300 bytes`."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:,.1f}".removesuffix(".0") + f" {unit}"
    return f"{n:,} bytes"


def _tail(hint: str) -> str:
    return f" — {hint}" if hint else ""


def file_kind(mode: int) -> str:
    """What a stat mode names, for messages: 'a directory', 'a FIFO (named pipe)', …, 'a regular file'."""
    return next((kind for test, kind in _KINDS if test(mode)), "a regular file")


def not_regular(path: str | os.PathLike[str]) -> str | None:
    """What `path` is when it exists (symlinks followed) and is not a regular file — 'a directory', 'a FIFO (named
    pipe)', 'a character device' … — else None (a regular file, or nothing there)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else file_kind(mode)


def open_regular(
    path: str | os.PathLike[str], *, what: str, max_bytes: int | None = None, error: type[EdgeRnnError] = DataError,
    hint: str = "", size_hint: str | None = None,
) -> IO[bytes]:
    """`path` opened for binary reading, if it is a regular file of at most `max_bytes`; else `error`, one line
    naming the path, what it is instead (missing, a directory, a FIFO, a device, a socket) or its size, and `hint`
    (`size_hint` when it is too big)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"no such {what}: {path}{_tail(hint)}") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path} ({exc.strerror}){_tail(hint)}") from None
    if not stat.S_ISREG(mode):
        raise error(f"{what} {path} is {file_kind(mode)}, not a regular file{_tail(hint)}")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise error(f"cannot read {what} {path} ({exc.strerror}){_tail(hint)}") from None
    f = os.fdopen(fd, "rb")
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # swapped between the stat and the open
        f.close()
        raise error(f"{what} {path} is {file_kind(info.st_mode)}, not a regular file{_tail(hint)}")
    if max_bytes is not None and info.st_size > max_bytes:
        f.close()
        raise error(f"{what} {path} is {size_text(info.st_size)}, over the {size_text(max_bytes)} cap"
                    f"{_tail(hint if size_hint is None else size_hint)}")
    return f


def read_bytes_capped(
    path: str | os.PathLike[str], *, what: str, max_bytes: int, error: type[EdgeRnnError] = DataError, hint: str = "",
) -> bytes:
    """A regular file's bytes, at most `max_bytes` (checked by its size, then by a read one byte past the cap)."""
    with open_regular(path, what=what, max_bytes=max_bytes, error=error, hint=hint) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise error(f"cannot read {what} {path} ({exc.strerror}){_tail(hint)}") from None
    if len(data) > max_bytes:
        raise error(f"{what} {path} holds more than the {size_text(max_bytes)} cap{_tail(hint)}")
    return data


def read_text_capped(
    path: str | os.PathLike[str], *, what: str, max_bytes: int, error: type[EdgeRnnError] = DataError, hint: str = "",
    errors: str = "strict",
) -> str:
    """A UTF-8 text file of at most `max_bytes`; invalid UTF-8 is `error` naming the byte (unless `errors` says)."""
    data = read_bytes_capped(path, what=what, max_bytes=max_bytes, error=error, hint=hint)
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}){_tail(hint or 'convert it to UTF-8')}") from None


def parse_json(data: bytes | str, *, where: object, error: type[EdgeRnnError], hint: str) -> Any:
    """json.loads that turns every way hostile text fails into `error` naming `where`.

    Besides JSONDecodeError: invalid UTF-8, a number over Python's 4,300-digit int limit (a plain ValueError),
    and nesting deep enough (`[[[[…`) to exhaust the recursion limit (RecursionError is not a ValueError).
    """
    try:
        return json.loads(data)
    except RecursionError:
        raise error(f"{where} nests JSON arrays or objects too deeply — {hint}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise error(f"{where} is not valid JSON ({first}) — {hint}") from None


def json_depth(value: Any) -> int:
    """How deeply arrays and objects nest in parsed JSON (a scalar is 0), walked without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def parse_json_bounded(
    data: bytes | str, *, where: object, error: type[EdgeRnnError], hint: str, max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """parse_json, then refused past `max_depth` levels of nesting (so later walks of it cannot recurse
    out of stack)."""
    value = parse_json(data, where=where, error=error, hint=hint)
    if json_depth(value) > max_depth:
        raise error(f"{where} nests JSON arrays or objects more than {max_depth} deep{_tail(hint)}")
    return value


def read_json_capped(
    path: str | os.PathLike[str], *, what: str, max_bytes: int, error: type[EdgeRnnError] = DataError, hint: str = "",
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """A JSON file of at most `max_bytes`, nested at most `max_depth` deep."""
    data = read_bytes_capped(path, what=what, max_bytes=max_bytes, error=error, hint=hint)
    return parse_json_bounded(data, where=path, error=error, hint=hint, max_depth=max_depth)


# ---------------------------------------------------------------------------------------------
# .npy


def check_numeric(dtype: np.dtype, *, where: str, error: type[EdgeRnnError]) -> None:
    """Refuse object, structured, sub-array, complex, string and date dtypes: only booleans, integers and floats."""
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "biuf":
        raise error(f"{where} has dtype {dtype}; give a plain numeric array (integers or floats)")


@dataclass(frozen=True)
class ArrayHeader:
    """A .npy header: the array's shape, dtype and memory order, and where its data starts in the stream."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


def read_npy_header(f: IO[bytes], *, where: str, error: type[EdgeRnnError], hint: str = "save it with numpy.save") -> ArrayHeader:
    """The header of the .npy at `f`'s position (format 1.0 or 2.0, numeric dtype, no negative axis); the stream is
    left at the data. A header that is not one raises ValueError (the caller names the file)."""
    start = f.tell()
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise error(f"{where} is a .npy of format {version[0]}.{version[1]} (text field names); {hint}")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    check_numeric(dtype, where=where, error=error)
    if any(d < 0 for d in shape):
        raise error(f"{where} declares shape {tuple(shape)}, with a negative axis{_tail(hint)}")
    return ArrayHeader(tuple(shape), dtype, bool(fortran), f.tell() - start)


def check_declared(header: ArrayHeader, *, holds: int, where: str, error: type[EdgeRnnError], max_bytes: int | None,
                   hint: str = "") -> None:
    """Refuse a header whose data is over `max_bytes`, or not exactly the `holds` bytes after the header."""
    declared = f"shape {header.shape} of {header.dtype}"
    if max_bytes is not None and header.nbytes > max_bytes:
        raise error(f"{where} declares {declared}, {size_text(header.nbytes)}, over the {size_text(max_bytes)} cap"
                    f"{_tail(hint or 'split it into smaller files')}")
    if header.offset + header.nbytes != holds:
        raise error(f"{where} declares {declared} ({header.nbytes:,} bytes) but holds {holds - header.offset:,} bytes of data — "
                    f"truncated or padded{_tail(hint or 'save it again with numpy.save')}")


def read_array(f: IO[bytes], header: ArrayHeader, *, where: str, error: type[EdgeRnnError]) -> np.ndarray:
    """The array whose data follows at `f`, filled chunk by chunk: memory grows with the bytes the stream holds."""
    flat = np.empty(header.count, dtype=header.dtype)
    view = memoryview(flat.view(np.uint8))
    done = 0
    while done < len(view):
        got = f.readinto(view[done: done + _CHUNK])
        if not got:
            raise error(f"{where} ends after {done:,} of the {len(view):,} bytes of data its header declares — truncated; save it again")
        done += got
    return flat.reshape(header.shape[::-1]).transpose() if header.fortran else flat.reshape(header.shape)


def load_npy(
    path: str | os.PathLike[str], *, what: str = "input file", max_bytes: int = MAX_ARRAY_BYTES,
    error: type[EdgeRnnError] = DataError, hint: str = "",
) -> np.ndarray:
    """One .npy array from a regular file: its header checked against `max_bytes` and the file's size, then its
    data read; never unpickles."""
    path = Path(path)
    with open_regular(path, what=what, max_bytes=max_bytes, error=error, hint=hint, size_hint=hint or "split it into smaller files") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            if f.read(4) == b"PK\x03\x04":
                raise error(f"{path} is an .npz archive; give one .npy array per file")
            f.seek(0)
            header = read_npy_header(f, where=str(path), error=error)
            check_declared(header, holds=size, where=str(path), error=error, max_bytes=max_bytes, hint=hint)
            return read_array(f, header, where=str(path), error=error)
        except (ValueError, OSError, EOFError) as exc:
            raise error(f"cannot read {path} as a .npy array ({_first_line(exc)}){_tail(hint or 'save it with numpy.save')}") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# zip archives (.npz, .keras)

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory: signature, disks, entries here, entries, size, offset, comment
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")


def _central_directory(f: IO[bytes]) -> tuple[int, int]:
    """(entries, bytes) of a zip's central directory as its end records declare, read from the end of `f`."""
    f.seek(0, io.SEEK_END)
    end = f.tell()
    f.seek(max(0, end - (_EOCD.size + 0xFFFF)))
    tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        raise zipfile.BadZipFile("no end of central directory record")
    _, _, _, _, entries, size, _, _ = _EOCD.unpack_from(tail, at)
    locator = at - _ZIP64_LOCATOR.size
    if locator >= 0 and tail[locator: locator + 4] == b"PK\x06\x07":
        offset = _ZIP64_LOCATOR.unpack_from(tail, locator)[2]
        f.seek(offset)
        record = f.read(_ZIP64_EOCD.size)
        if len(record) == _ZIP64_EOCD.size and record[:4] == b"PK\x06\x06":
            _, _, _, _, _, _, _, entries, size, _ = _ZIP64_EOCD.unpack(record)
    f.seek(0)
    return entries, size


def open_zip(f: IO[bytes], *, where: object, error: type[EdgeRnnError], hint: str, max_members: int) -> zipfile.ZipFile:
    """A ZipFile over `f`, once its central directory is known to be at most MAX_ZIP_DIRECTORY_BYTES and
    `max_members` entries (zipfile parses the whole directory into objects before anything can be checked)."""
    try:
        entries, size = _central_directory(f)
        if size > MAX_ZIP_DIRECTORY_BYTES or entries > max_members:
            raise error(f"{where} declares {entries:,} members in a {size_text(size)} directory, over the caps "
                        f"({max_members:,} members, {size_text(MAX_ZIP_DIRECTORY_BYTES)}){_tail(hint)}")
        archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error) as exc:
        raise error(f"{where} is not a readable zip archive ({_first_line(exc)}){_tail(hint)}") from None
    if len(archive.infolist()) > max_members:  # the directory's count may lie; the parsed entries do not
        archive.close()
        raise error(f"{where} holds more than {max_members:,} members{_tail(hint)}")
    return archive


def check_member_sizes(
    infos: Sequence[zipfile.ZipInfo], *, where: object, error: type[EdgeRnnError], hint: str, max_member_bytes: int,
    max_total_bytes: int,
) -> None:
    """Refuse, before reading any, a member declaring more than `max_member_bytes` once inflated, or members
    declaring more than `max_total_bytes` together."""
    for info in infos:
        if info.file_size > max_member_bytes:
            raise error(f"{where}: member {info.filename!r} declares {size_text(info.file_size)} once inflated "
                        f"({size_text(info.compress_size)} stored), over the {size_text(max_member_bytes)} cap{_tail(hint)}")
    total = sum(info.file_size for info in infos)
    if total > max_total_bytes:
        raise error(f"{where}: its members declare {size_text(total)} once inflated, over the {size_text(max_total_bytes)} cap{_tail(hint)}")


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, *, max_bytes: int, where: object,
                error: type[EdgeRnnError], hint: str) -> bytes:
    """One member's bytes, its declared size checked against `max_bytes` and the read limited to it."""
    check_member_sizes([info], where=where, error=error, hint=hint, max_member_bytes=max_bytes, max_total_bytes=max_bytes)
    try:
        with archive.open(info) as member:
            return member.read(max_bytes)  # zipfile stops at the declared size, checked above
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, ValueError) as exc:
        raise error(f"{where}: cannot read member {info.filename!r} ({_first_line(exc)}){_tail(hint)}") from None


def stored_start(raw: IO[bytes], info: zipfile.ZipInfo, *, where: str, error: type[EdgeRnnError], hint: str) -> int:
    """Where an uncompressed member's bytes start in the archive: after its local header's name and extra field."""
    raw.seek(info.header_offset)
    local = raw.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise error(f"{where}: broken zip entry{_tail(hint)}")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_length + extra_length


def _mapped(path: Path, start: int, header: ArrayHeader, *, where: str, error: type[EdgeRnnError], end: int, hint: str) -> np.ndarray:
    """A read-only memory map of the array whose .npy starts at `start` of `path` and must end exactly at `end`."""
    check_declared(header, holds=end - start, where=where, error=error, max_bytes=None, hint=hint)
    if header.nbytes == 0:
        return np.zeros(header.shape, header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=start + header.offset, shape=header.shape,
                     order="F" if header.fortran else "C")


def npy_mapped(path: str | os.PathLike[str], *, what: str, error: type[EdgeRnnError] = DataError, hint: str = "") -> np.ndarray:
    """A .npy file memory-mapped read-only after its header is checked against the file: memory stays flat in its size."""
    path = Path(path)
    with open_regular(path, what=what, error=error, hint=hint) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            header = read_npy_header(f, where=str(path), error=error)
            return _mapped(path, 0, header, where=str(path), error=error, end=size, hint=hint)
        except (ValueError, OSError, EOFError) as exc:
            raise error(f"cannot read {path} as a .npy array ({_first_line(exc)}){_tail(hint or 'save it with numpy.save')}") from None


def read_npz(
    source: str | os.PathLike[str] | bytes,
    *,
    where: str,
    what: str = ".npz file",
    error: type[EdgeRnnError] = DataError,
    hint: str = "save it with np.savez",
    keys: Sequence[str] | None = None,
    mmap: bool = False,
    flat_names: bool = False,
    max_members: int = MAX_NPZ_MEMBERS,
    max_array_bytes: int = MAX_ARRAY_BYTES,
    max_total_bytes: int = MAX_ARRAYS_BYTES,
) -> dict[str, np.ndarray]:
    """The arrays of an .npz (a path, or its bytes), by name; only `keys` when given (the others are not read).

    Every member must be a numeric .npy whose header matches its declared size. Members read into memory are
    capped one by one (`max_array_bytes`) and together (`max_total_bytes`) by their declared sizes before any is
    read. With `mmap` (a path only), uncompressed members are memory-mapped instead, so their size does not count.
    `flat_names` refuses members inside folders (`a/b.npy`).
    """
    path = None if isinstance(source, (bytes, bytearray, memoryview)) else Path(source)
    if path is not None:
        raw: IO[bytes] = open_regular(path, what=what, error=error, hint=hint)
    else:
        raw = io.BytesIO(source)
    arrays: dict[str, np.ndarray] = {}
    with raw, open_zip(raw, where=where, error=error, hint=hint, max_members=max_members) as archive:
        chosen = []
        for info in archive.infolist():
            if not info.filename.endswith(".npy") or (flat_names and "/" in info.filename):
                raise error(f"{where} holds {info.filename!r}, not an .npy member{_tail(hint)}")
            name = info.filename[: -len(".npy")]
            if keys is None or name in keys:
                chosen.append((name, info))
        mapped = {name for name, info in chosen if mmap and path is not None and info.compress_type == zipfile.ZIP_STORED}
        check_member_sizes([info for name, info in chosen if name not in mapped], where=where, error=error,
                           hint="save smaller arrays, or uncompressed (np.savez) where they are memory-mapped" if mmap else hint,
                           max_member_bytes=max_array_bytes, max_total_bytes=max_total_bytes)
        for name, info in chosen:
            at = f"{where}: {name}"
            try:
                if name in mapped:
                    start = stored_start(raw, info, where=at, error=error, hint=hint)
                    end = start + info.file_size
                    if end > os.fstat(raw.fileno()).st_size:
                        raise error(f"{at} declares {info.file_size:,} bytes beyond the end of the file — truncated{_tail(hint)}")
                    raw.seek(start)
                    arrays[name] = _mapped(path, start, read_npy_header(raw, where=at, error=error, hint=hint), where=at,
                                           error=error, end=end, hint=hint)
                else:
                    with archive.open(info) as member:
                        header = read_npy_header(member, where=at, error=error, hint=hint)
                        check_declared(header, holds=info.file_size, where=at, error=error, max_bytes=max_array_bytes, hint=hint)
                        arrays[name] = read_array(member, header, where=at, error=error)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, struct.error, zlib.error, NotImplementedError) as exc:
                raise error(f"cannot read {at} ({_first_line(exc)}){_tail(hint)}") from None
    return arrays
