"""The connections of a serve replica's HTTP endpoint, bounded: uvicorn's HTTP/1.1 protocol (h11), with
a limit on how long a connection may wait for a request's head, on how many connections are open, and
on how long a client may leave its response unread.

uvicorn times a connection out only between two requests (keep-alive), and then from the first byte of
the next one on: a client that connected and sent nothing, or part of a head (slowloris), held its
connection for ever, and a flood of them spent the process's file descriptors (the GPU runtime, the
metrics endpoint, every file open failed). Its ``limit_concurrency`` answers 503 once the open
connections reach it, idle ones included, so a flood of idle connections turned /health and /metrics
away too. Here a connection waiting for a request's head, the first or a keep-alive one's next, is
closed after ``head_seconds``; past ``max_connections``, the one that has waited longest for a head is
closed to make room (it has no request in flight: nothing is lost), so a probe or a client that sends
its request at once is still served under the flood. Connections with a request under way are bounded
elsewhere: admission (429 past the queue), the body's 30 s and 1 MiB, the request's timeout.

A request's body is bounded here too, on the wire, whether the app reads it or not: h11 parses a chunked
body chunk by chunk on the event loop (5 us a chunk), so a 1 MiB body in chunks of one byte held it 5.6 s
of CPU (in 64 KiB chunks, 0.01 s), and a body that the app answered without reading (/health) was read
and dropped for as long as its client sent it. A body comes in at most ``MAX_BODY_PIECES`` pieces and
twice the largest body the app reads, in bytes on the wire (the rest for chunk framing and extensions:
a chunk's header may carry 16 KiB of them, which h11 parses and drops); past either, 413 and the
connection is closed. A request that declares both a Content-Length and a Transfer-Encoding is refused
and its connection closed, as RFC 9112 asks (h11 read it as chunked and kept the connection: request
smuggling, behind a proxy that reads its Content-Length).
"""

from __future__ import annotations

import asyncio
import http
from typing import Any

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE  # uvicorn's own default, imported alike
from uvicorn.protocols.http.h11_impl import H11Protocol

from conveyor.inference.openai_requests import MAX_BODY_BYTES, ApiError

# How long a connection may wait for a request's head: uvicorn's keep-alive timeout, also before the
# first request. A client sends its head as soon as it connects.
HEAD_SECONDS = 5.0
# How long a connection may have output waiting that its client reads none of (its socket full, the
# transport's buffer past its high-water mark): a slow client still reads some within it.
SEND_SECONDS = 30.0
# The connections open at most, whatever the replica's lanes: clients keep idle pooled connections, and
# each costs a file descriptor and ~20 KB.
MIN_CONNECTIONS = 1024
# The pieces (chunks, or what one read of the socket brought) a request's body may come in: 0.1 s of
# parsing at most. A client sends its body in chunks of kilobytes (httpx: what its iterator yields), and
# a 1 MiB body within this needs 64 bytes a piece; a JSON encoder's pieces (iterencode) of a prompt of
# 4,096 token ids are 8,200.
MAX_BODY_PIECES = 16384


