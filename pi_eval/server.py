"""The server: plaintext weights plus a *public* TenSEAL context (public, relinearization and Galois keys).

Linear layers run as baby-step giant-step diagonal products (:mod:`pi_eval.bsgs`): a layer's diagonals are
encoded when the layer runs and freed after it, and the public context must carry the Galois keys of exactly the
rotation steps the schedule uses (:func:`pi_eval.diagonal.schedule_galois_steps`, which the client derives from
the same schedule); a context missing one is refused at the setup.

It holds its own model (:class:`~pi_eval.plan.ModelPlan`) and receives only the client's request (parameter set,
sequence length, modes), the schedule digests, the public context and ciphertexts.  It compiles the schedule from its
own model for that request and refuses a client whose schedule differs (:mod:`pi_eval.share`).  It never holds a
secret key: the context it receives is checked (``is_private()`` False, ``has_secret_key()`` False) and a context
that carries one is refused.

It is a frame handler: each uplink frame yields exactly one downlink frame, so the same object serves the in-process
and the TCP transport (:mod:`pi_eval.serve`).  Refusals go back as a short code and message
(:func:`pi_eval.channel.error_message`); tracebacks of unexpected errors go to the server's own log only.
"""

from __future__ import annotations

import re
import secrets
import sys
import time
import traceback

import tenseal as ts

from .bsgs import BSGSEvaluator
from .channel import VERSION, ChannelError, FrameCodec, Message, error_message
from .diagonal import BSGSPlan, DiagonalLinear, schedule_plans
from .layout import LinearWeights
from .limits import data_limits, setup_limit
from .ops import Op
from .params import ParamSet, get_param_set
from .plan import ModelPlan
from .rawpoly import RawCKKS
from .refresh import MaskSpec, ServerMasker
from .rss import peak_rss_bytes
from .schedule import Schedule, Step, compile_schedule
from .share import ScheduleMismatchError, check_digests, schedule_digests
from .stats import ServerSetupStats, ServerStats, ServerStepStats


class ServerSecurityError(RuntimeError):
    code = "security"


class ProtocolError(ValueError):
    """A well-formed, authenticated message that the protocol does not allow at this point."""

    code = "protocol"


class BadPayloadError(ValueError):
    """A public context or ciphertext that does not parse or does not fit the schedule."""

    code = "bad_payload"


_CODES = [
    (ChannelError, None),
    (ServerSecurityError, "security"),
    (ScheduleMismatchError, "schedule_mismatch"),
    (ProtocolError, "protocol"),
    (BadPayloadError, "bad_payload"),
    (ValueError, "refused"),
    (KeyError, "refused"),
]


class _Timer:
    def __init__(self):
        self.he = 0.0

    def he_call(self, f, *a):
        t0 = time.perf_counter()
        r = f(*a)
        self.he += time.perf_counter() - t0
        return r


