"""Framed, authenticated, counted message channel between client and server.

Every message is serialized bytes.  A frame is::

    b"PIEV" | version (1 byte) | body length (8 bytes, big endian) | tag (32 bytes) | body
    body = meta length (4 bytes) | meta (UTF-8 JSON: kind, label, blob lengths, ...) | blob_0 | blob_1 | ...
    tag  = HMAC-SHA256(key, "pi_eval/2" | sender ("C"/"S") | sequence number (8 bytes) | magic..length | body)

**Authentication.**  With a pre-shared key (at least 32 bytes, from ``secrets`` or a key file) the tag is an HMAC
(stdlib :mod:`hmac`): a peer without the key cannot produce a frame the other side accepts.  The first exchange
(``hello`` / ``hello_ack``) is tagged with the pre-shared key and carries a fresh 32-byte nonce from each side; every
later frame is tagged with the session key ``HMAC-SHA256(psk, "pi_eval/2 session" | nonce_c | nonce_s)``.  The
sequence number (implicit, counted by both sides) and the sender byte make a frame valid only at its own position
and direction in its own session: replayed, reordered, reflected or spliced frames are refused.  Without a key (the
in-process transport of the tests) the tag is a plain SHA-256 over the same input: a **checksum**, which detects
corruption only (anyone can recompute it); frames have the same size either way.

**Limits.**  Every read is bounded: the body length is checked against the receiver's current limit (the largest
legitimate frame at that point of the protocol, :mod:`pi_eval.limits`) from the header, before any body byte is
read, and the whole frame must arrive within a deadline.  Errors cross the wire as a short code and message
(:func:`error_message`), never a traceback.

The :class:`Channel` sits on the client side and owns the only way to talk to the server: ``exchange`` sends one
uplink frame and returns the server's downlink frame.  One exchange in the online phase is one round trip; it is
attributed to the label of the downlink message (the operation the server needs the client for).  Bytes are the
full frame lengths on the wire, per direction and per label.  Setup traffic (hello and the public context) is
counted apart.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import socket
import struct
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

MAGIC = b"PIEV"
VERSION = 2
HEADER = struct.Struct(">4sBQ32s")  # magic, version, body length, tag
TAG_DOMAIN = b"pi_eval/2"
MIN_KEY_BYTES = 32
HELLO_LIMIT = 1 << 20  # the first frame of a connection: the hello (request + schedule digests)
ERROR_TEXT_MAX = 400  # characters of an error message sent to the peer


class ChannelError(RuntimeError):
    """A frame could not be accepted.  ``code`` is what the peer is told."""

    code = "channel"


class TruncatedMessageError(ChannelError):
    code = "truncated"


class CorruptedMessageError(ChannelError):
    """The frame's checksum does not match: it was corrupted in transit (no key: nothing stronger is claimed)."""

    code = "corrupted"


class AuthenticationError(ChannelError):
    """The frame's HMAC does not verify: wrong key, or corrupted, forged, replayed or reordered."""

    code = "auth"


class FrameTooLargeError(ChannelError):
    code = "too_large"


class FrameTimeoutError(ChannelError):
    code = "timeout"


class MalformedMessageError(ChannelError):
    code = "malformed"


class RemoteError(RuntimeError):
    """The other party reported an error (``code``: a short word, see :func:`error_message`)."""

    def __init__(self, code: str, message: str, who: str = "server"):
        self.code, self.remote_message = code, message
        super().__init__(f"{who} refused [{code}]: {message}")


def check_key(key: bytes | None) -> bytes | None:
    """A pre-shared key must have at least 32 bytes (256 bits)."""
    if key is not None and len(key) < MIN_KEY_BYTES:
        raise ValueError(f"pre-shared key has {len(key)} bytes; at least {MIN_KEY_BYTES} are required")
    return key


