"""User files: reading UTF-8 text (an optional BOM, errors that name the byte), and write errors
that name the path (a full disk reads the same whether it gives ENOSPC or EFBIG)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from .config import ConfigError

_BOM = b"\xef\xbb\xbf"  # editors on Windows write it; json.loads and csv would choke on U+FEFF
# No space left, a quota, or RLIMIT_FSIZE (EFBIG): all mean "this file does not fit".
_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def read_utf8(path: Path, error: type[Exception] = ConfigError) -> str:
    """The text of a UTF-8 file, a leading BOM dropped.

    Bytes that are not UTF-8 raise `error` naming the file, the byte's offset from the start of the
    file and its line (a text-mode read would report an offset inside its own read buffer).
    """
    raw = path.read_bytes()
    skip = len(_BOM) if raw.startswith(_BOM) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = skip + err.start
        line = raw.count(b"\n", 0, offset) + 1
        raise error(
            f"{path}: not UTF-8 text: byte 0x{raw[offset]:02x} at byte offset {offset} (line {line}): "
            f"{err.reason}; save the file as UTF-8"
        ) from None


class WriteError(OSError):
    """An OSError whose filename is the path being written and whose text says why, plainly."""

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def write_error(err: OSError, path: str | os.PathLike) -> WriteError:
    if isinstance(err, WriteError):
        return err
    reason = "no space left on device (or the file size limit was reached)" if err.errno in _FULL else (
        err.strerror or str(err))
    return WriteError(err.errno, f"cannot write: {reason}", str(err.filename or path))


@contextlib.contextmanager
def writing(path: str | os.PathLike, name_this: bool = False) -> Iterator[None]:
    """Re-raise an OSError of the block as a WriteError naming the file it names, else `path`.

    name_this: always name `path` (a directory written through a temp dir names the final one,
    not the temp file that no longer exists).
    """
    try:
        yield
    except OSError as err:
        err = write_error(err, path)
        raise (WriteError(err.errno, err.strerror, str(path)) if name_this else err) from None


def describe_os_error(err: OSError) -> str:
    """One line for the command line: the path first, then the reason, no errno noise."""
    if isinstance(err, WriteError) or not err.filename:
        return str(err)
    return f"{err.filename}: {err.strerror}"
