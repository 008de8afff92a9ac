"""Issue 25 item 9, the pure part: what the agent's log sink makes of control characters and huge values."""

from __future__ import annotations

import io
import logging
import time

import pytest
from loguru import logger

from flannel_ebpf.logs import (
    MALFORMED_EVERY,
    MESSAGE_LIMIT,
    VALUE_LIMIT,
    InterceptHandler,
    add_safe_sink,
    clip,
    printable,
)
from flannel_ebpf.subnet.lease import LeaseFormatError, parse_subnet_key

CONTROLS = ["\n", "\r", "\t", "\x00", "\x1b", "\x7f", "\x85", "\x9b", "\u2028", "\u2029", "\u202e", "\udc80"]


@pytest.mark.parametrize("char", CONTROLS, ids=[f"U+{ord(c):04X}" for c in CONTROLS])
def test_each_control_character_is_escaped(char):
    shown = printable(f"10.5.1.0-24{char}FORGED")
    assert char not in shown
    assert shown.startswith("10.5.1.0-24\\") and shown.endswith("FORGED")


def test_printable_text_is_kept_as_it_is():
    text = "lease 10.5.1.0/24 of 192.168.50.9 {braces} é 日本 'quotes' \\ backslash"
    assert printable(text) == text


def test_clip_cuts_a_value_and_says_how_much_was_cut():
    assert clip("short") == "short"
    shown = clip("k" * 1_000_000)
    assert shown == "k" * VALUE_LIMIT + f"…(+{1_000_000 - VALUE_LIMIT} chars)"
    assert clip("a\nb") == "a\\nb"


@pytest.fixture
def safe_log():
    """What a safe sink (the agent's, on stderr) writes, here into a buffer."""
    out = io.StringIO()
    sink = add_safe_sink(out, "DEBUG")
    try:
        yield out
    finally:
        logger.remove(sink)


def test_a_record_is_one_line_whatever_its_arguments_hold(safe_log):
    logger.info("GET {} from {}", "/v1/_/leases/10.5.1.0-24\nFORGED line\r\x1b[2K\u2028", "10.0.0.1")
    lines = safe_log.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith("INFO    GET /v1/_/leases/10.5.1.0-24\\nFORGED line\\r\\x1b[2K\\u2028 from 10.0.0.1")


def test_a_huge_message_is_cut_in_the_middle_keeping_both_ends(safe_log):
    logger.warning("ignoring invalid lease {}: the end", "x" * 2_000_000)
    (line,) = safe_log.getvalue().splitlines()
    assert len(line) < MESSAGE_LIMIT + 100
    assert "ignoring invalid lease xxx" in line and line.endswith("xxx: the end") and "chars cut)…" in line


def test_a_traceback_keeps_its_frames_and_escapes_the_exception_texts(safe_log):
    try:
        try:
            raise KeyError("10.5.1.0-24\nFORGED inner")
        except KeyError as e:
            raise ValueError("bad lease\nFORGED outer") from e
    except ValueError:
        logger.exception("watch failed")
    lines = safe_log.getvalue().splitlines()
    assert not [line for line in lines if line.startswith("FORGED")], lines
    assert lines[0].endswith("ERROR   watch failed")
    assert lines.count("Traceback (most recent call last):") == 2
    assert any(line.startswith('  File "') and "test_logs.py" in line for line in lines)
    assert "KeyError: '10.5.1.0-24\\nFORGED inner'" in lines  # KeyError shows a repr: escaped already
    assert "ValueError: bad lease\\nFORGED outer" in lines
    assert "The above exception was the direct cause of the following exception:" in lines


def test_a_hostile_lease_key_makes_a_short_error():
    with pytest.raises(LeaseFormatError) as info:
        parse_subnet_key("10.5.1.0-24&" + "y" * 1_000_000)
    assert len(str(info.value)) < 2 * VALUE_LIMIT


@pytest.fixture
def stdlib_into_safe_log(safe_log):
    """Python's logging routed as configure_logging routes it, into the safe sink of `safe_log`."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    handler = InterceptHandler()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    try:
        yield safe_log, handler
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def test_stdlib_records_go_through_the_safe_sink(stdlib_into_safe_log):
    out, _ = stdlib_into_safe_log
    logging.getLogger("somelib").warning("value %s", "a\nFORGED\x1b[2J")
    logging.getLogger("somelib").info("below WARNING: not shown")
    try:
        raise RuntimeError("bad\nthing")
    except RuntimeError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    text = out.getvalue()
    assert "WARNING somelib: value a\\nFORGED\\x1b[2J" in text and "not shown" not in text
    # a genuine error (not a malformed request) keeps its traceback, its text escaped
    assert "ERROR   aiohttp.server: Error handling request" in text and "Traceback" in text
    assert "RuntimeError: bad\\nthing" in text


def test_malformed_requests_reported_by_aiohttp_are_one_counted_line(stdlib_into_safe_log, monkeypatch):
    from aiohttp.http_exceptions import BadStatusLine

    out, handler = stdlib_into_safe_log
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    for n in range(200):
        try:
            raise BadStatusLine(f"X{n}\x1b[2J")
        except BadStatusLine:
            logging.getLogger("aiohttp.server").exception("Error handling request")
    clock[0] += MALFORMED_EVERY
    handler.malformed.flush()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "Traceback" not in out.getvalue(), lines
    assert "malformed HTTP requests (answered 400): 1 (the latest: BadStatusLine" in lines[0]
    assert "malformed HTTP requests (answered 400): 199 in the last 60 s" in lines[1] and "\\x1b[2J" in lines[1]
