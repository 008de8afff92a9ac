"""Connection limits for the HTTP servers: the lease server of `up --listen` and the agent's /healthz.

aiohttp has no limit on connections and no deadline for a request to arrive (its keep-alive timer runs
only after a first response), so one host opening connections that trickle header bytes would hold a file
descriptor each until the process has none left. `GuardedListener` accepts connections itself and:
- caps the connections open at once, and those from one source address (`ConnectionLimits.per_source`);
  at a cap, a new connection replaces the one (of that source, at its cap) that has waited longest for
  the client: for its request, or idle since its last answer (a keep-alive connection); never one whose
  request is being answered. Else the new connection is closed at once;
- gives every request `request_seconds` to arrive in full (line, headers, body), counted from the
  accept (a new connection) or from its first byte (keep-alive), never reset by further bytes;
- gives a TLS handshake `handshake_seconds`;
- reads no more from a connection with more than MAX_UNANSWERED requests begun and not yet answered
  (pipelining), and cuts a connection whose client does not read its answers for `request_seconds`;
- counts what it cut or refused and says so in at most one line per `log_every` seconds.
`quiet_connection_errors` does the same for the connection errors asyncio reports to its loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from flannel_ebpf.logs import CountedLine

#: accept() failing for want of file descriptors or memory: wait, and make room, rather than give up
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_ACCEPT_RETRY_SECONDS = 0.1
_ACCEPT_BATCH = 64
#: a burst of connects waits in the kernel's queue, not dropped (a dropped SYN costs the client 1 s, then 3 s)
LISTEN_BACKLOG = 1024


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    request_seconds: float = 5.0  # a whole request (line, headers, body) must arrive within this
    keepalive_seconds: float = 30.0  # an idle keep-alive connection is closed after this (aiohttp's timer)
    handshake_seconds: float = 10.0  # TLS handshake
    log_every: float = 10.0  # at most one line per this many seconds about cut or refused connections
    max_per_source: int = 0  # connections from one source address; 0: max_connections // 8, at least 4

    @property
    def per_source(self) -> int:
        return self.max_per_source or max(4, self.max_connections // 8)


#: requests a connection may have begun and not yet had answered before it is read no further
MAX_UNANSWERED = 4


_HEAD_END = re.compile(rb"\r?\n\r?\n")
_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:[ \t]*(\d{1,18})[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
_CHUNKED = re.compile(rb"^transfer-encoding[ \t]*:[^\n]*chunked", re.IGNORECASE | re.MULTILINE)
_CHUNK_SIZE = re.compile(rb"[ \t]*([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r?")
#: a chunk-size or trailer line longer than this ends nothing (aiohttp refuses it; the deadline cuts it)
MAX_CHUNK_LINE = 4096
#: a longer head is refused by aiohttp's parser anyway; the framing stops buffering it (the deadline cuts it)
MAX_HEAD_BYTES = 64 * 1024


class RequestFraming:
    """Where HTTP/1.x requests begin and end in a connection's byte stream: enough to time them, not to
    parse them (aiohttp does that). A chunked body is followed chunk by chunk (size line, data, line end,
    until the zero-size chunk and its trailers end): the bytes of a chunk's data never end the request. A
    malformed one never ends by our count (the deadline cuts it, if aiohttp has not refused it first)."""

    def __init__(self) -> None:
        # idle | head | body | chunk-size | chunk-data | chunk-end | trailer | malformed
        self._state = "idle"
        self._head = bytearray()
        self._line = bytearray()  # a chunk-size, chunk-end or trailer line so far
        self._body_left = 0

    @property
    def in_request(self) -> bool:
        return self._state != "idle"

    @property
    def in_head(self) -> bool:
        return self._state == "head"

    def feed(self, data: bytes) -> int:
        """Follow `data`; returns how many requests began in it."""
        began = 0
        view = memoryview(data)
        while len(view):
            if self._state == "idle":
                self._state, began = "head", began + 1
                self._head.clear()
            if self._state == "head":
                old = len(self._head)
                if old >= MAX_HEAD_BYTES:
                    return began  # too long for aiohttp's parser anyway; the deadline cuts it
                self._head += view[: MAX_HEAD_BYTES - old]
                end = _HEAD_END.search(self._head, max(0, old - 3))
                if end is None:
                    return began
                view = view[end.end() - old :]  # what follows the head in this chunk: its body, or more
                head = bytes(self._head[: end.start()])
                length = _CONTENT_LENGTH.search(head)
                if _CHUNKED.search(head):
                    self._state = "chunk-size"
                    self._line.clear()
                elif length and int(length.group(1)) > 0:
                    self._state, self._body_left = "body", int(length.group(1))
                else:
                    self._state = "idle"
            elif self._state in ("body", "chunk-data"):
                taken = min(self._body_left, len(view))
                self._body_left -= taken
                view = view[taken:]
                if not self._body_left:
                    self._state = "idle" if self._state == "body" else "chunk-end"
            elif self._state == "malformed":
                return began
            else:  # a line of the chunked framing
                newline = bytes(view[: MAX_CHUNK_LINE + 1]).find(b"\n")
                if newline < 0:
                    self._line += view[: MAX_CHUNK_LINE + 1]
                    if len(self._line) > MAX_CHUNK_LINE:
                        self._state = "malformed"
                    return began
                self._line += view[:newline]
                view = view[newline + 1 :]
                self._end_of_line(bytes(self._line[: MAX_CHUNK_LINE + 1]))
                self._line.clear()
        return began

    def _end_of_line(self, line: bytes) -> None:
        if len(line) > MAX_CHUNK_LINE:
            self._state = "malformed"
        elif self._state == "chunk-size":
            size = _CHUNK_SIZE.fullmatch(line)
            if size is None:
                self._state = "malformed"
            elif int(size.group(1), 16) == 0:
                self._state = "trailer"
            else:
                self._state, self._body_left = "chunk-data", int(size.group(1), 16)
        elif self._state == "chunk-end":
            self._state = "chunk-size" if line in (b"", b"\r") else "malformed"
        elif line in (b"", b"\r"):  # trailer: the empty line ends the request
            self._state = "idle"


class _Connection:
    """One accepted connection, from accept to close."""

    __slots__ = ("source", "task", "transport", "waiting_since")

    def __init__(self, now: float, source: str) -> None:
        self.source = source
        #: waiting for the client since then: for (the rest of) a request, or idle after its last answer;
        #: None while a request of it is being answered
        self.waiting_since: float | None = now
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Future[Any] | None = None

    def cut(self) -> None:
        self.waiting_since = None  # cut once: its descriptor is closed within this loop iteration
        if self.transport is not None:
            self.transport.abort()  # no lingering, no TLS close_notify: the descriptor is free at once
        elif self.task is not None:
            self.task.cancel()  # still in the TLS handshake: asyncio closes the socket


class AnswerHook(AbstractAccessLogger):
    """aiohttp's access log, called once each answer is written (or failed to be): tells the connection's
    guard that a request was answered. Pass ANSWER_HOOK to web.Server/AppRunner (GuardedListener checks)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        transport = request.transport
        protocol = transport.get_protocol() if transport is not None else None
        if isinstance(protocol, _GuardedProtocol):
            protocol.answered()


