"""The few bpf(2) commands the agent needs, called directly (no bcc, no libbpf).

Used for the pinned maps (both loaders), program loads whose flags bcc cannot pass (XDP multi-buffer),
program queries (status, teardown) and BPF_PROG_TEST_RUN (kernel probes, tests). x86-64 only for now
(syscall 321); the attribute layouts are those of linux/bpf.h.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_SYSCALL_BPF = {"x86_64": 321, "aarch64": 280}

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15

BPF_ANY = 0
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_XDP = 6
BPF_F_XDP_HAS_FRAGS = 1 << 5  # the program handles multi-buffer frames (section "xdp.frags")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf(2) call failed; errno and the command are kept."""


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    nr = _SYSCALL_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(errno.ENOSYS, f"bpf(2): unsupported architecture {platform.machine()}")
    ret: int = _libc.syscall(nr, cmd, attr, len(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf({what}): {os.strerror(err)}")
    return ret


def _attr(size: int = 128) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(size)


def _addr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


def obj_get(path: str | Path) -> int:
    """Open a pinned object; returns a new fd (close it with os.close)."""
    attr = _attr()
    cpath = ctypes.create_string_buffer(os.fsencode(str(path)))
    struct.pack_into("=QII", attr, 0, _addr(cpath), 0, 0)
    return _bpf(BPF_OBJ_GET, attr, f"OBJ_GET {path}")


def prog_load(prog_type: int, insns: bytes, name: str, *, license: str = "GPL", prog_flags: int = 0) -> int:
    """BPF_PROG_LOAD; returns the program fd. On a refusal the call is repeated with the verifier's log
    on, and the error carries the log (what an operator needs to see)."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())

    def attempt(log_size: int) -> int:
        log = ctypes.create_string_buffer(log_size) if log_size else None
        attr = _attr()
        struct.pack_into("=IIQQIIQII", attr, 0, prog_type, len(insns) // 8, _addr(code), _addr(lic),
                         1 if log else 0, log_size, _addr(log) if log else 0, 0, prog_flags)  # fmt: skip
        struct.pack_into("16s", attr, 48, name.encode()[:15])
        try:
            return _bpf(BPF_PROG_LOAD, attr, f"PROG_LOAD {name}")
        except BpfError as e:
            if log is None:
                raise
            raise BpfError(e.errno, f"{e.strerror}\n{log.value.decode(errors='replace').strip()}") from None

    try:
        return attempt(0)
    except BpfError:
        return attempt(1 << 20)


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int, name: str) -> int:
    """BPF_MAP_CREATE; returns the map fd. `name` is the kernel's name for it (15 characters kept)."""
    attr = _attr()
    struct.pack_into("=IIIIIII", attr, 0, map_type, key_size, value_size, max_entries, flags, 0, 0)
    struct.pack_into("16s", attr, 28, name.encode()[:15])
    return _bpf(BPF_MAP_CREATE, attr, f"MAP_CREATE {name}")


def obj_pin(fd: int, path: str | Path) -> None:
    attr = _attr()
    cpath = ctypes.create_string_buffer(os.fsencode(str(path)))
    struct.pack_into("=QII", attr, 0, _addr(cpath), fd, 0)
    _bpf(BPF_OBJ_PIN, attr, f"OBJ_PIN {path}")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    attr = _attr()
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    struct.pack_into("=IIQQQ", attr, 0, fd, 0, _addr(k), _addr(v), 0)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, attr, "MAP_LOOKUP_ELEM")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    attr = _attr()
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    struct.pack_into("=IIQQQ", attr, 0, fd, 0, _addr(k), _addr(v), flags)
    _bpf(BPF_MAP_UPDATE_ELEM, attr, "MAP_UPDATE_ELEM")


def map_delete(fd: int, key: bytes) -> bool:
    """False when the key was not there."""
    attr = _attr()
    k = ctypes.create_string_buffer(key, len(key))
    struct.pack_into("=IIQ", attr, 0, fd, 0, _addr(k))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, attr, "MAP_DELETE_ELEM")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Every key of a map (a NULL start key asks for the first one)."""
    attr = _attr()
    nxt = ctypes.create_string_buffer(key_size)
    cur: ctypes.Array[ctypes.c_char] | None = None
    while True:
        struct.pack_into("=IIQQ", attr, 0, fd, 0, _addr(cur) if cur is not None else 0, _addr(nxt))
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, attr, "MAP_GET_NEXT_KEY")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return
            raise
        yield nxt.raw
        cur = ctypes.create_string_buffer(nxt.raw, key_size)


@dataclass(frozen=True)
class MapInfo:
    map_type: int
    map_id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


@dataclass(frozen=True)
class ProgInfo:
    prog_type: int
    prog_id: int
    name: str


def _info(fd: int, size: int = 256) -> bytes:
    attr = _attr()
    info = ctypes.create_string_buffer(size)
    struct.pack_into("=IIQ", attr, 0, fd, size, _addr(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "OBJ_GET_INFO_BY_FD")
    return info.raw


def map_info(fd: int) -> MapInfo:
    raw = _info(fd)
    mtype, mid, ksz, vsz, maxe, flags = struct.unpack_from("=IIIIII", raw, 0)
    name = raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
    return MapInfo(mtype, mid, ksz, vsz, maxe, flags, name)


def prog_info(fd: int) -> ProgInfo:
    raw = _info(fd)
    ptype, pid = struct.unpack_from("=II", raw, 0)
    name = raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    return ProgInfo(ptype, pid, name)


def prog_fd_by_id(prog_id: int) -> int:
    attr = _attr()
    struct.pack_into("=I", attr, 0, prog_id)
    return _bpf(BPF_PROG_GET_FD_BY_ID, attr, f"PROG_GET_FD_BY_ID {prog_id}")


def prog_info_by_id(prog_id: int) -> ProgInfo | None:
    try:
        fd = prog_fd_by_id(prog_id)
    except BpfError:
        return None
    try:
        return prog_info(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class TestRunResult:
    retval: int
    data: bytes


def prog_test_run(prog_fd: int, packet: bytes, ctx: bytes | None = None, out_size: int = 4096) -> TestRunResult:
    """BPF_PROG_TEST_RUN: run a program once on `packet` (and an optional `struct __sk_buff` ctx)."""
    attr = _attr()
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(out_size)
    ctx_buf = ctypes.create_string_buffer(ctx, len(ctx)) if ctx else None
    struct.pack_into(
        "=IIIIQQIIIIQQ",
        attr,
        0,
        prog_fd,
        0,
        len(packet),
        out_size,
        _addr(data_in),
        _addr(data_out),
        1,  # repeat
        0,  # duration (out)
        len(ctx) if ctx else 0,
        0,
        _addr(ctx_buf) if ctx_buf is not None else 0,
        0,
    )
    _bpf(BPF_PROG_TEST_RUN, attr, "PROG_TEST_RUN")
    retval, size_out = struct.unpack_from("=I", attr, 4)[0], struct.unpack_from("=I", attr, 12)[0]
    return TestRunResult(retval=retval, data=data_out.raw[:size_out])


def possible_cpus() -> int:
    """Number of slots in a per-CPU map value (the kernel's possible CPUs, e.g. `0-3` -> 4)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count
