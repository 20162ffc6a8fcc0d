"""Reading what provision did not write just now (an old report, a record a host sends back) within
bounds: a regular file only, never more than a cap, JSON nested no deeper than a limit and holding
only finite numbers. Each refusal is a ValueError whose text says what was wrong, for the caller to
put beside the file's name; nothing here raises anything else for hostile content.

The host programs (remote/) read the host's files with the same rules in their own words: each is
sent alone, standard library only."""

from __future__ import annotations

import json
import os
import re
import stat
from typing import Any

JSON_DEPTH = 64             # a report nests 6 deep, a snapshot 7: 64 is room, and far from recursion
REPORT_CAP = 64 << 20       # a report.json of 10 000 hosts is about 60 MiB

# Strings first (a bracket inside one is text), then each bracket on its own.
_TOKENS = re.compile(r'"(?:[^"\\]+|\\.)*"|[\[\]{}]', re.S)


def read_regular(path: str | os.PathLike[str], cap: int) -> bytes:
    """The bytes of a regular file of at most `cap` bytes. Opened without blocking, so a FIFO
    never hangs the open; a device, a FIFO, a socket or a folder (behind a link too) is refused by
    what the open file is, not by its name; a file that grows past `cap` while read is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise ValueError(err.strerror or str(err)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"not a regular file ({_kind(st.st_mode)})")
        if st.st_size > cap:
            raise ValueError(f"{st.st_size} bytes, more than the {cap} this reads")
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 20, cap + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                raise ValueError(f"grew past the {cap} bytes this reads while it was read")
        return b"".join(chunks)
    except OSError as err:
        raise ValueError(err.strerror or str(err)) from None
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


def depth(text: str) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings not counted)."""
    deepest = level = 0
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            level += 1
            deepest = max(deepest, level)
        elif token in "]}":
            level -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:20]} is beyond a float")
    return value


def loads(data: bytes | str, max_depth: int = JSON_DEPTH) -> Any:
    """JSON from untrusted bytes: UTF-8, nested at most `max_depth`, no NaN or ±Infinity (which
    Python's json accepts and JSON does not)."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 ({err.reason} at byte {err.start})") from None
    if (deepest := depth(text)) > max_depth:
        raise ValueError(f"nested {deepest} deep, more than {max_depth}")
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:          # not reached past the depth check; kept so it can never escape
        raise ValueError(f"nested more than {max_depth} deep") from None
    except ValueError as err:
        raise ValueError(f"not JSON ({err})") from None


def load_file(path: str | os.PathLike[str], cap: int, max_depth: int = JSON_DEPTH) -> Any:
    """`loads(read_regular(path, cap))`."""
    return loads(read_regular(path, cap), max_depth)
