"""Framed, counted message channel between client and server.

Every message is serialized bytes.  A frame is::

    b"PIEV" | version (1 byte) | body length (8 bytes, big endian) | SHA-256(body) (32 bytes) | body
    body = meta length (4 bytes) | meta (UTF-8 JSON: kind, label, blob lengths, ...) | blob_0 | blob_1 | ...

The hash is an integrity check against truncation and corruption, not a MAC: the threat model is semi-honest
(see pi_eval/README.md), so nobody forges frames, but a damaged frame must fail loudly on the receiving side.

The :class:`Channel` sits on the client side and owns the only way to talk to the server: ``exchange`` sends one
uplink frame and returns the server's downlink frame.  One exchange in the online phase is one round trip; it is
attributed to the label of the downlink message (the operation the server needs the client for).  Bytes are the
full frame lengths on the wire, per direction and per label.  Setup traffic (the public context) is counted apart.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import struct
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

MAGIC = b"PIEV"
VERSION = 1
HEADER = struct.Struct(">4sBQ32s")  # magic, version, body length, sha256
MAX_BODY = 1 << 34


class ChannelError(RuntimeError):
    """A frame could not be decoded (truncated, tampered, malformed)."""


class TruncatedMessageError(ChannelError):
    pass


class TamperedMessageError(ChannelError):
    pass


class RemoteError(RuntimeError):
    """The other party reported an error instead of a result."""


@dataclass
class Message:
    kind: str  # "setup", "setup_ack", "data", "result", "error", "stats", "bye"
    label: str
    meta: dict = field(default_factory=dict)
    blobs: list[bytes] = field(default_factory=list)

    def encode(self) -> bytes:
        meta = dict(self.meta)
        meta["kind"], meta["label"], meta["blob_lengths"] = self.kind, self.label, [len(b) for b in self.blobs]
        mj = json.dumps(meta, sort_keys=True).encode()
        body = b"".join([struct.pack(">I", len(mj)), mj, *self.blobs])
        return HEADER.pack(MAGIC, VERSION, len(body), hashlib.sha256(body).digest()) + body

    @classmethod
    def decode(cls, frame: bytes, *, receiver: str = "receiver") -> Message:
        if len(frame) < HEADER.size:
            raise TruncatedMessageError(
                f"{receiver}: truncated message: {len(frame)} bytes received, the header alone is {HEADER.size}"
            )
        magic, version, n, digest = HEADER.unpack_from(frame)
        if magic != MAGIC or version != VERSION:
            raise ChannelError(f"{receiver}: not a pi_eval frame (magic={magic!r}, version={version})")
        body = frame[HEADER.size :]
        if len(body) < n:
            raise TruncatedMessageError(
                f"{receiver}: truncated message: header announces {n} body bytes, only {len(body)} arrived"
            )
        if len(body) > n:
            raise TamperedMessageError(f"{receiver}: message has {len(body) - n} trailing bytes beyond its length")
        got = hashlib.sha256(body).digest()
        if got != digest:
            raise TamperedMessageError(
                f"{receiver}: message failed its integrity check (SHA-256 {got.hex()[:16]}... != header "
                f"{digest.hex()[:16]}...): it was corrupted or tampered with in transit"
            )
        (mlen,) = struct.unpack_from(">I", body)
        meta = json.loads(body[4 : 4 + mlen])
        off, blobs = 4 + mlen, []
        for ln in meta.pop("blob_lengths"):
            blobs.append(bytes(body[off : off + ln]))
            off += ln
        kind, label = meta.pop("kind"), meta.pop("label")
        return cls(kind, label, meta, blobs)


def frame_length(header: bytes) -> int:
    magic, version, n, _ = HEADER.unpack(header)
    if magic != MAGIC or version != VERSION:
        raise ChannelError(f"not a pi_eval frame (magic={magic!r}, version={version})")
    if n > MAX_BODY:
        raise ChannelError(f"frame announces {n} bytes, above the {MAX_BODY} limit")
    return n


# --------------------------------------------------------------------------------------------------- transports
Tamper = Callable[[str, int, bytes], bytes]  # (direction "up"/"down", message index, frame) -> frame


class InProcessTransport:
    """Calls the server's frame handler directly; frames are still bytes, exactly as on a socket."""

    name = "inprocess"

    def __init__(self, handler: Callable[[bytes], bytes], tamper: Tamper | None = None):
        self.handler, self.tamper, self._n = handler, tamper, 0

    def roundtrip(self, frame: bytes) -> bytes:
        i = self._n
        self._n += 1
        if self.tamper:
            frame = self.tamper("up", i, frame)
        reply = self.handler(frame)
        if self.tamper:
            reply = self.tamper("down", i, reply)
        return reply

    def close(self) -> None:
        pass