#: web.Server's / web.AppRunner's keyword arguments for a server behind GuardedListener (no access log)
ANSWER_HOOK: dict[str, Any] = {"access_log": logging.getLogger("flannel_ebpf.http"), "access_log_class": AnswerHook}


class _GuardedProtocol(asyncio.Protocol):
    """Wraps aiohttp's protocol of one connection: times the requests, and makes aiohttp's protocol (a
    task per connection) only once the first request's head is in, so that a slow client costs little."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], listener: GuardedListener, conn: _Connection) -> None:
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._held = bytearray()  # the first head, until it is complete
        self._transport: asyncio.BaseTransport | None = None
        self._listener = listener
        self._conn = conn
        self._framing = RequestFraming()
        self._deadline: asyncio.TimerHandle | None = None
        self._write_deadline: asyncio.TimerHandle | None = None
        self._unanswered = 0  # requests begun and not answered yet
        self._reading_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._conn.transport = transport  # type: ignore[assignment]
        self._transport = transport
        self._arm()  # the first request, counted from now (the handshake had its own deadline)

    def data_received(self, data: bytes) -> None:
        began = self._framing.feed(data)
        self._unanswered += began
        if not self._framing.in_request:
            self._disarm()
            self._conn.waiting_since = time.monotonic() if not self._unanswered else None
        elif began and self._deadline is None:
            self._arm()
        if self._unanswered > MAX_UNANSWERED and not self._reading_paused and self._transport is not None:
            self._reading_paused = True  # pipelined requests wait in the kernel, not in our memory
            self._transport.pause_reading()  # type: ignore[attr-defined]
        if self._inner is None:
            self._held += data
            if self._framing.in_head and len(self._held) <= MAX_HEAD_BYTES:
                return
            data, self._held = bytes(self._held), bytearray()
            self._inner = self._factory()
            self._inner.connection_made(self._transport)  # type: ignore[arg-type]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def answered(self) -> None:
        self._unanswered = max(0, self._unanswered - 1)
        if self._reading_paused and self._unanswered <= MAX_UNANSWERED and self._transport is not None:
            self._reading_paused = False
            with contextlib.suppress(RuntimeError, AttributeError):  # closing meanwhile
                self._transport.resume_reading()  # type: ignore[attr-defined]
        if not self._unanswered and not self._framing.in_request and self._conn.waiting_since is None:
            self._conn.waiting_since = time.monotonic()  # idle: may make room for a new connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._disarm_write()
        self._listener._forget(self._conn)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._write_deadline is None:  # the client must take some of its answers within the deadline
            loop = asyncio.get_running_loop()
            self._write_deadline = loop.call_later(self._listener.limits.request_seconds, self._not_reading)
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._disarm_write()
        if self._inner is not None:
            self._inner.resume_writing()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._conn.waiting_since = time.monotonic()
        self._deadline = loop.call_later(self._listener.limits.request_seconds, self._too_slow)

    def _disarm(self) -> None:
        self._conn.waiting_since = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _disarm_write(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _not_reading(self) -> None:
        self._write_deadline = None
        seconds = self._listener.limits.request_seconds
        self._listener.events.add(f"cut (the client took none of its answers for {seconds:g} s)")
        self._listener._forget(self._conn)
        self._conn.cut()

    def _too_slow(self) -> None:
        self._deadline = None
        self._listener.events.add(f"cut (no complete request within {self._listener.limits.request_seconds:g} s)")
        self._listener._forget(self._conn)
        self._conn.cut()


class GuardedListener:
    """Accepts connections on `sock` for aiohttp's `protocol_factory` (a web.Server) within `limits`."""

    def __init__(
        self,
        protocol_factory: Callable[[], asyncio.Protocol],
        sock: socket.socket,
        limits: ConnectionLimits,
        name: str,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        kwargs = getattr(protocol_factory, "_kwargs", None)  # web.Server's: its protocols' settings
        if isinstance(kwargs, dict) and kwargs.get("access_log_class") is not AnswerHook:
            raise ValueError("a web.Server behind GuardedListener needs **ANSWER_HOOK (to know an answer is done)")
        self._factory = protocol_factory
        self._sock = sock
        self._ssl = ssl_context
        self.limits = limits
        self.events = CountedLine(
            f"{name} (at most {limits.max_connections} connections)", limits.log_every, gather_burst=True
        )
        self._conns: set[_Connection] = set()
        self._by_source: dict[str, set[_Connection]] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def connections(self) -> int:
        return len(self._conns)

    def start(self) -> None:
        self._sock.setblocking(False)
        self._task = asyncio.ensure_future(self._accept_loop())

    async def close(self) -> None:
        """Stop accepting (the socket is closed); the connections are aiohttp's to shut down."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._sock.close()
        for conn in list(self._conns):
            if conn.waiting_since is not None:
                conn.cut()  # no request being answered (aiohttp's shutdown closes the others)
        self.events.flush()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(self._sock)
            except OSError as e:
                if e.errno in _OUT_OF_RESOURCES:
                    self.events.add(f"accepts failed ({errno.errorcode.get(e.errno or 0, e.errno)})")
                    self._evict()  # make room for the next try, if a slow client holds any
                    await asyncio.sleep(_ACCEPT_RETRY_SECONDS)
                continue  # ECONNABORTED and the like: that client gave up before we accepted it
            self._admit(sock, peer)
            # More may wait in the backlog: take them now, without a round trip through the loop each
            for _ in range(_ACCEPT_BATCH):
                try:
                    sock, peer = self._sock.accept()
                except OSError:
                    break  # BlockingIOError: none left; anything else: the next sock_accept meets it
                self._admit(sock, peer)
            # sock_accept returns without yielding while the backlog holds more: let the loop close what
            # was cut and start what was admitted, or cut sockets pile up until accept meets EMFILE
            await asyncio.sleep(0)

    def _evict(self, among: set[_Connection] | None = None) -> bool:
        """Cut the connection (of `among`, else of the address holding the most) that has waited longest
        for its client: for its request, or idle since its last answer. None whose request is being
        answered. Taking from the biggest holder keeps a flood from one address off everyone else's."""
        waiting = [c for c in (self._conns if among is None else among) if c.waiting_since is not None]
        if not waiting:
            return False
        victim = min(waiting, key=lambda c: (-len(self._by_source.get(c.source, ())), c.waiting_since or 0.0))
        self._forget(victim)  # its slot is free now, not when asyncio gets round to connection_lost
        victim.cut()
        return True

    def _admit(self, sock: socket.socket, peer: Any) -> None:
        source = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        same_source = self._by_source.get(source)
        if same_source is not None and len(same_source) >= self.limits.per_source:
            if self._evict(same_source):
                self.events.add("waiting connections replaced by new ones of the same address")
            else:
                self.events.add(f"refused (an address with {self.limits.per_source} connections being answered)")
                sock.close()
                return
        if len(self._conns) >= self.limits.max_connections:
            if self._evict():
                self.events.add("slow or idle connections replaced by new ones")
            else:
                self.events.add("refused (every connection is being answered)")
                sock.close()
                return
        conn = _Connection(time.monotonic(), source)
        self._conns.add(conn)
        self._by_source.setdefault(source, set()).add(conn)
        conn.task = asyncio.ensure_future(self._establish(sock, conn))
        conn.task.add_done_callback(lambda task: self._never_established(task, sock, conn))

    def _never_established(self, task: asyncio.Future[Any], sock: socket.socket, conn: _Connection) -> None:
        """A connection cut before its task ever ran (a burst of accepts, each replacing an older one in the
        same loop iteration): the coroutine never started, so nothing else closes its socket."""
        if task.cancelled() and conn.transport is None:
            self._forget(conn)
            sock.close()

    async def _establish(self, sock: socket.socket, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        try:
            await loop.connect_accepted_socket(
                lambda: _GuardedProtocol(self._factory, self, conn),
                sock,
                ssl=self._ssl,
                ssl_handshake_timeout=self.limits.handshake_seconds if self._ssl else None,
            )
        except asyncio.CancelledError:
            self._forget(conn)
            sock.close()
        except (OSError, EOFError):  # ssl.SSLError is an OSError: a failed handshake, a reset
            if conn.transport is None:
                self.events.add("failed TLS handshakes")
            self._forget(conn)
            sock.close()
        finally:
            conn.task = None

    def _forget(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        same_source = self._by_source.get(conn.source)
        if same_source is not None:
            same_source.discard(conn)
            if not same_source:
                del self._by_source[conn.source]


def quiet_connection_errors(loop: asyncio.AbstractEventLoop, what: str, every: float = 10.0) -> CountedLine:
    """Route the loop's reports of connection errors (an OSError: a reset, a broken pipe, a failed
    handshake, no file descriptor left) to one counted line per `every` seconds instead of a traceback
    each; anything else still goes to asyncio's default handler."""
    events = CountedLine(f"{what}: connection errors", every, gather_burst=True)

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError):
            events.add(f"{type(exc).__name__} ({context.get('message', '')})")
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)
    return events


#: an answer: (status, body, content type); a route gets the request's Accept header (None: none sent)
Answer = tuple[int, str | bytes, str]
Route = Callable[[str | None], Answer]
PLAIN_TEXT = "text/plain; charset=utf-8"


class ThreadedHttpServer:
    """A small GET/HEAD server in a thread of its own with an event loop of its own, within `limits`: it
    answers even while the caller's event loop is busy, and a flood of connections costs one thread and
    at most `limits.max_connections` descriptors. `routes` maps a path to a function making the answer
    (called in the server's thread); anything else is 404, as flanneld's mux answers."""

    def __init__(self, host: str, port: int, routes: dict[str, Route], limits: ConnectionLimits, name: str) -> None:
        self.routes = routes
        self.limits = limits
        self.name = name
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, port))
            self._sock.listen(LISTEN_BACKLOG)
        except OSError:
            self._sock.close()
            raise
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._started.wait(10)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="method not allowed\n", headers={"Allow": "GET, HEAD"})
        make = self.routes.get(request.path)
        status, body, content_type = (
            make(request.headers.get("Accept")) if make else (404, "404 page not found\n", PLAIN_TEXT)
        )
        payload = body.encode() if isinstance(body, str) else body
        return web.Response(status=status, body=payload, headers={"Content-Type": content_type})

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop, self._stop = loop, asyncio.Event()
        quiet_connection_errors(loop, self.name, self.limits.log_every)
        server = web.Server(self._handle, keepalive_timeout=self.limits.keepalive_seconds, **ANSWER_HOOK)
        listener = GuardedListener(server, self._sock, self.limits, self.name)
        listener.start()
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            await listener.close()
            await server.shutdown(1.0)
