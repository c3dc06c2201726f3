"""Authenticated, bounded message transport over ZeroMQ (control and KV data planes).

Wire format of one message (multipart)::

    [mac (32 bytes), header (msgpack map), *payload frames (raw bytes)]

``header`` holds ``t`` (type, str), ``src`` (sender name), ``ep`` (sender epoch), ``seq``
(per-sender monotonic), ``n`` (number of payload frames) and the body fields at top level.
``mac = HMAC-SHA256(secret, b"lumen/1" || len64(header) || header || len64(f1) || f1 ...)``.

Receiving order matters: counts and sizes are checked first (nothing is parsed before
that), then the MAC (nothing unauthenticated reaches msgpack), then msgpack with every
length bounded, then the header's types, replay, and the per-type schema. A message that
fails any step is dropped and counted in ``Codec.stats``; ``decode`` never raises.

Peers are authenticated twice. At the ZeroMQ handshake (CURVE, keys derived from the
cluster secret, :func:`secure_socket`): a peer without the secret cannot complete it, so
libzmq never buffers a frame of its. Then per message (the MAC above, replay and epoch).

Bounds before allocation: ``MAXMSGSIZE`` makes libzmq refuse (and disconnect) a peer whose
single frame exceeds the frame limit before the frame is allocated. libzmq delivers a
multipart message atomically, so the *number* of frames of one message is only checked
once it has been received -- only a peer that passed the CURVE handshake gets that far.

Token-id lists belong in payload frames (:func:`ints_frame` / :func:`frame_ints`), not in
the header: the header limit (64 KiB) is sized for control fields.

Fault injection (tests only): ``LUMEN_FAULT_CORRUPT_PAGES=PROB:SEED[:MODE[:TYPES]]`` in a
worker's environment makes every :class:`PushPool` created in that process corrupt messages of
the given types (comma-separated; default ``PAGE``) that carry payload frames, with
probability PROB, *after* the MAC was computed (MODE ``flip``: flip one byte, ``truncate``:
cut the last frame in half, ``drop``: do not send). The receiver's MAC
check drops the message, so the checkpoint page never becomes valid. Read once, at pool
creation (:meth:`FaultHook.from_env`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import itertools
import logging
import os
import random
import secrets
import stat
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq
import zmq.asyncio
from zmq.utils import z85

log = logging.getLogger(__name__)

MAC_LEN = 32
_DOMAIN = b"lumen/1"
_LEN = struct.Struct(">Q")
RESERVED = ("t", "src", "ep", "seq", "n")
DROP_REASONS = ("bad_mac", "replay", "stale_epoch", "malformed", "oversize", "unknown_type", "schema")
SECRET_ENV = "LUMEN_CLUSTER_SECRET"
FAULT_ENV = "LUMEN_FAULT_CORRUPT_PAGES"
_INT64 = (-(2**63), 2**63 - 1)
CURVE_FRAME_OVERHEAD = 33  # "\x07MESSAGE" + 8-byte nonce + flags byte + 16-byte Poly1305 tag
_CURVE_LABELS = (b"lumen zmq curve server v1", b"lumen zmq curve client v1")


@dataclass(frozen=True)
class Limits:
    """Upper bounds on anything read from the network (all enforced before allocation
    where libzmq/msgpack allow it)."""

    max_frames: int = 64  # payload frames per message
    max_header_bytes: int = 64 * 1024
    max_frame_bytes: int = 64 * 1024 * 1024
    max_message_bytes: int = 256 * 1024 * 1024  # sum of payload frames
    max_str_len: int = 4096
    max_bin_len: int = 16 * 1024
    max_array_len: int = 8192
    max_map_len: int = 4096  # the CKPT report maps up to protocol.MAX_BATCH requests
    replay_senders: int = 4096  # LRU size of the (src, epoch) -> seq table

    @property
    def zmq_maxmsgsize(self) -> int:
        # MAXMSGSIZE is per frame in libzmq; the largest legitimate frame decides it. Under CURVE
        # libzmq checks the size of the encrypted frame (a MESSAGE command), 33 bytes larger.
        return max(self.max_frame_bytes, self.max_header_bytes, MAC_LEN) + CURVE_FRAME_OVERHEAD


@dataclass
class Message:
    type: str
    src: str
    epoch: int
    seq: int
    body: dict[str, Any]
    frames: list[memoryview] = field(default_factory=list)


# --------------------------------------------------------------------------- frames


def as_buffer(x: Any) -> memoryview:
    """A flat byte view of bytes / bytearray / memoryview / numpy array / CPU torch tensor,
    without copying when ``x`` is already contiguous."""
    if isinstance(x, memoryview | bytes | bytearray):
        mv = memoryview(x)
        if not mv.c_contiguous:
            mv = memoryview(mv.tobytes())  # rare (strided views): correctness over zero-copy
        return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")
    if isinstance(x, np.ndarray):
        return memoryview(np.ascontiguousarray(x).reshape(-1).view(np.uint8))
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of lumen
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError("payload tensors must be on the CPU (copy device->host first)")
        flat = x.detach().contiguous().reshape(-1)
        return memoryview(flat.view(torch.uint8).numpy())
    if isinstance(x, zmq.Frame):
        return x.buffer
    raise TypeError(f"cannot send {type(x).__name__} as a payload frame")


def frame_to_numpy(buf: Any, dtype: Any, shape: Sequence[int] | None = None) -> np.ndarray:
    """Zero-copy numpy view of a received frame (shares memory with the zmq frame)."""
    arr = np.frombuffer(as_buffer(buf), dtype=dtype)
    return arr.reshape(shape) if shape is not None else arr


def frame_to_tensor(buf: Any, dtype: Any, shape: Sequence[int] | None = None):
    """Zero-copy torch view of a received frame (shares memory with the zmq frame)."""
    import torch

    mv = as_buffer(buf)
    if len(mv) == 0:
        t = torch.empty(0, dtype=dtype)
    else:
        t = torch.frombuffer(mv, dtype=dtype)
    return t.reshape(shape) if shape is not None else t


def ints_frame(ids: Iterable[int]) -> bytes:
    """Token ids as an int32 little-endian frame (lists this long do not belong in headers)."""
    return np.asarray(list(ids), dtype="<i4").tobytes()


def frame_ints(buf: Any) -> list[int]:
    mv = as_buffer(buf)
    if len(mv) % 4:
        raise ValueError("int32 frame length is not a multiple of 4")
    return np.frombuffer(mv, dtype="<i4").tolist()


# --------------------------------------------------------------------------- schema

_SIZED = (str, bytes, list, dict)
_NUMERIC = (int, float)
_ALLOWED = (int, float, str, bytes, bool, list, dict, type(None))


def _check_spec(spec: Any) -> None:
    if isinstance(spec, type):
        if spec not in _ALLOWED:
            raise ValueError(f"unsupported field type {spec!r}")
        return
    if not isinstance(spec, tuple) or len(spec) not in (2, 3) or spec[0] not in _ALLOWED:
        raise ValueError(f"bad field spec {spec!r}")
    typ, bound = spec[0], spec[1]
    if bound is not None:
        if isinstance(bound, int) and not isinstance(bound, bool):
            if typ not in _SIZED:
                raise ValueError(f"an int bound is a max length; {typ.__name__} has none")
        elif isinstance(bound, tuple) and len(bound) == 2:
            if typ not in _SIZED + _NUMERIC:
                raise ValueError(f"range bound on {typ.__name__}")
        else:
            raise ValueError(f"bad bound {bound!r}")
    if len(spec) == 3:
        if typ is not list:
            raise ValueError("an element spec is only allowed for list")
        _check_spec(spec[2])


def _matches(value: Any, spec: Any) -> bool:
    typ, bound, elem = (spec, None, None) if isinstance(spec, type) else (spec + (None,))[:3]
    if typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, typ)
    if not ok:
        return False
    if bound is not None:
        measure = len(value) if typ in _SIZED else value
        lo, hi = (0, bound) if isinstance(bound, int) else bound
        if not lo <= measure <= hi:
            return False
    if elem is not None:
        return all(_matches(v, elem) for v in value)
    return True


class Schema:
    """Per message type: which body fields, of which types and bounds, and how many frames.

    Field specs: a type (``int``, ``float``, ``str``, ``bytes``, ``bool``, ``list``,
    ``dict``, ``type(None)``) or ``(type, bound)`` where bound is a max length (int) for
    str/bytes/list/dict, or an inclusive ``(lo, hi)`` range of the value (int/float) or of
    the length (sized types); ``(list, bound, element_spec)`` also checks every element.
    Unknown fields are rejected; ``optional`` fields may be absent.
    """

    def __init__(self) -> None:
        self._types: dict[str, tuple[dict[str, Any], frozenset[str], tuple[int, int] | None]] = {}

    def register(
        self,
        type_: str,
        fields: dict[str, Any],
        *,
        optional: Iterable[str] = (),
        frames: int | tuple[int, int] | None = None,
    ) -> Schema:
        for name, spec in fields.items():
            if name in RESERVED:
                raise ValueError(f"field name {name!r} is reserved for the header")
            _check_spec(spec)
        opt = frozenset(optional)
        if not opt <= fields.keys():
            raise ValueError(f"optional fields not in the schema: {sorted(opt - fields.keys())}")
        nf = (frames, frames) if isinstance(frames, int) else frames
        self._types[type_] = (dict(fields), opt, nf)
        return self

    def __contains__(self, type_: str) -> bool:
        return type_ in self._types

    def validate(self, type_: str, body: dict[str, Any], nframes: int) -> bool:
        fields, optional, nf = self._types[type_]
        if nf is not None and not nf[0] <= nframes <= nf[1]:
            return False
        for name, value in body.items():
            spec = fields.get(name)
            if spec is None or not _matches(value, spec):
                return False
        return all(name in body for name in fields if name not in optional)


# --------------------------------------------------------------------------- replay


class ReplayGuard:
    """Highest seq seen per (src, epoch), LRU-bounded. With ``fence_epochs`` a message from
    an epoch older than the newest seen from the same src is dropped too (DESIGN §4.6 in
    depth; the controller still fences by epoch itself, since this table can evict)."""

    def __init__(self, capacity: int = 4096, fence_epochs: bool = True) -> None:
        self.capacity = capacity
        self.fence_epochs = fence_epochs
        self._seq: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._epoch: OrderedDict[str, int] = OrderedDict()

    def check(self, src: str, epoch: int, seq: int) -> str | None:
        """The drop reason, or None if the message is fresh (not yet recorded)."""
        if self.fence_epochs and epoch < self._epoch.get(src, epoch):
            return "stale_epoch"
        last = self._seq.get((src, epoch))
        if last is not None and seq <= last:
            return "replay"
        return None

    def record(self, src: str, epoch: int, seq: int) -> None:
        key = (src, epoch)
        self._seq[key] = seq
        self._seq.move_to_end(key)
        if len(self._seq) > self.capacity:
            self._seq.popitem(last=False)
        if epoch >= self._epoch.get(src, epoch):
            self._epoch[src] = epoch
        self._epoch.move_to_end(src)
        if len(self._epoch) > self.capacity:
            self._epoch.popitem(last=False)


# --------------------------------------------------------------------------- codec


class Codec:
    """Encodes and authenticates outgoing messages; verifies and bounds incoming ones.

    One Codec per process identity (``name``, ``epoch``); its ``seq`` counter is shared by
    every socket it sends on. Each receiving endpoint should pass its own
    :class:`ReplayGuard` to :meth:`decode` (seq order is only guaranteed per connection).
    """

    def __init__(
        self,
        secret: bytes,
        name: str,
        epoch: int,
        limits: Limits | None = None,
        schema: Schema | None = None,
    ) -> None:
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise ValueError("cluster secret must be at least 16 bytes")
        self._secret = secret
        self.name = name
        self.epoch = int(epoch)
        self.limits = limits or Limits()
        self.schema = schema if schema is not None else Schema()
        self.guard = ReplayGuard(self.limits.replay_senders)
        self._seq = itertools.count(1)  # next() is atomic under the GIL: safe across threads
        self.stats: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.accepted = 0
        self._logged: set[str] = set()
        # called with (src, epoch) for an authenticated message dropped as from an older incarnation,
        # so the receiver can fence it (the controller kills it) though the message itself is not delivered
        self.on_stale_epoch: Callable[[str, int], None] | None = None

    # -- sending
    def _mac(self, header: memoryview | bytes, frames: Sequence[memoryview]) -> bytes:
        h = hmac.new(self._secret, _DOMAIN, hashlib.sha256)
        h.update(_LEN.pack(len(header)))
        h.update(header)
        for f in frames:
            h.update(_LEN.pack(f.nbytes))
            h.update(f)
        return h.digest()

    def encode(self, type_: str, body: dict[str, Any] | None = None, frames: Sequence[Any] = ()) -> list:
        """``[mac, header, *frames]``; frames stay zero-copy views of the caller's buffers,
        which must not be modified until the send completed. Raises ValueError for a
        message the receiver's limits would drop (a local bug, not a network event)."""
        body = body or {}
        clash = [k for k in RESERVED if k in body]
        if clash:
            raise ValueError(f"body uses reserved header keys {clash}")
        bufs = [as_buffer(f) for f in frames]
        lim = self.limits
        if len(bufs) > lim.max_frames:
            raise ValueError(f"{len(bufs)} frames > max_frames {lim.max_frames}")
        sizes = [b.nbytes for b in bufs]
        if any(s > lim.max_frame_bytes for s in sizes) or sum(sizes) > lim.max_message_bytes:
            raise ValueError("payload exceeds frame/message size limits")
        header = msgpack.packb(
            {"t": type_, "src": self.name, "ep": self.epoch, "seq": next(self._seq), "n": len(bufs), **body},
            use_bin_type=True,
        )
        if len(header) > lim.max_header_bytes:
            raise ValueError(f"header {len(header)} B > max_header_bytes {lim.max_header_bytes}")
        return [self._mac(header, bufs), header, *bufs]

    # -- receiving
    def _drop(self, reason: str, detail: str = "") -> None:
        self.stats[reason] += 1
        # First drop of each reason at WARNING, the rest at DEBUG: a hostile peer must not
        # be able to flood the log.
        level = logging.WARNING if reason not in self._logged else logging.DEBUG
        self._logged.add(reason)
        log.log(level, "%s: dropped message (%s) %s", self.name, reason, detail)

    def decode(self, frames: Sequence[Any], guard: ReplayGuard | None = None) -> Message | None:
        """Verify and parse one received multipart message; None (and counted) if dropped."""
        try:
            return self._decode(frames, guard if guard is not None else self.guard)
        except Exception as e:  # safety net: nothing from the network may raise into the caller
            self._drop("malformed", f"unexpected {type(e).__name__}")
            return None

    def _decode(self, frames: Sequence[Any], guard: ReplayGuard) -> Message | None:
        lim = self.limits
        if not isinstance(frames, list | tuple) or len(frames) < 2:
            self._drop("malformed", "too few frames")
            return None
        if len(frames) - 2 > lim.max_frames:
            self._drop("oversize", f"{len(frames) - 2} payload frames")
            return None
        try:
            bufs = [as_buffer(f) for f in frames]
        except (TypeError, ValueError):
            self._drop("malformed", "frame is not a byte buffer")
            return None
        mac, header, payload = bufs[0], bufs[1], bufs[2:]
        if mac.nbytes != MAC_LEN:
            self._drop("malformed", "mac length")
            return None
        sizes = [p.nbytes for p in payload]
        if (
            header.nbytes > lim.max_header_bytes
            or any(s > lim.max_frame_bytes for s in sizes)
            or sum(sizes) > lim.max_message_bytes
        ):
            self._drop("oversize", "frame or header size")
            return None
        if not hmac.compare_digest(self._mac(header, payload), mac):
            self._drop("bad_mac")
            return None
        obj = self._unpack(header)
        if obj is None:
            self._drop("malformed", "header msgpack")
            return None
        t, src, ep, seq, n = (obj.get(k) for k in RESERVED)
        if not (
            isinstance(t, str)
            and isinstance(src, str)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in (ep, seq, n))
            and _INT64[0] <= ep <= _INT64[1]
            and 0 <= seq <= _INT64[1]
        ):
            self._drop("malformed", "header field types")
            return None
        if n != len(payload):
            self._drop("malformed", f"n={n} but {len(payload)} frames")
            return None
        reason = guard.check(src, ep, seq)
        if reason is not None:
            self._drop(reason, f"{src}@{ep} seq {seq}")
            if reason == "stale_epoch" and self.on_stale_epoch is not None:
                self.on_stale_epoch(src, ep)
            return None
        if t not in self.schema:
            self._drop("unknown_type", repr(t)[:64])
            return None
        body = {k: v for k, v in obj.items() if k not in RESERVED}
        if not self.schema.validate(t, body, len(payload)):
            self._drop("schema", t)
            return None
        guard.record(src, ep, seq)  # only a fully valid message advances the window
        self.accepted += 1
        return Message(t, src, ep, seq, body, list(payload))

    def _unpack(self, header: memoryview) -> dict | None:
        lim = self.limits
        up = msgpack.Unpacker(
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_buffer_size=lim.max_header_bytes,
            max_str_len=lim.max_str_len,
            max_bin_len=lim.max_bin_len,
            max_array_len=lim.max_array_len,
            max_map_len=lim.max_map_len,
            max_ext_len=0,  # no ext types (timestamps etc.) on the wire
        )
        try:
            up.feed(header)
            obj = up.unpack()
        except (ValueError, msgpack.UnpackException, msgpack.OutOfData, UnicodeDecodeError):
            return None
        if up.tell() != header.nbytes or not isinstance(obj, dict):
            return None  # trailing bytes, or not a map
        return obj


