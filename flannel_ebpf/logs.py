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

Libraries log through Python's `logging` (aiohttp, asyncio, gRPC): `configure_logging` sends their records
(WARNING and up) to the same sink, and counts aiohttp's report of each malformed HTTP request (a traceback
each, caused by anybody who can connect) into one line per MALFORMED_EVERY seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import time
import traceback
from collections import Counter
from typing import Any, TextIO, cast

from loguru import logger

VALUE_LIMIT = 300
MESSAGE_LIMIT = 4096
MALFORMED_EVERY = 60.0
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


class CountedLine:
    """One WARNING line per `every` seconds about events anybody can cause, counted by kind: the first
    after a quiet period is said at once, the ones after it counted and said when the period ends (or with
    the next one, outside an event loop). With `gather_burst`, "at once" is the event loop's next turn, so
    that a burst within one turn (a flood of accepts) is one line. `latest`: the text of the latest event,
    said at the end of the line."""

    def __init__(self, what: str, every: float, gather_burst: bool = False) -> None:
        self.what = what
        self.every = every
        self.gather_burst = gather_burst
        self.totals: Counter[str] = Counter()  # since the start, by kind
        self.lines = 0
        self._pending: Counter[str] = Counter()
        self._latest = ""
        self._last = -float("inf")
        self._timer: asyncio.TimerHandle | None = None

    @property
    def total(self) -> int:
        return sum(self.totals.values())

    def add(self, kind: str = "", count: int = 1, latest: str = "") -> None:
        self.totals[kind] += count
        self._pending[kind] += count
        if latest:
            self._latest = latest
        wait = self._last + self.every - time.monotonic()
        if wait <= 0 and not self.gather_burst:
            self.flush()
        elif self._timer is None:
            with contextlib.suppress(RuntimeError):  # no running loop: said with the next one
                self._timer = asyncio.get_running_loop().call_later(max(0.0, wait), self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        now = time.monotonic()
        since = "" if self._last == -float("inf") else f" in the last {now - self._last:.0f} s"
        counts = ", ".join(f"{n} {kind}" if kind else str(n) for kind, n in self._pending.items())
        latest = f" (the latest: {clip(self._latest)})" if self._latest else ""
        logger.warning("{}: {}{}{}", self.what, counts, since, latest)
        self._pending.clear()
        self._last = now
        self.lines += 1


def _is_malformed_request(record: logging.LogRecord) -> bool:
    """aiohttp's server reporting a request it could not parse (it answers it 400 itself)."""
    if record.name != "aiohttp.server" or not record.exc_info or record.exc_info[1] is None:
        return False
    try:
        from aiohttp.http_exceptions import HttpProcessingError
    except ImportError:
        return False
    return isinstance(record.exc_info[1], HttpProcessingError)


class InterceptHandler(logging.Handler):
    """Python's logging into loguru (so into the safe sink): one record, one escaped line, its traceback's
    exception texts escaped too. aiohttp's malformed requests become one counted line per period."""

    def __init__(self) -> None:
        super().__init__()
        self.malformed = CountedLine("malformed HTTP requests (answered 400)", MALFORMED_EVERY)

    def emit(self, record: logging.LogRecord) -> None:
        if _is_malformed_request(record):
            error = record.exc_info[1] if record.exc_info else None
            self.malformed.add(latest=f"{type(error).__name__}: {error}")
            return
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(exception=record.exc_info or None).log(level, "{}: {}", record.name, record.getMessage())


class _CurrentStderr:
    """Whatever sys.stderr is when a line is written (not when logging was set up): code that swaps it,
    as a test runner's capture does, never leaves the sink writing to a closed stream."""

    def write(self, text: str) -> None:
        sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str) -> None:
    """The only sink: safe lines to stderr (the agent's, the lease server's and the helpers' log); Python's
    logging goes there too, from WARNING up (as its own last-resort handler printed them)."""
    logger.remove()
    add_safe_sink(cast(TextIO, _CurrentStderr()), level)
    logging.basicConfig(handlers=[InterceptHandler()], level=logging.WARNING, force=True)
