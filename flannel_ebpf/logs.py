"""Log output that input from the network or etcd can neither forge nor flood.

A lease key, an HTTP path or an error text quoting one is anybody's bytes: a newline in it would start a
forged log line, and a 1 MB key would make a 1 MB line. loguru formats a message before any patcher or
sink sees it, so a call's arguments are gone by then. Hence two layers:

- the sinks made here (`add_safe_sink`, `configure_logging`) escape every control character of the whole
  message (C0, DEL, C1, U+2028/2029, bidi overrides, lone surrogates) and cut a message longer than
  MESSAGE_LIMIT in its middle: whatever code logs, one record is one line of bounded size. Multi-line texts
  the agent writes itself (the eBPF verifier's log inside an error) become one line with `\\n` in it: the
  price of a rule without exceptions. Only a logged traceback's frames (our own code) keep their lines;
  its exception texts are escaped like a message;
- `clip()` cuts one value from the network or etcd to VALUE_LIMIT characters where it is logged or put into
  an error text, so that the rest of the line stays readable.
"""

from __future__ import annotations

import re
import sys
import traceback
from typing import Any, TextIO

from loguru import logger

VALUE_LIMIT = 300
MESSAGE_LIMIT = 4096
LINE_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {extra[_safe_message]}\n"

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def printable(text: str) -> str:
    """`text` with every control character written as an escape (`\\n`, `\\x1b`, `\\u2028`)."""
    return _UNSAFE.sub(_escape, text)


def clip(value: object, limit: int = VALUE_LIMIT) -> str:
    """str(value) escaped and cut to `limit` characters, saying how many more there were."""
    text = printable(str(value))
    return text if len(text) <= limit else f"{text[:limit]}…(+{len(text) - limit} chars)"


def safe_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """A message as one line of at most about `limit` characters: its start and its end (where an error
    usually says what went wrong) are kept."""
    text = printable(text)
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}…({len(text) - 2 * half} chars cut)…{text[-half:]}"


def traceback_text(error: BaseException) -> str:
    """The traceback Python would print, with each exception's own text on one escaped, bounded line."""
    chain: list[tuple[BaseException, str]] = []  # (exception, what links it to the one printed after it)
    seen: set[int] = set()
    current: BaseException | None = error
    link = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, "The above exception was the direct cause of the following exception:"
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, "During handling of the above exception, another exception occurred:"
        else:
            current = None
    parts: list[str] = []
    for i, (exc, _) in enumerate(reversed(chain)):
        if i:
            parts.append(f"\n{chain[len(chain) - i][1]}\n\n")
        if exc.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(traceback.format_tb(exc.__traceback__))
        parts.append(safe_line("".join(traceback.format_exception_only(type(exc), exc)).rstrip("\n")) + "\n")
    return "".join(parts)


def _format(record: Any) -> str:
    """loguru format function: the message escaped and bounded (stored in the record's extra for the
    format string, so that nothing in it is parsed as a format field)."""
    extra = record["extra"]
    extra["_safe_message"] = safe_line(record["message"])
    exception = record["exception"]
    if exception is None or exception.value is None:
        return LINE_FORMAT
    extra["_safe_traceback"] = traceback_text(exception.value)
    return LINE_FORMAT + "{extra[_safe_traceback]}"


def add_safe_sink(sink: TextIO, level: str) -> int:
    """A loguru sink writing escaped, bounded lines to `sink`; returns its id."""
    return logger.add(sink, level=level, format=_format, backtrace=False, diagnose=False)


def configure_logging(level: str) -> None:
    """The only sink: safe lines to stderr (the agent's, the lease server's and the helpers' log)."""
    logger.remove()
    add_safe_sink(sys.stderr, level)