class Server:
    def __init__(self, plan: ModelPlan, params: str | ParamSet, *, threads: int = 1, key: bytes | None = None):
        self.plan = plan
        self.params = get_param_set(params)
        self.threads = threads
        self.codec = FrameCodec("server", key)
        self.sched: Schedule | None = None  # compiled at the hello, for the client's request
        self.phase = "hello"  # hello -> setup -> online -> done
        self.ctx: ts.Context | None = None
        self.masker: ServerMasker | None = None  # mode B (hiding refresh), built once the public context is known
        self.bsgs: BSGSEvaluator | None = None  # linear layers, built once the public context is known
        self.weights: dict[str, LinearWeights] = {}  # the schedule's plaintext weights (numpy; encoded per layer)
        self.plans: dict[str, BSGSPlan] = {}  # the BSGS plan of each linear layer, derived from the schedule
        self.galois_steps: tuple[int, ...] = ()  # the rotation steps those plans use (the client's Galois keys)
        self.regs: dict[str, list[list]] = {}
        self.pc = 0
        self.done = False
        self.aborted: str | None = None
        self.step_stats: dict[str, ServerStepStats] = {}
        self.received: list[str] = []  # kinds/labels of every frame received (for the key audit)
        self.t = _Timer()
        self.bytes_in = self.bytes_out = 0  # as seen by the server (the stats reply itself excluded)
        self.setup_stats = ServerSetupStats()
        self._rekey: tuple[bytes, bytes] | None = None

    # ------------------------------------------------------------------ key audit
    def holds_secret_key(self) -> bool:
        return self.ctx is not None and (self.ctx.is_private() or self.ctx.has_secret_key())

    @property
    def peer_accepted(self) -> bool:
        """The hello verified (right key) and the request and schedule were accepted."""
        return self.phase != "hello"

    # ------------------------------------------------------------------ frame handling
    def handle(self, frame: bytes) -> bytes:
        self.bytes_in += len(frame)
        try:
            if self.aborted:
                raise ProtocolError(f"server already refused this session: {self.aborted}")
            msg = self.codec.open(frame)
            self.received.append(f"{msg.kind}:{msg.label}")
            reply = self._dispatch(msg)
        except Exception as e:
            reply = self._refusal(e)
        out = self.codec.seal(reply)
        if (
            self._rekey is not None
        ):  # the hello_ack is tagged with the pre-shared key, what follows with the session key
            self.codec.rekey(*self._rekey)
            self._rekey = None
        self.bytes_out += len(out)
        return out

    def refuse(self, e: ChannelError) -> bytes:
        """Error frame for a frame that could not even be read (too large, timeout, truncated)."""
        out = self.codec.seal(self._refusal(e))
        self.bytes_out += len(out)
        return out

    def _refusal(self, e: BaseException) -> Message:
        code = next((c or getattr(e, "code", "channel") for t, c in _CODES if isinstance(e, t)), None)
        if code is None:  # a bug or a library error: its traceback stays in the server's log
            print(f"pi_eval server: internal error\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            code, text = "internal", f"internal error ({type(e).__name__}); see the server's log"
        else:
            text = str(e)
        msg = error_message(code, text)
        if not self.aborted:
            self.aborted = f"[{code}] {msg.meta['error']}"
        return msg

    def _dispatch(self, msg: Message) -> Message:
        if self.phase == "hello":
            if msg.kind != "hello":
                raise ProtocolError(f"expected a hello first, got {msg.kind!r}")
            return self._hello(msg)
        if msg.kind == "stats":
            return Message("stats", "stats", self.stats().to_dict())
        if self.phase == "setup":
            if msg.kind != "setup":
                raise ProtocolError(f"expected the public context (setup), got {msg.kind!r}")
            return self._setup(msg)
        if msg.kind != "data" or self.phase != "online":
            raise ProtocolError(f"unexpected {msg.kind!r} message in phase {self.phase!r}")
        return self._on_data(msg)

    # ------------------------------------------------------------------ hello: request and schedule agreement
    def _hello(self, msg: Message) -> Message:
        m = msg.meta
        if m.get("protocol") != VERSION:
            raise ProtocolError(f"protocol version {m.get('protocol')!r}; this server speaks {VERSION}")
        nonce = m.get("nonce")
        if not isinstance(nonce, str) or not re.fullmatch(r"[0-9a-f]{64}", nonce):
            raise ProtocolError("the hello's nonce must be 32 bytes in hex")
        req = m.get("request")
        if not isinstance(req, dict):
            raise ProtocolError("the hello carries no request")
        if req.get("params") != self.params.name:
            raise ProtocolError(
                f"parameter set {req.get('params')!r} requested; this server serves {self.params.name!r}"
            )
        seq_len, modes, degree = req.get("seq_len"), req.get("modes", {}), req.get("poly_degree", 2)
        if not isinstance(seq_len, int) or isinstance(seq_len, bool):
            raise ProtocolError(f"seq_len must be an integer, got {seq_len!r}")
        if not isinstance(modes, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in modes.items()):
            raise ProtocolError("modes must map operation kinds to mode letters")
        if not isinstance(degree, int) or not 1 <= degree <= 16:
            raise ProtocolError(f"poly_degree must be an integer in [1, 16], got {degree!r}")
        sched = compile_schedule(
            self.plan,
            self.params,
            seq_len,
            modes,
            allow_refresh=bool(req.get("allow_refresh", True)),
            poly_degree=degree,
        )
        check_digests(schedule_digests(sched), m.get("schedule"))
        self.sched = sched
        t0 = time.perf_counter()  # BSGS plans from layouts and shapes: what the client derives too (no encoding)
        self.weights = dict(sched.server_weights)
        self.plans = schedule_plans(sched)
        self.galois_steps = tuple(sorted({s for p in self.plans.values() for s in p.galois_steps()}))
        self.setup_stats.plan_s = time.perf_counter() - t0
        self.setup_stats.galois_steps = list(self.galois_steps)
        nonce_s = secrets.token_bytes(32)
        self._rekey = (bytes.fromhex(nonce), nonce_s)
        self.phase = "setup"
        self.codec.recv_limit = setup_limit(self.params, len(self.galois_steps))
        self.codec.phase = "the public context"
        return Message("hello_ack", "hello", {"nonce": nonce_s.hex(), "echo": nonce, "params": self.params.name})

    def _setup(self, msg: Message) -> Message:
        t0 = time.perf_counter()
        if len(msg.blobs) != 1:
            raise ProtocolError(f"setup must carry exactly one public context, got {len(msg.blobs)} blobs")
        try:
            ctx = self.t.he_call(ts.context_from, msg.blobs[0], self.threads)
        except Exception as e:
            raise BadPayloadError(f"setup: the public context does not parse ({type(e).__name__})") from None
        if ctx.is_private() or ctx.has_secret_key():
            raise ServerSecurityError("server refuses a context that contains a secret key; send a public context")
        if not ctx.has_galois_keys() or not ctx.has_relin_keys():
            raise BadPayloadError("public context lacks Galois or relinearization keys")
        n = ctx.seal_context().data.key_context_data().parms().poly_modulus_degree()
        if n != self.params.poly_modulus_degree:
            raise BadPayloadError(f"context N={n} does not match the parameter set {self.params.name}")
        bsgs = BSGSEvaluator(ctx)
        missing = bsgs.missing_steps(self.galois_steps)
        if missing:
            raise BadPayloadError(
                f"public context lacks Galois keys for rotation steps {missing}; the schedule's linear layers use "
                f"{list(self.galois_steps)}"
            )
        self.ctx, self.bsgs = ctx, bsgs
        assert not self.holds_secret_key()
        if any(st.op is Op.REFRESH for st in self.sched.steps):
            raw = self.t.he_call(RawCKKS, self.params, ctx)
            self.masker = ServerMasker(raw, 2.0**self.params.scale_bits)
        self.setup_stats.context_load_s = time.perf_counter() - t0
        self.phase = "online"
        self.codec.recv_limit, self.codec.phase = data_limits(self.sched)[0], "a data frame"
        return Message("setup_ack", "setup", {"server_has_secret_key": self.holds_secret_key()})

    def _stat(self, name: str) -> ServerStepStats:
        return self.step_stats.setdefault(name, ServerStepStats())

    def _load(self, st, blobs: list[bytes], layout) -> list[list]:
        per = layout.chunks
        expect = self.sched.groups * per
        if len(blobs) != expect:
            raise ProtocolError(f"{st.name}: expected {expect} ciphertexts, got {len(blobs)}")
        out = []
        for j in range(self.sched.groups):
            row = []
            for c in range(per):
                try:
                    v = self.t.he_call(ts.ckks_vector_from, self.ctx, blobs[j * per + c])
                except Exception as e:
                    raise BadPayloadError(
                        f"{st.name}: ciphertext {j * per + c} does not parse ({type(e).__name__})"
                    ) from None
                if v.size() != layout.size:
                    raise BadPayloadError(f"{st.name}: ciphertext of size {v.size()}, the schedule's is {layout.size}")
                row.append(v)
            out.append(row)
        return out

    def _on_data(self, msg: Message) -> Message:
        """The client's reply to the current step (its destination register), then the server's steps up to the next
        message to the client."""
        if self.done:
            raise ProtocolError("the inference is complete; only a stats request is allowed")
        st = self.sched.steps[self.pc]
        if msg.label != st.name:
            raise ProtocolError(f"out-of-order message: got {msg.label!r}, expected {st.name!r}")
        if not st.spec.client_replies:
            raise ProtocolError(f"{st.name}: the client sends nothing for a step of op {st.op}")
        t0, h0 = time.perf_counter(), self.t.he
        rec = self._stat(st.name)
        blobs = msg.blobs
        expect = self.sched.groups * st.dst_layout.chunks
        if st.op is Op.REFRESH:  # remove the mask from the client's fresh ciphertexts
            if len(blobs) != expect:
                raise ProtocolError(f"{st.name}: expected {expect} ciphertexts, got {len(blobs)}")
            try:
                blobs = self.t.he_call(self.masker.unmask, st.name, blobs)
            except Exception as e:
                raise BadPayloadError(f"{st.name}: refreshed ciphertexts rejected ({type(e).__name__}: {e})") from None
        self.regs[st.dst] = self._load(st, blobs, st.dst_layout)
        rec.server_s += time.perf_counter() - t0
        rec.he_s += self.t.he - h0
        self.pc += 1
        return self._run_until_client()

    def _run_until_client(self) -> Message:
        """Runs the server's own steps (:attr:`pi_eval.ops.OpSpec.server_computes`) until a step sends a register
        to the client: its ciphertexts (masked first for a refresh), or the logits as the result."""
        computes = {Op.LINEAR: self._linear, Op.POLYNOMIAL: self._polynomial, Op.SKIP: lambda st, rec: None}
        while True:
            st = self.sched.steps[self.pc]
            t0, h0 = time.perf_counter(), self.t.he
            rec = self._stat(st.name)
            if st.spec.server_computes:
                computes[st.op](st, rec)
                rec.server_s += time.perf_counter() - t0
                rec.he_s += self.t.he - h0
                self.pc += 1
                continue
            if not st.spec.sends_down:
                raise ProtocolError(f"{st.name}: step of op {st.op} reached on the server")
            blobs = [self.t.he_call(ct.serialize) for grp in self.regs[st.src] for ct in grp]
            if st.op is Op.REFRESH:  # every coefficient masked, see pi_eval/refresh.py
                spec = MaskSpec(st.fn["value_bound"], st.fn["sigma"])
                blobs = self.t.he_call(self.masker.mask, st.name, blobs, spec)
            rec.server_s += time.perf_counter() - t0
            rec.he_s += self.t.he - h0
            if st.spec.final:
                self.done = True
                self.phase = "done"
                return Message("result", st.name, {}, blobs)
            return Message("data", st.name, {}, blobs)

    def _polynomial(self, st: Step, rec: ServerStepStats) -> None:
        self.regs[st.dst] = [[self.t.he_call(ct.polyval, st.fn["coeffs"]) for ct in grp] for grp in self.regs[st.src]]

    def _linear(self, st: Step, rec: ServerStepStats) -> None:
        """One linear layer for every token group: BSGS product, then bias and residual (TenSEAL additions).

        The layer's diagonals are built from the numpy weights and encoded here, per output chunk, and freed
        before the next layer runs (:meth:`pi_eval.bsgs.BSGSEvaluator.apply`).
        """
        lw = self.weights[st.name]
        layer = DiagonalLinear.from_linear_weights(lw, self.params.slots, name=st.name, plan=self.plans[st.name])
        before = dict(self.bsgs.stats)
        # at the level the output needs (a head read only by the client, or a residual lower than the input, is
        # computed with fewer primes: same values, cheaper plaintexts, products and rotations)
        out = self.t.he_call(self.bsgs.apply_vectors, layer, self.regs[st.src], st.level_out + 1)
        after = self.bsgs.stats
        rec.rotations += int(after["rotations"] - before.get("rotations", 0))
        rec.plaintext_products += int(after["multiplies"] - before.get("multiplies", 0))
        rec.encode_s += after["encode_s"] - before.get("encode_s", 0.0)
        biases = [b.tolist() for b in lw.biases()]
        res = self.regs[st.residual] if st.residual else None
        for j, row in enumerate(out):
            for co in range(len(row)):
                acc = self.t.he_call(row[co].__add__, biases[co])
                if res is not None:
                    acc = self.t.he_call(acc.__add__, res[j][co])
                row[co] = acc
        self.regs[st.dst] = out

    def stats(self) -> ServerStats:
        return ServerStats(
            steps=self.step_stats,
            he_s=self.t.he,
            setup=self.setup_stats,
            holds_secret_key=self.holds_secret_key(),
            context_is_private=bool(self.ctx.is_private()) if self.ctx is not None else None,
            received=self.received,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            aborted=self.aborted,
            authenticated=self.codec.authenticated,
            peak_rss_bytes=peak_rss_bytes(),
        )