def max_connections(admitted: int, descriptors: int) -> int:
    """For a replica that admits ``admitted`` requests (its lanes and queue): 8 connections each (requests
    being read, refused, pooled), at least ``MIN_CONNECTIONS``, at most half the process's file
    descriptor limit ``descriptors`` (the rest: the model's files, the GPU runtime, NCCL)."""
    wanted = max(MIN_CONNECTIONS, 8 * admitted)
    return wanted if descriptors < 0 else max(1, min(wanted, descriptors // 2))  # < 0: no limit


# What of uvicorn's h11 protocol the bounds build on: not its public API, so a uvicorn that has changed
# them serves with its own protocol (unbounded, as before these bounds) and says so, rather than failing
USES = (
    "_unset_keepalive_if_required",
    "timeout_keep_alive_handler",
    "handle_events",
    "on_response_complete",
    "send_400_response",
)


class BoundedConnection(h11.Connection):
    """h11's server side, with a request's body bounded in pieces and in bytes on the wire, and a request
    that declares both a Content-Length and a Transfer-Encoding refused: ``next_event`` raises
    ``RemoteProtocolError`` (uvicorn's protocol answers it, then closes), and ``refusal`` holds the
    answer's status and message."""

    def __init__(self, max_incomplete_event_size: int | None, max_body_bytes: int):
        super().__init__(h11.SERVER, max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE)
        self.max_body_bytes = max_body_bytes
        self.pieces = self.wire_bytes = 0  # of the body of the request under way
        self.refusal: tuple[int, str] | None = None

    def receive_data(self, data: bytes) -> None:
        self.wire_bytes += len(data)
        super().receive_data(data)

    def next_event(self) -> Any:
        event = super().next_event()
        if isinstance(event, h11.Request):
            self.pieces = self.wire_bytes = 0  # less what came with the head: a bound, not a count
            names = {name for name, _ in event.headers}
            if {b"content-length", b"transfer-encoding"} <= names:
                # h11 reads the body as chunked and keeps the connection; a proxy in front that reads it by
                # its Content-Length sees another request in what follows (request smuggling). RFC 9112
                # 6.1: the server may refuse it and must close the connection
                self.refusal = (
                    400,
                    "the request has both Content-Length and Transfer-Encoding; send one of them",
                )
        elif isinstance(event, h11.Data):
            self.pieces += 1
            if self.pieces > MAX_BODY_PIECES:
                self.refusal = (
                    413,
                    f"the body came in over {MAX_BODY_PIECES} pieces (chunks); send it in fewer, larger ones",
                )
            elif self.wire_bytes > 2 * self.max_body_bytes:
                self.refusal = (
                    413,
                    f"the body took over {2 * self.max_body_bytes} bytes on the wire (with its chunks' "
                    f"framing); at most {self.max_body_bytes} bytes of body are read",
                )
        if self.refusal is not None:
            raise h11.RemoteProtocolError(self.refusal[1], error_status_hint=self.refusal[0])
        return event


def bounded_h11(
    max_open: int,
    head_seconds: float = HEAD_SECONDS,
    send_seconds: float = SEND_SECONDS,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> type[asyncio.Protocol] | str:
    """uvicorn's h11 protocol with these bounds (``uvicorn.Config(http=...)``); one class per server, as
    the connections waiting for a head are the server's. "h11" (uvicorn's own) where it lacks ``USES``.
    ``max_body_bytes``: the largest body the app reads."""
    missing = [name for name in USES if not hasattr(H11Protocol, name)]
    if missing:
        from conveyor.log import get_logger

        get_logger(__name__).warning(
            "this uvicorn's h11 protocol has no " + ", ".join(missing) + ": connections are not bounded"
        )
        return "h11"

    class BoundedH11(H11Protocol):
        # the connections waiting for a request's head, longest-waiting first (dicts keep their order)
        waiting: dict[BoundedH11, None] = {}
        stalled: asyncio.TimerHandle | None = None  # aborts a connection whose client reads nothing

        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            self.conn = BoundedConnection(config.h11_max_incomplete_event_size, max_body_bytes)

        def _wait_for_head(self) -> None:
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(head_seconds, self.timeout_keep_alive_handler)
            self.waiting[self] = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._wait_for_head()
            if len(self.connections) > max_open:
                # one closed for one opened: a closed one leaves ``connections`` only on the loop's next
                # turn. This one, if every other has a request under way
                oldest = next(iter(self.waiting))
                oldest.timeout_keep_alive_handler()
                oldest._unset_keepalive_if_required()

        def data_received(self, data: bytes) -> None:
            # uvicorn's, less its stopping the timer at the first byte: it stops once a whole head has
            # come (handle_events, on h11's Request event)
            self.conn.receive_data(data)
            self.handle_events()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.timeout_keep_alive_task is not None:  # kept alive: waits for its next request's head
                self.waiting[self] = None

        def _unset_keepalive_if_required(self) -> None:
            super()._unset_keepalive_if_required()
            self.waiting.pop(self, None)

        def pause_writing(self) -> None:
            # the client reads nothing: a stream it asked for and never reads waited for it for ever, as
            # asyncio's close() waits for the output to be sent. Cut, its response's sending ends (the
            # client is gone), and so does its request if still generating
            super().pause_writing()
            self.stalled = self.loop.call_later(send_seconds, self.transport.abort)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self.stalled is not None:
                self.stalled.cancel()

        def send_400_response(self, msg: str) -> None:
            # uvicorn's answer to a request h11 cannot read (a malformed chunk), or ours to a body past its
            # bounds. Once a response has begun (/health answers before its body is read) no other can be
            # sent: the connection is closed (uvicorn's raised h11's LocalProtocolError instead)
            conn = self.conn
            assert isinstance(conn, BoundedConnection)
            if conn.our_state is not h11.SEND_RESPONSE:
                self.transport.close()
            elif conn.refusal is None:
                super().send_400_response(msg)
            else:
                status, message = conn.refusal
                kind = "too_large" if status == 413 else "invalid_request_error"
                body = bytes(ApiError(status, message, kind=kind).response().body)
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ]
                reason = http.HTTPStatus(status).phrase.encode()
                response = h11.Response(status_code=status, headers=headers, reason=reason)
                for event in (response, h11.Data(data=body), h11.EndOfMessage()):
                    self.transport.write(conn.send(event) or b"")
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            self._unset_keepalive_if_required()
            if self.stalled is not None:
                self.stalled.cancel()

    return BoundedH11
