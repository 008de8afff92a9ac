"""JSON from outside the process (etcd values, the network config, the lease server's wire) read with a
size and a nesting limit, so that a hostile value costs a bounded amount of memory and never a
RecursionError. Pure code."""

from __future__ import annotations

import json
import re
from typing import Any

#: The deepest JSON nesting accepted in a lease value or the network config (flannel's are 2 or 3 deep).
MAX_JSON_DEPTH = 16


def json_too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `text` nests arrays/objects deeper than `limit`, decided without parsing it (parsing a
    few thousand levels raises RecursionError). Brackets inside strings do not count."""
    if text.count("[") + text.count("{") <= limit:  # the common case, 10,000 times per listing: cheap
        return False
    depth = 0
    in_string = escaped = False
    for ch in re.sub(r'[^\[\]{}"\\]', "", text):  # only what matters for nesting
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def load_bounded_json(raw: bytes | str, what: str, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads with a size and a nesting limit; ValueError (one line) on anything else."""
    size = len(raw) if isinstance(raw, bytes | bytearray) else len(raw.encode(errors="replace"))
    if size > max_bytes:
        raise ValueError(f"{what} is {size} bytes, more than the {max_bytes} accepted")
    try:
        text = raw.decode() if isinstance(raw, bytes | bytearray) else raw
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not UTF-8: {e}") from None
    if json_too_deep(text, max_depth):
        raise ValueError(f"{what} nests JSON deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except RecursionError:  # belt and braces: json_too_deep should have caught it
        raise ValueError(f"{what} nests JSON too deep") from None
    except ValueError as e:
        raise ValueError(f"{what} is not valid JSON: {e}") from None