# --------------------------------------------------------------------------- secrets


def new_cluster_secret() -> bytes:
    return secrets.token_bytes(32)


def secret_to_hex(secret: bytes) -> str:
    return secret.hex()


def _parse_secret(text: str, where: str) -> bytes:
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError(f"{where}: cluster secret is not hex") from None
    if len(secret) < 16:
        raise ValueError(f"{where}: cluster secret shorter than 16 bytes")
    return secret


def secret_from_env(var: str = SECRET_ENV) -> bytes:
    """The cluster secret from ``$LUMEN_CLUSTER_SECRET`` (hex). Raises KeyError if unset."""
    return _parse_secret(os.environ[var], var)


def write_secret_file(path: str | os.PathLike, secret: bytes | None = None) -> bytes:
    """Write ``secret`` (a new one if None) as hex to ``path`` with mode 0600; returns it.
    Refuses to follow a symlink at ``path``."""
    secret = secret if secret is not None else new_cluster_secret()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the file may have existed with a wider mode
        os.write(fd, secret.hex().encode() + b"\n")
    finally:
        os.close(fd)
    return secret


def read_secret_file(path: str | os.PathLike) -> bytes:
    """Read a secret written by :func:`write_secret_file`; refuses a file that others can
    read or that another user owns (like ssh does with private keys)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PermissionError(f"{path}: secret file must be mode 0600")
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise PermissionError(f"{path}: secret file owned by another user")
        text = os.read(fd, 4096).decode("ascii", errors="replace")
    finally:
        os.close(fd)
    return _parse_secret(text, str(path))


# --------------------------------------------------------------------------- faults


class FaultHook:
    """Corrupts outgoing messages that carry payload frames, after the MAC was computed.

    ``mode``: ``flip`` one byte of a payload frame, ``truncate`` the last frame to half, or
    ``drop`` the message; ``types``: only these message types (None: all). Never mutates the
    caller's buffers (copies the frame it changes).
    """

    MODES = ("flip", "truncate", "drop")

    def __init__(self, prob: float, seed: int = 0, mode: str = "flip",
                 types: Iterable[str] | None = None) -> None:
        if not 0.0 <= prob <= 1.0 or mode not in self.MODES:
            raise ValueError(f"bad fault hook prob={prob} mode={mode}")
        self.prob, self.mode = prob, mode
        self.types = None if types is None else frozenset(types)
        self._rng = random.Random(seed)
        self.injected = 0

    @classmethod
    def from_env(cls, var: str = FAULT_ENV) -> FaultHook | None:
        """``PROB:SEED[:MODE[:TYPES]]`` from the environment, or None when unset/empty."""
        spec = os.environ.get(var, "").strip()
        if not spec:
            return None
        parts = spec.split(":")
        if len(parts) not in (2, 3, 4):
            raise ValueError(f"{var}={spec!r}: expected PROB:SEED[:MODE[:TYPES]]")
        mode = parts[2] if len(parts) >= 3 and parts[2] else "flip"
        types = parts[3].split(",") if len(parts) == 4 else ["PAGE"]
        return cls(float(parts[0]), int(parts[1]), mode, types)

    def __call__(self, msg: list, type_: str | None = None) -> list | None:
        """``msg`` is an encoded message of type ``type_``; returns the frames to send or
        None to drop."""
        if self.types is not None and type_ not in self.types:
            return msg
        if len(msg) <= 2 or self._rng.random() >= self.prob:
            return msg
        self.injected += 1
        if self.mode == "drop":
            return None
        out = list(msg)
        if self.mode == "truncate":
            last = as_buffer(out[-1])
            out[-1] = bytes(last[: last.nbytes // 2])
            return out
        candidates = [i for i in range(2, len(out)) if as_buffer(out[i]).nbytes > 0]
        if not candidates:  # nothing to flip: corrupt the header, the MAC still catches it
            candidates = [1]
        i = self._rng.choice(candidates)
        data = bytearray(as_buffer(out[i]))
        data[self._rng.randrange(len(data))] ^= 0xFF
        out[i] = bytes(data)
        return out


# --------------------------------------------------------------------------- endpoints


@functools.lru_cache(maxsize=8)
def curve_keys(secret: bytes) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    """``((server_public, server_secret), (client_public, client_secret))``, z85-encoded CURVE
    keys derived from the cluster secret: secret key = HMAC-SHA256(secret, label)."""
    pairs = []
    for label in _CURVE_LABELS:
        sk = z85.encode(hmac.new(secret, label, hashlib.sha256).digest()[:32])
        pairs.append((zmq.curve_public(sk), sk))
    return pairs[0], pairs[1]


def secure_socket(sock: zmq.Socket, secret: bytes, *, server: bool) -> None:
    """Make ``sock`` a CURVE server (``server``: the side that binds) or client, keyed from the
    cluster secret; call before bind/connect.

    Why: libzmq buffers every frame of a multipart message until its last one (MAXMSGSIZE is per
    frame, the HWM counts whole messages) and the codec's MAC can only run on a complete message,
    so without this anyone reaching a port could grow the receiver without bound. A CURVE client
    must know the server's public key, which only holders of the secret can derive: a peer
    without it fails the handshake and no frame of its is ever buffered. There is no ZAP handler
    (libzmq then accepts any client that completes the handshake); the codec still authenticates
    and orders every message (defence in depth)."""
    if not zmq.has("curve"):
        raise RuntimeError("libzmq was built without CURVE; lumen needs it for its internal ports")
    (server_public, server_secret), (client_public, client_secret) = curve_keys(secret)
    if server:
        sock.curve_server = True
        sock.curve_secretkey = server_secret
    else:
        sock.curve_serverkey = server_public
        sock.curve_publickey = client_public
        sock.curve_secretkey = client_secret


def _configure(sock: zmq.Socket, codec: Codec, hwm: int | None = None, *, server: bool) -> None:
    limits = codec.limits
    secure_socket(sock, codec._secret, server=server)
    sock.setsockopt(zmq.MAXMSGSIZE, limits.zmq_maxmsgsize)
    sock.setsockopt(zmq.LINGER, 0)  # never hang process exit on unsent data to a dead peer
    if hwm is not None:
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)


def _host_port(sock: zmq.Socket) -> str:
    ep = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    return ep.split("://", 1)[1]


def _tcp(address: str) -> str:
    return address if "://" in address else f"tcp://{address}"


def _bind_addr(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class _Endpoint:
    def __init__(self, codec: Codec, sock: zmq.Socket) -> None:
        self.codec = codec
        self.socket = sock
        self.guard = ReplayGuard(codec.limits.replay_senders)  # per receiving socket

    def close(self) -> None:
        self.socket.close(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, frames: list, flags: int = 0) -> bool:
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK | flags, copy=False)
            return True
        except zmq.Again:
            return False  # peer slow, gone or unknown (ROUTER_MANDATORY): caller decides
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                return False
            raise

    def _recv_sync(self, timeout_ms: int | None, with_identity: bool):
        """First valid message within ``timeout_ms`` (0: only what is queued now; None:
        wait forever); drops in between are counted and skipped."""
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        while True:
            wait = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            if not self.socket.poll(wait, zmq.POLLIN):
                return None
            try:
                frames = self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                continue
            out = self._accept(frames, with_identity)
            if out is not None:
                return out
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _accept(self, frames: list, with_identity: bool):
        if with_identity:
            if len(frames) < 1:
                return None
            identity = frames[0].bytes
            msg = self.codec.decode(frames[1:], self.guard)
            return None if msg is None else (identity, msg)
        return self.codec.decode(frames, self.guard)


class RouterEndpoint(_Endpoint):
    """Controller control plane (sync): binds a ROUTER; ``recv`` -> (identity, Message)."""

    def __init__(self, ctx: zmq.Context, codec: Codec, host: str = "127.0.0.1", port: int = 0,
                 hwm: int = 1000) -> None:
        sock = ctx.socket(zmq.ROUTER)
        _configure(sock, codec, hwm, server=True)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown identity -> False, not a silent drop
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker may reuse its identity
        sock.bind(_bind_addr(host, port))
        super().__init__(codec, sock)
        self.address = _host_port(sock)

    def send(self, identity: bytes, type_: str, body: dict | None = None, frames: Sequence[Any] = ()) -> bool:
        return self._send([identity, *self.codec.encode(type_, body, frames)])

    def recv(self, timeout_ms: int | None = 0) -> tuple[bytes, Message] | None:
        return self._recv_sync(timeout_ms, with_identity=True)


class AsyncRouterEndpoint(_Endpoint):
    """Controller control plane for asyncio: ``await recv()`` -> (identity, Message)."""

    def __init__(self, ctx: zmq.asyncio.Context, codec: Codec, host: str = "127.0.0.1", port: int = 0,
                 hwm: int = 1000) -> None:
        sock = ctx.socket(zmq.ROUTER)
        _configure(sock, codec, hwm, server=True)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.bind(_bind_addr(host, port))
        super().__init__(codec, sock)
        self.address = _host_port(sock)

    def send(self, identity: bytes, type_: str, body: dict | None = None, frames: Sequence[Any] = ()) -> bool:
        """Non-blocking: False if the worker is unknown/gone or its queue is full."""
        frames_ = [identity, *self.codec.encode(type_, body, frames)]
        # zmq.asyncio resolves a NOBLOCK send at once (sent, or Again/EHOSTUNREACH), and
        # going through the async socket keeps its edge-triggered event bookkeeping right.
        fut = self.socket.send_multipart(frames_, flags=zmq.NOBLOCK, copy=False)
        if not fut.done():
            return True  # queued behind an earlier send; it will go out
        e = fut.exception()
        if e is None:
            return True
        if isinstance(e, zmq.Again) or (isinstance(e, zmq.ZMQError) and e.errno == zmq.EHOSTUNREACH):
            return False
        raise e

    async def recv(self, timeout: float | None = None) -> tuple[bytes, Message] | None:
        """Next valid message; None after ``timeout`` seconds (None: wait forever)."""

        async def loop():
            while True:
                frames = await self.socket.recv_multipart(copy=False)
                out = self._accept(frames, with_identity=True)
                if out is not None:
                    return out

        if timeout is None:
            return await loop()
        try:
            return await asyncio.wait_for(loop(), timeout)
        except TimeoutError:
            return None


class DealerEndpoint(_Endpoint):
    """Worker -> controller control plane (sync): connects a DEALER."""

    def __init__(self, ctx: zmq.Context, codec: Codec, address: str, identity: bytes | None = None,
                 hwm: int = 1000) -> None:
        sock = ctx.socket(zmq.DEALER)
        _configure(sock, codec, hwm, server=False)
        if identity is not None:
            sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(_tcp(address))
        super().__init__(codec, sock)

    def send(self, type_: str, body: dict | None = None, frames: Sequence[Any] = ()) -> bool:
        return self._send(self.codec.encode(type_, body, frames))

    def recv(self, timeout_ms: int | None = 0) -> Message | None:
        return self._recv_sync(timeout_ms, with_identity=False)


class PullEndpoint(_Endpoint):
    """Worker data plane: binds a PULL on ``host:port`` (0: any free port); ``address`` is
    the bound ``host:port`` to announce in HELLO."""

    def __init__(self, ctx: zmq.Context, codec: Codec, host: str = "127.0.0.1", port: int = 0,
                 hwm: int = 256) -> None:
        sock = ctx.socket(zmq.PULL)
        _configure(sock, codec, server=True)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.bind(_bind_addr(host, port))
        super().__init__(codec, sock)
        self.address = _host_port(sock)

    def recv(self, timeout_ms: int | None = 0) -> Message | None:
        return self._recv_sync(timeout_ms, with_identity=False)


FORGET_LINGER_MS = 1000


class PushPool:
    """PUSH sockets to peers' data addresses, cached by address (LRU, ``max_peers``).

    ``send`` never blocks: it returns False when the peer's queue is at SNDHWM (slow or
    dead peer) or the fault hook dropped the message. Queued frames are zero-copy views:
    the caller must not reuse a buffer until it is sure the message left (or pass copies).
    """

    def __init__(self, ctx: zmq.Context, codec: Codec, sndhwm: int = 64, max_peers: int = 64,
                 fault: FaultHook | None | str = "env") -> None:
        self.ctx, self.codec = ctx, codec
        self.sndhwm, self.max_peers = sndhwm, max_peers
        self.fault = FaultHook.from_env() if fault == "env" else fault
        self._socks: OrderedDict[str, zmq.Socket] = OrderedDict()
        self.sent = 0
        self.refused = 0
        self.forgotten = 0

    @property
    def num_peers(self) -> int:
        return len(self._socks)  # a single read: safe from another thread (stats)

    def _socket(self, address: str) -> zmq.Socket:
        addr = _tcp(address)
        sock = self._socks.get(addr)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            _configure(sock, self.codec, server=False)
            sock.setsockopt(zmq.SNDHWM, self.sndhwm)
            sock.connect(addr)
            self._socks[addr] = sock
            if len(self._socks) > self.max_peers:
                _, old = self._socks.popitem(last=False)
                old.close(linger=0)
        else:
            self._socks.move_to_end(addr)
        return sock

    def send(self, address: str, type_: str, body: dict | None = None, frames: Sequence[Any] = ()) -> bool:
        msg = self.codec.encode(type_, body, frames)
        if self.fault is not None:
            msg = self.fault(msg, type_)
            if msg is None:
                self.refused += 1
                return False
        try:
            self._socket(address).send_multipart(msg, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.refused += 1
            return False
        self.sent += 1
        return True

    def wait_writable(self, address: str, timeout_ms: int) -> bool:
        """Wait up to timeout_ms until the peer's queue has room for a message (the socket is made on
        first use); a sender with nothing better to do waits here rather than having send() refuse."""
        return bool(self._socket(address).poll(timeout_ms, zmq.POLLOUT))

    def forget(self, address: str) -> bool:
        """Close the socket to a peer (e.g. declared dead); what is still queued gets FORGET_LINGER_MS
        to leave (in ZeroMQ's I/O thread: close does not block), then is discarded.
        A dead peer's socket would otherwise keep reconnecting (and hold its queue) until the LRU
        evicts it, which on a small cluster is never. Returns whether there was one."""
        sock = self._socks.pop(_tcp(address), None)
        if sock is not None:
            # not 0: a message sent just before the forget (in queue order) is still delivered to a
            # live peer; with linger 0 it was dropped whenever the close beat the I/O thread
            sock.close(linger=FORGET_LINGER_MS)
            self.forgotten += 1
        return sock is not None

    @property
    def peers(self) -> list[str]:
        """The addresses this pool holds a socket to, least recently used first."""
        return list(self._socks)

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close(linger=0)
        self._socks.clear()


__all__ = [
    "AsyncRouterEndpoint",
    "Codec",
    "DealerEndpoint",
    "FaultHook",
    "Limits",
    "Message",
    "PullEndpoint",
    "PushPool",
    "ReplayGuard",
    "RouterEndpoint",
    "Schema",
    "as_buffer",
    "curve_keys",
    "frame_ints",
    "frame_to_numpy",
    "frame_to_tensor",
    "ints_frame",
    "new_cluster_secret",
    "read_secret_file",
    "secret_from_env",
    "secret_to_hex",
    "secure_socket",
    "write_secret_file",
]