def recv_frame(sock: socket.socket, who: str) -> bytes:
    header = _recv_exact(sock, HEADER.size, who, None)
    if header is None:
        return b""
    n = frame_length(header)
    body = _recv_exact(sock, n, who, n)
    return header + body


def _recv_exact(sock: socket.socket, n: int, who: str, announced: int | None) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        c = sock.recv(min(n - got, 1 << 20))
        if not c:
            if announced is None and got == 0:
                return None  # clean close between frames
            what = f"header announces {announced} body bytes" if announced is not None else "incomplete header"
            raise TruncatedMessageError(f"{who}: truncated message: {what}, connection closed after {got}")
        chunks.append(c)
        got += len(c)
    return b"".join(chunks)


class TcpTransport:
    """Client side of a TCP connection to a server process on localhost."""

    name = "tcp"

    def __init__(self, host: str, port: int, tamper: Tamper | None = None, timeout: float = 600.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tamper, self._n = tamper, 0

    def roundtrip(self, frame: bytes) -> bytes:
        i = self._n
        self._n += 1
        if self.tamper:
            frame = self.tamper("up", i, frame)
        self.sock.sendall(frame)
        if self.tamper and len(frame) < HEADER.size + frame_length(frame[: HEADER.size]):
            self.sock.shutdown(socket.SHUT_WR)  # a truncated frame: the server sees EOF mid-frame
        reply = recv_frame(self.sock, "client")
        if not reply:
            raise TruncatedMessageError("client: server closed the connection without replying")
        if self.tamper:
            reply = self.tamper("down", i, reply)
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# --------------------------------------------------------------------------------------------------- channel
@dataclass
class LabelStats:
    bytes_up: int = 0
    bytes_down: int = 0
    msgs_up: int = 0
    msgs_down: int = 0
    cts_up: int = 0
    cts_down: int = 0
    round_trips: int = 0


class Channel:
    """Client-side endpoint: every byte between the parties passes through :meth:`exchange` and is counted."""

    def __init__(self, transport):
        self.transport = transport
        self.setup = LabelStats()
        self.control = LabelStats()  # end-of-run stats request; not part of the protocol's cost
        self.online: dict[str, LabelStats] = defaultdict(LabelStats)
        self.comm_time = 0.0

    def exchange(self, msg: Message, *, bucket: str = "online") -> Message:
        up = msg.encode()
        t0 = time.perf_counter()
        down = self.transport.roundtrip(up)
        self.comm_time += time.perf_counter() - t0
        reply = Message.decode(down, receiver="client")
        if reply.kind == "error":
            raise RemoteError(f"server aborted at {msg.label!r}: {reply.meta.get('error')}")
        if bucket == "online":
            s_up, s_dn = self.online[msg.label], self.online[reply.label]
        else:
            s_up = s_dn = self.setup if bucket == "setup" else self.control
        s_up.bytes_up += len(up)
        s_up.msgs_up += 1
        s_up.cts_up += len(msg.blobs) if msg.kind == "data" else 0
        s_dn.bytes_down += len(down)
        s_dn.msgs_down += 1
        s_dn.cts_down += len(reply.blobs) if reply.kind in ("data", "result") else 0
        s_dn.round_trips += 1
        return reply

    def wire_bytes(self) -> int:
        """Every byte that crossed the channel, all buckets, both directions."""
        t = self.totals()
        return (
            t["bytes_up"]
            + t["bytes_down"]
            + self.setup.bytes_up
            + self.setup.bytes_down
            + self.control.bytes_up
            + self.control.bytes_down
        )

    def totals(self) -> dict:
        t = LabelStats()
        for s in self.online.values():
            for k in t.__dict__:
                setattr(t, k, getattr(t, k) + getattr(s, k))
        return dict(t.__dict__)

    def close(self) -> None:
        self.transport.close()