@dataclass
class Message:
    kind: str  # "hello", "hello_ack", "setup", "setup_ack", "data", "result", "error", "stats"
    label: str
    meta: dict = field(default_factory=dict)
    blobs: list[bytes] = field(default_factory=list)

    def body(self) -> bytes:
        meta = dict(self.meta)
        meta["kind"], meta["label"], meta["blob_lengths"] = self.kind, self.label, [len(b) for b in self.blobs]
        mj = json.dumps(meta, sort_keys=True).encode()
        return b"".join([struct.pack(">I", len(mj)), mj, *self.blobs])

    @classmethod
    def from_body(cls, body, *, receiver: str = "receiver") -> Message:
        """Parse a body whose tag has been verified; any inconsistency is a :class:`MalformedMessageError`."""
        bad = f"{receiver}: malformed message"
        if len(body) < 4:
            raise MalformedMessageError(f"{bad}: body of {len(body)} bytes has no meta length")
        (mlen,) = struct.unpack_from(">I", body)
        if mlen > len(body) - 4:
            raise MalformedMessageError(f"{bad}: meta length {mlen} exceeds the body ({len(body) - 4} bytes left)")
        try:
            meta = json.loads(bytes(body[4 : 4 + mlen]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MalformedMessageError(f"{bad}: meta is not UTF-8 JSON ({e.__class__.__name__})") from None
        if (
            not isinstance(meta, dict)
            or not isinstance(meta.get("kind"), str)
            or not isinstance(meta.get("label"), str)
        ):
            raise MalformedMessageError(f"{bad}: meta must be an object with string 'kind' and 'label'")
        lengths = meta.pop("blob_lengths", None)
        if not isinstance(lengths, list) or not all(isinstance(n, int) and n >= 0 for n in lengths):
            raise MalformedMessageError(f"{bad}: 'blob_lengths' must be a list of non-negative integers")
        if 4 + mlen + sum(lengths) != len(body):
            raise MalformedMessageError(
                f"{bad}: blobs announce {sum(lengths)} bytes, the body holds {len(body) - 4 - mlen} after the meta"
            )
        view, off, blobs = memoryview(body), 4 + mlen, []
        for n in lengths:
            blobs.append(bytes(view[off : off + n]))
            off += n
        return cls(meta.pop("kind"), meta.pop("label"), meta, blobs)


def error_message(code: str, text: str) -> Message:
    """What a party sends when it refuses something: a short code and a one-line message, never a traceback."""
    text = " ".join(str(text).split())
    if len(text) > ERROR_TEXT_MAX:
        text = text[: ERROR_TEXT_MAX - 3] + "..."
    return Message("error", "error", {"code": code, "error": text})


def announced_length(header: bytes, who: str = "receiver") -> int:
    """Body length a header announces (magic and version checked)."""
    if len(header) < HEADER.size:
        raise TruncatedMessageError(f"{who}: truncated frame: {len(header)} bytes, the header alone is {HEADER.size}")
    magic, version, n, _ = HEADER.unpack_from(header)
    if magic != MAGIC or version != VERSION:
        raise MalformedMessageError(
            f"{who}: not a pi_eval frame (magic={magic!r}, version={version}; expected {MAGIC!r}, {VERSION})"
        )
    return n


def check_length(n: int, limit: int, who: str, phase: str = "") -> int:
    if n > limit:
        raise FrameTooLargeError(
            f"{who}: frame announces {n} body bytes, above the {limit}-byte limit"
            + (f" for {phase}" if phase else "")
            + " (the largest legitimate frame at this point); nothing of it was read"
        )
    return n


class FrameCodec:
    """One party's end of the framing: tags (HMAC with a key, SHA-256 checksum without), sequence numbers, limits."""

    def __init__(self, role: str, key: bytes | None = None):
        if role not in ("client", "server"):
            raise ValueError(f"role must be 'client' or 'server', got {role!r}")
        self.role = role
        self.psk = self.key = check_key(key)
        self.send_seq = self.recv_seq = 0
        self.recv_limit = HELLO_LIMIT
        self.phase = "the hello"

    @property
    def authenticated(self) -> bool:
        return self.key is not None

    def _tag(self, sender: str, seq: int, head: bytes, body) -> bytes:
        prefix = TAG_DOMAIN + sender.encode() + struct.pack(">Q", seq) + head
        h = hashlib.sha256(prefix) if self.key is None else hmac.new(self.key, prefix, hashlib.sha256)
        h.update(body)
        return h.digest()

    def seal(self, msg: Message) -> bytes:
        body = msg.body()
        head = struct.pack(">4sBQ", MAGIC, VERSION, len(body))
        tag = self._tag("C" if self.role == "client" else "S", self.send_seq, head, body)
        self.send_seq += 1
        return head + tag + body

    def open(self, frame) -> Message:
        """Verify and parse one complete frame received from the peer."""
        who = self.role
        n = check_length(announced_length(frame, who), self.recv_limit, who, self.phase)
        got = len(frame) - HEADER.size
        if got < n:
            raise TruncatedMessageError(f"{who}: truncated frame: header announces {n} body bytes, {got} arrived")
        if got > n:
            raise MalformedMessageError(f"{who}: frame has {got - n} bytes beyond its announced length")
        view = memoryview(frame)
        tag = bytes(view[HEADER.size - 32 : HEADER.size])
        want = self._tag(
            "S" if self.role == "client" else "C", self.recv_seq, bytes(view[: HEADER.size - 32]), view[HEADER.size :]
        )
        if not hmac.compare_digest(tag, want):
            if self.key is None:
                raise CorruptedMessageError(
                    f"{who}: frame {self.recv_seq} failed its SHA-256 checksum: corrupted in transit "
                    "(unkeyed checksum: it detects corruption, it does not authenticate the sender)"
                )
            raise AuthenticationError(
                f"{who}: frame {self.recv_seq} failed HMAC-SHA256 authentication: the peer does not hold the same "
                "key, or the frame was corrupted, forged, replayed or reordered"
            )
        self.recv_seq += 1
        return Message.from_body(view[HEADER.size :], receiver=who)

    def rekey(self, nonce_c: bytes, nonce_s: bytes) -> None:
        """Switch to the session key after the hello exchange (no-op without a pre-shared key)."""
        if self.psk is not None:
            self.key = hmac.new(self.psk, TAG_DOMAIN + b" session" + nonce_c + nonce_s, hashlib.sha256).digest()


# --------------------------------------------------------------------------------------------------- sockets
def _recv_into(sock: socket.socket, buf: memoryview, deadline: float, timeout: float, who: str, what: str) -> int:
    """Fill ``buf`` from ``sock`` before ``deadline``; returns the bytes read (short only on a clean close)."""
    got = 0
    while got < len(buf):
        left = deadline - time.monotonic()
        if left <= 0:
            raise FrameTimeoutError(f"{who}: no complete {what} within {timeout:g} s ({got} of {len(buf)} bytes)")
        sock.settimeout(left)
        try:
            n = sock.recv_into(buf[got:], min(len(buf) - got, 1 << 20))
        except TimeoutError:
            raise FrameTimeoutError(
                f"{who}: no complete {what} within {timeout:g} s ({got} of {len(buf)} bytes)"
            ) from None
        except ConnectionError as e:
            raise TruncatedMessageError(f"{who}: connection lost during a {what} ({e.__class__.__name__})") from None
        if n == 0:
            return got
        got += n
    return got


def read_frame(sock: socket.socket, *, limit: int, timeout: float, who: str, phase: str = "") -> bytearray | None:
    """One frame from ``sock``; None on a clean close between frames.

    The body length is checked against ``limit`` from the header before any body byte is read (memory stays below
    the limit), and the whole frame must arrive within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    header = bytearray(HEADER.size)
    got = _recv_into(sock, memoryview(header), deadline, timeout, who, "frame header")
    if got == 0:
        return None
    if got < HEADER.size:
        raise TruncatedMessageError(f"{who}: truncated frame: connection closed after {got} header bytes")
    n = check_length(announced_length(header, who), limit, who, phase)
    frame = bytearray(HEADER.size + n)
    frame[: HEADER.size] = header
    got = _recv_into(sock, memoryview(frame)[HEADER.size :], deadline, timeout, who, "frame body")
    if got < n:
        raise TruncatedMessageError(
            f"{who}: truncated frame: header announces {n} body bytes, connection closed after {got}"
        )
    return frame


def send_and_close(sock: socket.socket, frame: bytes, *, drain_s: float = 1.0, drain_bytes: int = 1 << 22) -> None:
    """Send a last frame, then read and discard what the peer still sends (bounded) so that it can read the frame."""
    with contextlib.suppress(OSError):
        sock.sendall(frame)
        sock.shutdown(socket.SHUT_WR)
        deadline, seen, buf = time.monotonic() + drain_s, 0, bytearray(1 << 16)
        while seen < drain_bytes and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            n = sock.recv_into(buf)
            if n == 0:
                break
            seen += n
    with contextlib.suppress(OSError):
        sock.close()


# --------------------------------------------------------------------------------------------------- transports
Tamper = Callable[[str, int, bytes], bytes]  # (direction "up"/"down", message index, frame) -> frame


class InProcessTransport:
    """Calls the server's frame handler directly; frames are still bytes, exactly as on a socket."""

    name = "inprocess"

    def __init__(self, handler: Callable[[bytes], bytes], tamper: Tamper | None = None):
        self.handler, self.tamper, self._n = handler, tamper, 0

    def roundtrip(self, frame: bytes, limit: int, phase: str = "") -> bytes:
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


class TcpTransport:
    """Client side of a TCP connection to a server (``python -m pi_eval serve`` or the local spawn)."""

    name = "tcp"

    def __init__(self, host: str, port: int, tamper: Tamper | None = None, timeout: float = 600.0):
        self.timeout = timeout
        try:
            self.sock = socket.create_connection((host, port), timeout=min(timeout, 30.0))
        except OSError as e:
            raise ConnectionError(f"client: cannot connect to {host}:{port}: {e}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tamper, self._n = tamper, 0

    def roundtrip(self, frame: bytes, limit: int, phase: str = "") -> bytes:
        i = self._n
        self._n += 1
        if self.tamper:
            frame = self.tamper("up", i, frame)
        sent = True
        try:
            self.sock.sendall(frame)
            if self.tamper and len(frame) < HEADER.size + announced_length(frame[: HEADER.size], "client"):
                self.sock.shutdown(socket.SHUT_WR)  # a truncated frame: the server sees EOF mid-frame
        except OSError:
            sent = False  # the server may have refused the frame and closed: its error frame is still readable
        try:
            reply = read_frame(self.sock, limit=limit, timeout=self.timeout, who="client", phase=phase)
        except TruncatedMessageError:
            if sent:
                raise
            reply = None
        if not reply:
            raise TruncatedMessageError(
                "client: the server closed the connection without replying"
                + ("" if sent else " (it stopped reading while the client was sending)")
            )
        if self.tamper:
            reply = self.tamper("down", i, bytes(reply))
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

    def __init__(self, transport, key: bytes | None = None):
        self.transport = transport
        self.codec = FrameCodec("client", key)
        self.setup = LabelStats()  # hello + public context
        self.control = LabelStats()  # end-of-run stats request; not part of the protocol's cost
        self.online: dict[str, LabelStats] = defaultdict(LabelStats)
        self.comm_time = 0.0

    def handshake(self, request: dict, schedule_digests: list[str]) -> dict:
        """hello / hello_ack: the server checks the request and the schedule, both sides switch to the session key."""
        nonce = secrets.token_bytes(32)
        meta = {"protocol": VERSION, "nonce": nonce.hex(), "request": request, "schedule": schedule_digests}
        reply = self.exchange(Message("hello", "hello", meta), bucket="setup")
        if reply.kind != "hello_ack" or reply.meta.get("echo") != nonce.hex():
            raise MalformedMessageError(f"client: expected the server's hello_ack for this session, got {reply.kind!r}")
        try:
            nonce_s = bytes.fromhex(reply.meta["nonce"])
        except (KeyError, TypeError, ValueError):
            raise MalformedMessageError("client: the server's hello_ack has no valid nonce") from None
        self.codec.rekey(nonce, nonce_s)
        return reply.meta

    def exchange(self, msg: Message, *, bucket: str = "online") -> Message:
        up = self.codec.seal(msg)
        t0 = time.perf_counter()
        down = self.transport.roundtrip(up, self.codec.recv_limit, self.codec.phase)
        self.comm_time += time.perf_counter() - t0
        reply = self.codec.open(down)
        if reply.kind == "error":
            raise RemoteError(str(reply.meta.get("code", "?")), str(reply.meta.get("error", "")), "server")
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
