"""Flower (>= 1.42, Message API) integration: clients upload compressed updates, not model copies.

An existing Flower app gains compression with two changes, one on each side:

    from gradcodec.integrations.flower import CompressedStrategy, gradcodec_mod

    app = ClientApp(mods=[gradcodec_mod("int8")])                   # client: the mod goes first
    strategy = CompressedStrategy(FedAvg(...), downlink_codec=None)  # server: wrap any strategy
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=10)
    strategy.history[1].uplink_payload_bytes                         # per-round communication stats

What the pieces do
------------------
* `CompressedStrategy` adds a ConfigRecord named ``"__gradcodec__"`` to every TRAIN message the wrapped
  strategy sends. It is the handshake: the mod compresses a reply only when the instruction carries it,
  so a ClientApp with the mod keeps working, uncompressed, under an unwrapped strategy. Its
  ``"uplink"`` entry names the codec the server wants (empty: the client's own choice). With a
  `downlink_codec`, every ArrayRecord of the TRAIN messages is replaced by a *gradcodec record*.
* `gradcodec_mod` removes that ConfigRecord and decodes any gradcodec record before the app (and inner
  mods) see the message, so they see exactly what the wrapped strategy sent, up to a lossy downlink.
  It must therefore come first in ``mods`` (Flower runs ``mods[0]`` outermost). A client without the
  mod, under a wrapped strategy without a downlink codec, still works: its app sees one extra
  ConfigRecord and its uncompressed reply is aggregated as usual.
  After the app's train function returns, each ArrayRecord of the reply is replaced, under the same
  record name, by a gradcodec record holding the round's *update* (local minus the global the client
  received, float32), which is what compresses well; the state itself is mostly shared history.
  The reference is the received record of the same name, else the only record received; a record
  with neither is sent as the app made it.
* The wrapper's `aggregate_train` decodes each reply, adds the update to the arrays the wrapped strategy
  sent that node, and hands the wrapped strategy replies that look exactly as if the app had sent them
  (same record names, keys, order, dtypes; the mod's metrics removed). Replies that carry an error or
  cannot be decoded are dropped with a warning; the others are aggregated.

Gradcodec records
-----------------
A gradcodec record is an ArrayRecord, under the name of the record it stands for, holding

* ``"__gradcodec__"``: one Array with stype ``"gradcodec/1"`` (never numpy: an unwrapped strategy fails
  loudly instead of averaging bytes) whose data is one gradcodec payload of named tensors
  (docs/wire-format.md), keyed by the record's own keys;
* under their own keys, the Arrays sent as they are: those gradcodec cannot carry (non-numpy stypes,
  dtypes outside the wire format) and, on the uplink, float arrays sent as values (see below).

Next to it, the ConfigRecord ``"__gradcodec__.<record name>"`` says how to rebuild it: ``"keys"``, the
record's keys in order, and, on the uplink, ``"ref"``, the name of the record the update is relative
to. On the uplink everything the server already knows is left out, since for a ≥100× compressed
adapter the envelope would otherwise outweigh the payload: an uplink record whose keys are its
reference's, in the same order (the usual reply: the model the server sent, trained), omits
``"keys"``, and one whose reference has its own name (the usual case too) has no ConfigRecord at all;
a payload carrying the full update (every key, float ones as float32 updates) names its tensor layout
by an 8-byte fingerprint (`update_layout`, docs/wire-format.md "By reference") instead of carrying
the names, dtypes and shapes, which the server rebuilds from the reference it sent. Each key is taken from
the payload, else from the Arrays sent as they are, else from the reference (the app returned it
bitwise unchanged, so it is not sent); reference keys missing from ``"keys"`` were
dropped by the app. In an uplink payload float tensors are updates (added to the reference)
and integer and bool tensors are values (gradcodec sends them raw under any codec); on the
downlink every tensor is a value. The uplink sends as they are, exactly whatever the codec, the float
arrays that are values: those without a float reference of the same shape and dtype (new keys), and
those a lossless update cannot rebuild (below).

Under a ``dp:...`` spec (client-level DP, gradcodec.codecs.dp) the mod never lets the app's own reply
through: where it would otherwise fall back to sending it uncompressed (a failed encode, a missing
learned model, a float array with no reference to measure an update from), it replies with an error
instead, since those values have not been clipped and noised.

Exactness and the downlink
--------------------------
* With a lossless uplink codec ("raw", "zstd") the rebuilt arrays are bit-identical to the app's: the
  mod checks that ``reference + update`` rebuilds each array bit for bit (float rounding can prevent it
  where a value changes by orders of magnitude) and sends the few arrays where it does not as values.
* A learned codec (``"cgfed:model=ae.safetensors"``) works like any other: the handshake names its
  model by fingerprint (``"uplink-model"``), and each client encodes with the model of that fingerprint
  among those it was given (`gradcodec_mod(..., models=[...])`, or the model of its own spec); a client
  that has none replies uncompressed, with a warning. The server decodes with the uplink codec's model
  and `CompressedStrategy(..., models=[...])`.
* With a lossy codec each client keeps error-feedback residuals in ``context.state`` (an ArrayRecord per
  codec spec and record name, the `ErrorFeedback` state dict), so what one round loses is sent in a
  later one; Flower carries ``context.state`` between rounds in simulation and in deployment.
* With a lossy `downlink_codec` the client trains from the decoded global ĝ and sends
  ``update = local - ĝ``, an update measured from where it really started (unbiased by the downlink
  error). The server adds it to the *exact* global g it holds (the arrays the wrapped strategy sent),
  not to ĝ: the global model keeps full precision instead of being re-quantised every round (small
  updates would be rounded away and training would stall), and strategies that compute their own
  update from the arrays they sent (FedOpt family, server-side DP clipping) see exactly the clients'
  averaged update. Only TRAIN messages are compressed; evaluation is sent as the wrapped strategy made it.

Sizes
-----
`message_nbytes` measures what Flower 1.42 carries for a Message: the sum of its deflated objects
(Message, RecordDict, records, Arrays, ArrayChunks; what ``push_objects`` sends), plus the content-less
protobuf Message and object tree sent with ``PushMessages``. Transport framing (gRPC/HTTP) and the
object store's deduplication of objects it already holds are not counted. In simulation nothing is
serialised; the numbers say what a deployment would carry.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.app.message.message import remove_content_from_message
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

import gradcodec
from gradcodec.errors import CorruptPayload, GradcodecError, InvalidInput, ModelMismatch
from gradcodec.feedback import RESIDUAL
from gradcodec.learned import LearnedModel, load_model

__all__ = [
    "CompressedStrategy",
    "RoundStats",
    "Transfer",
    "gradcodec_mod",
    "message_nbytes",
    "is_gradcodec_record",
    "HANDSHAKE_KEY",
    "META_PREFIX",
    "RECORD_KEY",
    "STYPE",
]

HANDSHAKE_KEY = "__gradcodec__"  # ConfigRecord name of the handshake in TRAIN instructions
RECORD_KEY = "__gradcodec__"  # key of the payload Array inside a gradcodec record
STYPE = "gradcodec/1"  # stype of the payload Array
META_PREFIX = "__gradcodec__."  # + record name: the ConfigRecord that says how to rebuild the record
METRICS_RECORD = "__gradcodec__"  # MetricRecord the mod adds when the reply has not exactly one
METRIC_PREFIX = "gradcodec."
STATE_PREFIX = "gradcodec:"  # context.state keys: "gradcodec:<canonical spec>:<record name>" (a codec's own state)
RESIDUALS_PREFIX = "gradcodec:residuals:"  # + record name: its error-feedback residuals, whichever codec sends next
COUNTER_KEY = "gradcodec:calls"  # context.state ConfigRecord counting compressed replies (seeding)
ROUNDS_KEY = "gradcodec:rounds"  # context.state ConfigRecord: state key -> the server round it was last used in

_VERSION = 1  # handshake protocol version
_PRIVATE_FAILURE = 4601  # error code of a reply the mod withheld: a dp update it could not encode
_NUMPY_STYPE = "numpy.ndarray"
# The dtypes of the wire format (docs/wire-format.md) that numpy has: all but bfloat16.


# ====================================================================== sizes


def message_nbytes(msg: Message, cache: dict[str, int] | None = None) -> int:
    """Bytes Flower 1.42 carries for `msg`: its deflated objects plus the control-plane protobufs.

    `cache` (object id -> deflated size) lets many messages that share content be measured once.
    """
    total = 0
    objects = get_all_nested_objects(msg)
    for object_id, obj in objects.items():
        size = cache.get(object_id) if cache is not None else None
        if size is None:
            size = len(obj.deflate())
            if cache is not None:
                cache[object_id] = size
        total += size
    head = message_to_proto(remove_content_from_message(msg))
    head.metadata.message_id = msg.object_id  # as a deployment's push sets it, whatever it is here
    total += head.ByteSize()
    total += get_object_tree(msg).ByteSize()
    # Deflating makes each Array cache its chunks, which hold memoryviews: a message carrying them
    # cannot be pickled, and the simulation engine pickles messages to and from its Ray actors.
    for obj in objects.values():
        if isinstance(obj, Array):
            obj.__dict__.pop("_chunks", None)
    return total


def _array_nbytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


# ====================================================================== arrays and tensors


def _to_tensor(array: Array) -> torch.Tensor | None:
    """The Array as a CPU tensor, or None if gradcodec cannot carry it (it then travels as it is)."""
    if array.stype != _NUMPY_STYPE:
        return None
    try:
        nd = array.numpy()
    except Exception:  # noqa: BLE001 - anything Flower cannot read back is passed through as is
        return None
    if not nd.dtype.isnative:
        return None
    try:
        t = torch.from_numpy(nd)
    except TypeError:  # a numpy dtype torch has no counterpart for
        return None
    return t if t.dtype in gradcodec.SUPPORTED_DTYPES else None


def _to_array(t: torch.Tensor) -> Array:
    return Array(t.detach().cpu().numpy())


def _copy_array(a: Array) -> Array:
    return Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=a.data)  # bytes are shared, not copied


def _same_array(a: Array, b: Array) -> bool:
    return a.stype == b.stype and a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and a.data == b.data


def _delta(local: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The float32 update local - ref (computed in float64 for float64 arrays)."""
    if local.dtype == torch.float64:
        return (local - ref).float()
    return local.float() - ref.float()


def _apply(ref: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """ref + delta in ref's dtype: the one rule both sides use to rebuild an array."""
    if ref.dtype == torch.float64:
        return ref + delta.double()
    return (ref.float() + delta.float()).to(ref.dtype)


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two tensors of the same dtype and shape (NaN payloads and -0.0 included)."""
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _learned_models(codec: gradcodec.Codec | None, models: Sequence[str | LearnedModel]) -> list[LearnedModel]:
    """The model `codec` encodes with (a learned codec's), then `models` (paths or loaded), loaded once."""
    own = [codec.model] if codec is not None and codec.model is not None else []
    return own + [load_model(m) for m in models]


def _model_with(fingerprint: str, models: Sequence[LearnedModel]) -> LearnedModel:
    for m in models:
        if m.fingerprint.hex() == fingerprint:
            return m
    known = ", ".join(m.fingerprint.hex() for m in models) or "none"
    raise ModelMismatch(f"the server asks for learned model {fingerprint}; this client has {known} "
                        "(give the model file to gradcodec_mod(..., models=[...]))")


# ====================================================================== gradcodec records


def is_gradcodec_record(record: Any) -> bool:
    """Whether `record` is an ArrayRecord made by this module (a payload plus Arrays sent as they are)."""
    return isinstance(record, ArrayRecord) and RECORD_KEY in record and record[RECORD_KEY].stype == STYPE


def _make_record(payload: bytes, as_is: Mapping[str, Array]) -> ArrayRecord:
    record = ArrayRecord({RECORD_KEY: Array(dtype="bytes", shape=(len(payload),), stype=STYPE, data=payload)})
    for key, array in as_is.items():
        record[key] = array
    return record


def _rebuild(
    record: ArrayRecord,
    meta: Any,
    ref: Mapping[str, Array] | None = None,
    cache: dict[int, torch.Tensor] | None = None,
    models: Sequence[LearnedModel] = (),
) -> tuple[ArrayRecord, str]:
    """The ArrayRecord a gradcodec record stands for, and the codec spec of its payload.

    meta: its ConfigRecord. ref: the reference Arrays by key (uplink), None when the payload holds
    values only (downlink). cache: reference tensors by id() of their Array, shared across the replies
    of a round. models: learned models to decode with. Raises CorruptPayload (or another
    GradcodecError) for anything malformed.
    """
    default_keys = list(ref) if ref is not None else None
    keys = meta.get("keys", default_keys) if isinstance(meta, ConfigRecord) else default_keys
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        raise CorruptPayload("gradcodec record: its ConfigRecord has no valid 'keys' list")
    blob = record[RECORD_KEY].data
    layout = update_layout(ref) if ref is not None else None
    payload = gradcodec.decode(blob, models=list(models), layout=layout)
    if not isinstance(payload, dict):
        raise CorruptPayload("gradcodec record: the payload holds a lone tensor, not named tensors")
    as_is = {k: a for k, a in record.items() if k != RECORD_KEY}
    if set(payload) & set(as_is) or not (set(payload) | set(as_is)) <= set(keys):
        raise CorruptPayload("gradcodec record: its keys do not match its ConfigRecord")
    cache = {} if cache is None else cache
    out = ArrayRecord()
    for key in keys:
        if key in as_is:
            out[key] = as_is[key]
        elif key in payload:
            t = payload[key]
            if ref is not None and t.is_floating_point():
                t = _apply(_reference(ref, key, tuple(t.shape), cache), t)
            out[key] = _to_array(t)
        elif ref is not None and key in ref:
            out[key] = _copy_array(ref[key])  # returned unchanged, so not sent
        else:
            raise CorruptPayload(f"gradcodec record: {key!r} is neither sent nor in the reference")
    return out, gradcodec.inspect(blob, layout=layout).codec


def update_layout(ref: Mapping[str, Array]) -> gradcodec.Layout:
    """The layout of a full update against the reference Arrays `ref`: every key gradcodec carries, in
    order, float ones as float32 updates, integer and bool ones as values. A reply whose payload has
    exactly this layout names it by fingerprint instead of carrying names, dtypes and shapes: the
    server holds `ref`, so it rebuilds the table itself."""
    entries = []
    for key, array in ref.items():
        t = _to_tensor(array)
        if t is not None:
            entries.append((key, torch.float32 if t.is_floating_point() else t.dtype, tuple(t.shape)))
    return gradcodec.Layout(tuple(entries))


def _reference(ref: Mapping[str, Array], key: str, shape: tuple[int, ...], cache: dict[int, torch.Tensor]) -> torch.Tensor:
    """The reference tensor an update for `key` is added to."""
    if key not in ref:
        raise CorruptPayload(f"gradcodec record: update for {key!r}, which the server did not send")
    array = ref[key]
    if id(array) not in cache:
        base = _to_tensor(array)
        if base is None or not base.is_floating_point():
            raise CorruptPayload(f"gradcodec record: update for {key!r}, whose reference is not a float array")
        cache[id(array)] = base
    base = cache[id(array)]
    if tuple(base.shape) != shape:
        raise CorruptPayload(f"gradcodec record: update for {key!r} has shape {shape}, the reference {tuple(base.shape)}")
    return base


# ====================================================================== client side


def gradcodec_mod(codec: str = "int8", error_feedback: bool = True, seed: int | None = None, *,
                  models: Sequence[str | LearnedModel] = (), measure: bool = False, residual_decay: float = 1.0) -> Mod:
    """A ClientApp mod that compresses TRAIN replies for a `CompressedStrategy` server.

    codec: the gradcodec spec for the update ("int8", "int4", "topk:ratio=0.01|int8|zstd", "raw", ...);
        the server's `uplink_codec`, when it sets one, takes precedence.
    error_feedback: keep per-client residuals in ``context.state`` across rounds (lossy codecs only;
        ignored for lossless ones).
    seed: seeds stochastic codecs; each reply uses seed, node and a per-client counter, so runs repeat
        without every round drawing the same random numbers.
    models: learned-codec model files (or loaded models) the server may ask for by fingerprint; the
        model of `codec` itself (``"cgfed:model=ae.safetensors"``) is always one of them.
    residual_decay: under partial participation a client's residual waits for its next round; it is
        multiplied by ``residual_decay ** missed_rounds`` first (1: keep it whole, 0: drop it; the
        server's round number comes with the handshake).
    measure: also report ``gradcodec.payload-bytes``, ``gradcodec.uncompressed-bytes``,
        ``gradcodec.message-bytes`` and ``gradcodec.uncompressed-message-bytes`` (for a server without
        `CompressedStrategy`, which measures all four itself; off by default: they cost reply bytes).

    Put it first in the ClientApp's mods so that other mods and the app see decoded arrays and the mod
    compresses their final reply. It adds ``gradcodec.encode-s``, the one figure the server cannot
    measure, to the reply's MetricRecord (or to a MetricRecord ``"__gradcodec__"`` when the reply has
    not exactly one); the server wrapper removes it again.
    """
    if not 0.0 <= residual_decay <= 1.0:
        raise InvalidInput(f"residual_decay must be in [0, 1], got {residual_decay}")
    own = gradcodec.get_codec(codec)  # fail on a bad spec when the app is built, not mid-run
    known = _learned_models(own, models)
    default = (own.spec, own.model.fingerprint.hex() if own.model is not None else "")

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.has_error() or not msg.has_content():
            return call_next(msg, context)
        request, lossy = _open_instruction(msg)
        if request is None or msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
            return call_next(msg, context)
        if request.get("v", _VERSION) != _VERSION:
            log(logging.WARNING, "gradcodec_mod: the server speaks protocol %s, this client %s; replying uncompressed", request.get("v"), _VERSION)
            return call_next(msg, context)
        asked = str(request.get("uplink") or "")
        spec, fingerprint = (asked, str(request.get("uplink-model") or "")) if asked else default
        received = {name: {k: _copy_array(a) for k, a in rec.items()} for name, rec in msg.content.array_records.items()}
        exact = set(received) - lossy  # references the server holds bit for bit

        reply = call_next(msg, context)
        if reply.has_error() or not reply.has_content():
            return reply
        try:
            model = _model_with(fingerprint, known) if fingerprint else None
            feedback = _Feedback(error_feedback, residual_decay, request.get("round"))
            return _compress_reply(reply, received, exact, spec, model, feedback, seed, context, measure)
        except GradcodecError as e:
            # E.g. NaN/Inf in the update. Send what the app made, and forget this codec's saved state
            # (residuals) so that stale state cannot make every later round fail too.
            for key in [k for k in context.state if k.startswith(STATE_PREFIX) and k not in (COUNTER_KEY, ROUNDS_KEY)]:
                del context.state[key]
            if _private(spec):  # the app's reply is the update before clipping and noise: never send it
                log(logging.WARNING, "gradcodec_mod: could not encode with %s (%s); replying with an error", spec, e)
                return Message(error=Error(code=_PRIVATE_FAILURE, reason=f"gradcodec: {type(e).__name__}: {e}"), reply_to=msg)
            log(logging.WARNING, "gradcodec_mod: could not compress the reply (%s); sending it uncompressed", e)
            return reply

    return mod


def _private(spec: str) -> bool:
    """Whether `spec` starts with a whole-update privacy stage (dp): its input must never travel as is."""
    try:
        return gradcodec.get_codec(spec).prepass is not None
    except GradcodecError:
        return False


def _open_instruction(msg: Message) -> tuple[ConfigRecord | None, set[str]]:
    """Remove the handshake and rebuild gradcodec records (with their ConfigRecords), in place.

    Returns the handshake (None when the server did not send one) and the names of the records that
    were decoded from a lossy payload.
    """
    content = msg.content
    request = content.get(HANDSHAKE_KEY)
    request = request if isinstance(request, ConfigRecord) else None
    compressed = [name for name, rec in content.items() if is_gradcodec_record(rec)]
    skip = {META_PREFIX + name for name in compressed} | ({HANDSHAKE_KEY} if request is not None else set())
    lossy: set[str] = set()
    if not skip:
        return None, lossy
    new = RecordDict()
    for name, rec in content.items():
        if name in skip:
            continue
        if name in compressed:
            rec, spec = _rebuild(rec, content.get(META_PREFIX + name))
            if not gradcodec.get_codec(spec).lossless:
                lossy.add(name)
        new[name] = rec
    msg.content = new
    return request, lossy


def _codec_for(spec: str, model: LearnedModel | None, error_feedback: bool, seed: int | None, context: Context):
    """(codec object, whether it is lossless) for one record of one reply; `model` for a learned codec."""
    lossless = gradcodec.get_codec(spec).lossless
    call_seed = None
    if seed is not None:
        counters = context.state.get(COUNTER_KEY)
        calls = int(counters["calls"]) if isinstance(counters, ConfigRecord) and "calls" in counters else 0
        context.state[COUNTER_KEY] = ConfigRecord({"calls": calls + 1})
        node = context.node_config.get("partition-id", context.node_id)
        digest = hashlib.sha256(f"{seed}:{node}:{calls}".encode()).digest()
        call_seed = int.from_bytes(digest[:8], "little") >> 1
    params = {"model": model} if model is not None else {}
    return gradcodec.get_codec(spec, error_feedback=error_feedback and not lossless, seed=call_seed, **params), lossless


def _state_keys(codec, name: str) -> tuple[str, str]:
    """The context.state keys of record `name`'s residuals and of `codec`'s own state for it.

    Residuals are kept apart from the codec: they are what the server has not yet received of this
    client's updates, so they belong to whichever codec the server asks for next (`round_codecs`).
    """
    return RESIDUALS_PREFIX + name, f"{STATE_PREFIX}{codec.spec}:{name}"


def _load_state(codec, context: Context, keys: tuple[str, str], record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Load the saved residuals and codec state; forget the residuals of arrays whose shape changed since.

    Returns the residuals this reply must carry itself: those an earlier lossy codec left waiting when
    `codec` has no error feedback (a lossless codec, or feedback off), which adds them to the update
    (`_split`) instead of keeping them. For a codec with error feedback, its own `residuals`.
    """
    saved: dict[str, torch.Tensor] = {}
    for key in keys:
        rec = context.state.get(key)
        if isinstance(rec, ArrayRecord):
            saved.update({k: t for k, a in rec.items() if (t := _to_tensor(a)) is not None})
    residuals = {k[len(RESIDUAL):]: saved.pop(k) for k in [k for k in saved if k.startswith(RESIDUAL)]}
    residuals = {k: r for k, r in residuals.items() if k not in record or tuple(r.shape) == tuple(record[k].shape)}
    keeps = isinstance(codec, gradcodec.ErrorFeedback)
    if keeps:
        saved.update({RESIDUAL + k: r for k, r in residuals.items()})
    try:
        codec.load_state_dict(saved)
    except GradcodecError as e:
        log(logging.WARNING, "gradcodec_mod: discarding saved codec state (%s)", e)
        codec.load_state_dict({})
    return codec.residuals if keeps else residuals


def _save_state(codec, context: Context, keys: tuple[str, str]) -> None:
    """Store what `_load_state` reads: the residuals under the record's key, the rest under the codec's."""
    state = codec.state_dict()
    residuals = {k: v for k, v in state.items() if k.startswith(RESIDUAL)} if isinstance(codec, gradcodec.ErrorFeedback) else {}
    own = {k: v for k, v in state.items() if k not in residuals}
    for key, part in zip(keys, (residuals, own)):
        if part:
            context.state[key] = ArrayRecord({k: _to_array(v) for k, v in part.items()})
        else:
            context.state.pop(key, None)


def _split(record: ArrayRecord, ref: Mapping[str, Array], residuals: Mapping[str, torch.Tensor], carry: bool,
           exact: bool, private: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Array]]:
    """What the payload carries for `record` (float updates against `ref`, integer and bool values),
    and the Arrays sent as they are.

    Keys returned bitwise unchanged with no residual waiting are in neither: the server has them.
    carry: add `residuals` to the updates (a codec without error feedback sending what a lossy one left).
    exact: the server holds `ref` bit for bit and the codec is lossless, so each update must rebuild
    its array bit for bit; arrays where float rounding prevents it are sent as they are.
    """
    tensors: dict[str, torch.Tensor] = {}
    as_is: dict[str, Array] = {}
    for key, array in record.items():
        base_array = ref.get(key)
        if base_array is not None and _same_array(array, base_array):
            residual = residuals.get(key)
            if residual is None or not bool(residual.any()):
                continue
        local = _to_tensor(array)
        if local is None:
            as_is[key] = array
            continue
        if not local.is_floating_point():
            tensors[key] = local
            continue
        base = _to_tensor(base_array) if base_array is not None else None
        if base is None or base.dtype != local.dtype or base.shape != local.shape:
            if private:
                raise InvalidInput(f"{key!r} has no reference of its shape to measure an update from, and its values"
                                   " cannot be sent as they are under a dp stage (they would skip clipping and noise)")
            as_is[key] = array  # no reference to measure an update from: the values, exactly
            continue
        update = _delta(local, base)
        if carry and key in residuals:
            tensors[key] = update + residuals[key]  # not the local array any more, by design: no exactness
        elif exact and not _bit_equal(_apply(base, update), local):
            as_is[key] = array
        else:
            tensors[key] = update
    return tensors, as_is


@dataclass
class _Feedback:
    """The mod's error-feedback settings for one reply: on/off, the decay of stale residuals, the round."""

    on: bool
    decay: float = 1.0
    server_round: Any = None

    def age(self, residuals: Mapping[str, torch.Tensor], state_key: str, context: Context) -> None:
        """Scale `residuals` by decay ** (rounds this client missed since it last sent)."""
        if not residuals or not isinstance(self.server_round, int):
            return
        rounds = context.state.get(ROUNDS_KEY)
        last = rounds.get(state_key) if isinstance(rounds, ConfigRecord) else None
        missed = self.server_round - last - 1 if isinstance(last, int) else 0
        if missed > 0 and self.decay < 1.0:
            for r in residuals.values():
                r.mul_(self.decay**missed)

    def commit(self, state_keys: Iterable[str], context: Context) -> None:
        if not isinstance(self.server_round, int):
            return
        rounds = context.state.get(ROUNDS_KEY)
        rounds = ConfigRecord(dict(rounds)) if isinstance(rounds, ConfigRecord) else ConfigRecord()
        for key in state_keys:
            rounds[key] = self.server_round
        context.state[ROUNDS_KEY] = rounds


def _compress_reply(
    reply: Message,
    received: dict[str, dict[str, Array]],
    exact: set[str],
    spec: str,
    model: LearnedModel | None,
    feedback: _Feedback,
    seed: int | None,
    context: Context,
    measure: bool,
) -> Message:
    """Replace, in place, each ArrayRecord of the reply that has a reference by a gradcodec record."""
    original_size = message_nbytes(reply) if measure else None
    t0 = time.perf_counter()
    new = RecordDict()
    metas: dict[str, ConfigRecord] = {}
    encoded: list[str] = []
    states: dict[tuple[str, str], Any] = {}  # state keys -> the codec that encoded the record
    payload = uncompressed = 0
    for name, rec in reply.content.items():
        ref_name = name if name in received else (next(iter(received)) if len(received) == 1 else None)
        if not isinstance(rec, ArrayRecord) or is_gradcodec_record(rec) or ref_name is None:
            new[name] = rec
            continue
        codec, lossless = _codec_for(spec, model, feedback.on, seed, context)
        keys = _state_keys(codec, name)
        residuals = _load_state(codec, context, keys, rec)
        feedback.age(residuals, keys[0], context)
        # Bit-exact rebuilding is only possible (and checked) against a reference the server holds as is.
        private = getattr(getattr(codec, "codec", codec), "prepass", None) is not None  # ErrorFeedback wraps it
        carry = not isinstance(codec, gradcodec.ErrorFeedback)
        tensors, as_is = _split(rec, received[ref_name], residuals, carry, lossless and ref_name in exact, private)
        # The server holds the reference: a payload of the full update names its layout by fingerprint.
        by_reference = gradcodec.Layout.of(tensors).fingerprint == update_layout(received[ref_name]).fingerprint
        new[name] = _make_record(codec.encode(tensors, by_reference=by_reference), as_is)
        names = list(rec.keys())
        same = names == list(received[ref_name])  # then the server knows them: see "Gradcodec records"
        if not same:
            metas[META_PREFIX + name] = ConfigRecord({"ref": ref_name, "keys": names})
        elif ref_name != name:
            metas[META_PREFIX + name] = ConfigRecord({"ref": ref_name})
        encoded.append(name)
        payload += _array_nbytes(new[name])
        uncompressed += _array_nbytes(rec)
        states[keys] = codec
    if not encoded:
        return reply
    # Commit codec state only once every record is encoded: a failure above leaves context.state as it was.
    for keys, codec in states.items():
        _save_state(codec, context, keys)
    feedback.commit([keys[0] for keys in states], context)
    for name, meta in metas.items():
        new[name] = meta
    reply.content = new
    if len(new.metric_records) == 1:
        target = next(iter(new.metric_records.values()))
    else:
        target = MetricRecord()
        new[METRICS_RECORD] = target
    target[METRIC_PREFIX + "encode-s"] = time.perf_counter() - t0
    if measure:
        target[METRIC_PREFIX + "payload-bytes"] = payload
        target[METRIC_PREFIX + "uncompressed-bytes"] = uncompressed
        target[METRIC_PREFIX + "uncompressed-message-bytes"] = original_size
        # The reported size is part of the message it measures: iterate to the fixed point (the
        # value's varint can grow by a byte a couple of times at most).
        size = 0
        for _ in range(5):
            target[METRIC_PREFIX + "message-bytes"] = size
            measured = message_nbytes(reply)
            if measured == size:
                break
            size = measured
    return reply


# ====================================================================== server side


@dataclass
class Transfer:
    """One message's bytes: a downlink instruction or an uplink reply."""

    node_id: int
    codec: str | None  # spec of the (first) gradcodec payload; None: sent uncompressed
    payload_bytes: int  # bytes of the arrays as sent (gradcodec payloads plus Arrays sent as they are)
    uncompressed_bytes: int  # bytes of the same arrays as Flower Arrays (numpy serialisation)
    message_bytes: int | None = None  # Flower wire size of the message as sent (see message_nbytes)
    uncompressed_message_bytes: int | None = None  # ... of the same message without compression
    seconds: float = 0.0  # server time to decode (uplink) or encode (downlink: once per distinct content)
    client: dict[str, float] = field(default_factory=dict)  # metrics the mod reported (uplink)

    @property
    def ratio(self) -> float:
        return self.uncompressed_bytes / self.payload_bytes if self.payload_bytes else float("nan")


@dataclass
class RoundStats:
    """Communication of one training round."""

    server_round: int
    uplink_codec: str | None = None  # what the server asked for (None: each client's choice)
    downlink_codec: str | None = None
    downlink: dict[int, Transfer] = field(default_factory=dict)  # by destination node
    uplink: dict[int, Transfer] = field(default_factory=dict)  # by source node, replies aggregated
    dropped: dict[int, str] = field(default_factory=dict)  # node -> why its reply was not aggregated

    def _sum(self, transfers: dict[int, Transfer], attr: str) -> int | None:
        values = [getattr(t, attr) for t in transfers.values()]
        return None if any(v is None for v in values) else sum(values)

    @property
    def uplink_payload_bytes(self) -> int:
        return self._sum(self.uplink, "payload_bytes") or 0

    @property
    def uplink_uncompressed_bytes(self) -> int:
        return self._sum(self.uplink, "uncompressed_bytes") or 0

    @property
    def uplink_message_bytes(self) -> int | None:
        return self._sum(self.uplink, "message_bytes")

    @property
    def uplink_uncompressed_message_bytes(self) -> int | None:
        return self._sum(self.uplink, "uncompressed_message_bytes")

    @property
    def downlink_message_bytes(self) -> int | None:
        return self._sum(self.downlink, "message_bytes")

    @property
    def downlink_uncompressed_message_bytes(self) -> int | None:
        return self._sum(self.downlink, "uncompressed_message_bytes")

    def summary(self) -> dict[str, Any]:
        return {
            "round": self.server_round,
            "clients": len(self.uplink),
            "dropped": len(self.dropped),
            "uplink_payload_bytes": self.uplink_payload_bytes,
            "uplink_uncompressed_bytes": self.uplink_uncompressed_bytes,
            "uplink_message_bytes": self.uplink_message_bytes,
            "uplink_uncompressed_message_bytes": self.uplink_uncompressed_message_bytes,
            "downlink_message_bytes": self.downlink_message_bytes,
            "downlink_uncompressed_message_bytes": self.downlink_uncompressed_message_bytes,
        }


class CompressedStrategy(Strategy):
    """Wrap any Flower 1.42 Strategy so that clients running `gradcodec_mod` upload compressed updates.

    strategy: the strategy to wrap; everything not listed here is delegated to it (attributes too).
    downlink_codec: also compress the arrays of TRAIN instructions (e.g. "bf16", "int8"); None sends them
        as the strategy made them. Clients decode them and measure their update from the decoded arrays.
    uplink_codec: the codec clients must use; None lets each client's mod choose. A learned codec names
        its model file (``"cgfed:model=ae.safetensors"``); clients are asked for that model by fingerprint.
    models: further learned-codec model files (or loaded models) to decode replies with, e.g. the
        models of clients that choose their own learned codec.
    measure: serialise messages to record their Flower wire size in `history` (costs one hashing pass
        over each distinct message).
    round_codecs: the uplink codec of particular rounds instead of `uplink_codec`, e.g. ``{60: "int4"}``
        to end a run of a 100x codec with one round at a higher rate: with error feedback the clients
        then send their update plus every residual still waiting (what a delayed codec owes the model),
        since a client's residuals carry over from one codec to another.

    `history` maps each training round to a `RoundStats`. The aggregated train MetricRecord gains
    ``gradcodec.uplink-payload-bytes`` and ``gradcodec.uplink-message-bytes`` (totals over the round).
    """

    def __init__(self, strategy: Strategy, downlink_codec: str | None = None, uplink_codec: str | None = None, *,
                 models: Sequence[str | LearnedModel] = (), measure: bool = True,
                 round_codecs: Mapping[int, str] | None = None):
        self.strategy = strategy
        self.downlink_codec = gradcodec.get_codec(downlink_codec).spec if downlink_codec else None
        uplink = gradcodec.get_codec(uplink_codec) if uplink_codec else None
        self.uplink_codec = uplink.spec if uplink is not None else None
        if bad := [r for r in (round_codecs or {}) if not isinstance(r, int) or isinstance(r, bool) or r < 1]:
            raise InvalidInput(f"round_codecs: rounds are server rounds (integers from 1), got {bad}")
        by_round = {r: gradcodec.get_codec(s) for r, s in (round_codecs or {}).items()}
        self.round_codecs = {r: c.spec for r, c in by_round.items()}
        self.models = _learned_models(uplink, models) + [c.model for c in by_round.values() if c.model is not None]
        # The model each uplink spec asks the clients for, by fingerprint ("" for codecs without one).
        self._fingerprints = {c.spec: c.model.fingerprint.hex() for c in (uplink, *by_round.values())
                              if c is not None and c.model is not None}
        self.measure = measure
        self.history: dict[int, RoundStats] = {}
        self._sent: list[tuple[Message, RecordDict]] = []

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes the wrapper lacks: delegate them to the wrapped strategy.
        if name.startswith("__") or "strategy" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["strategy"], name)

    def summary(self) -> None:
        self.strategy.summary()
        log(
            logging.INFO,
            "\t└──> gradcodec: uplink %s | downlink %s",
            self.uplink_codec or "client's choice",
            self.downlink_codec or "uncompressed",
        )

    # ------------------------------------------------------------------ train

    def uplink_for(self, server_round: int) -> str | None:
        """The uplink codec spec the clients are asked for in `server_round` (None: each client's choice)."""
        return self.round_codecs.get(server_round, self.uplink_codec)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        stats = RoundStats(server_round, self.uplink_for(server_round), self.downlink_codec)
        self.history[server_round] = stats
        self._sent = []
        converted: dict[int, tuple[RecordDict, Transfer]] = {}
        size_cache: dict[str, int] = {}
        for msg in messages:
            if msg.has_error() or not msg.has_content():
                continue
            original = msg.content
            node = msg.metadata.dst_node_id
            before = message_nbytes(msg, size_cache) if self.measure else None
            if id(original) not in converted:
                converted[id(original)] = self._prepare(original, server_round)
            new, template = converted[id(original)]
            msg.content = new
            stats.downlink[node] = Transfer(
                node,
                template.codec,
                template.payload_bytes,
                template.uncompressed_bytes,
                message_nbytes(msg, size_cache) if self.measure else None,
                before,
                template.seconds,
            )
            self._sent.append((msg, original))
        return messages

    def _prepare(self, original: RecordDict, server_round: int) -> tuple[RecordDict, Transfer]:
        """The content to send instead of `original`: the handshake added, arrays compressed if asked."""
        t0 = time.perf_counter()
        new = RecordDict()
        metas: dict[str, ConfigRecord] = {}
        payload = uncompressed = 0
        spec = None
        for name, rec in original.items():
            if isinstance(rec, ArrayRecord):
                uncompressed += _array_nbytes(rec)
                if self.downlink_codec:
                    try:
                        rec, metas[META_PREFIX + name] = self._encode_downlink(rec)
                        spec = self.downlink_codec
                    except GradcodecError as e:
                        log(logging.WARNING, "CompressedStrategy: sending %r uncompressed (%s)", name, e)
                payload += _array_nbytes(rec)
            new[name] = rec
        for name, meta in metas.items():
            new[name] = meta
        uplink = self.uplink_for(server_round) or ""
        handshake = {"v": _VERSION, "uplink": uplink, "round": server_round}
        if fingerprint := self._fingerprints.get(uplink):
            handshake["uplink-model"] = fingerprint
        new[HANDSHAKE_KEY] = ConfigRecord(handshake)
        return new, Transfer(-1, spec, payload, uncompressed, seconds=time.perf_counter() - t0)

    def _encode_downlink(self, rec: ArrayRecord) -> tuple[ArrayRecord, ConfigRecord]:
        """A gradcodec record of values: every Array gradcodec carries goes in one payload."""
        tensors: dict[str, torch.Tensor] = {}
        as_is: dict[str, Array] = {}
        for key, array in rec.items():
            t = _to_tensor(array)
            if t is None:
                as_is[key] = array
            else:
                tensors[key] = t
        return _make_record(gradcodec.encode(tensors, self.downlink_codec), as_is), ConfigRecord({"keys": list(rec.keys())})

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.history.setdefault(server_round, RoundStats(server_round, self.uplink_for(server_round), self.downlink_codec))
        by_id = {m.metadata.message_id: c for m, c in self._sent if m.metadata.message_id}
        by_node = {m.metadata.dst_node_id: c for m, c in self._sent}
        shared = {id(c) for _, c in self._sent}
        fallback = self._sent[0][1] if len(shared) == 1 else None
        kept = []
        tensor_cache: dict[int, torch.Tensor] = {}  # reference tensors, converted once per round
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                reason = f"error reply (code {reply.error.code}): {reply.error.reason}"
                log(logging.WARNING, "CompressedStrategy: dropping the reply of node %s: %s", node, reason)
                stats.dropped[node] = reason
                continue
            sent = by_id.get(reply.metadata.reply_to_message_id) or by_node.get(node) or fallback
            try:
                stats.uplink[node] = self._restore(reply, sent, tensor_cache)
            except Exception as e:  # noqa: BLE001 - one bad reply must never cost the others their round
                reason = f"{type(e).__name__}: {e}"
                log(logging.WARNING, "CompressedStrategy: dropping the reply of node %s: %s", node, reason)
                stats.dropped[node] = reason
                continue
            kept.append(reply)
        self._sent = []
        arrays, metrics = self.strategy.aggregate_train(server_round, kept)
        if kept:
            metrics = MetricRecord(dict(metrics.items())) if metrics is not None else MetricRecord()
            metrics[METRIC_PREFIX + "uplink-payload-bytes"] = stats.uplink_payload_bytes
            if stats.uplink_message_bytes is not None:
                metrics[METRIC_PREFIX + "uplink-message-bytes"] = stats.uplink_message_bytes
        return arrays, metrics

    def _restore(self, reply: Message, sent: RecordDict | None, cache: dict[int, torch.Tensor]) -> Transfer:
        """Rebuild, in place, the reply the app made; return its Transfer. Raises on anything malformed."""
        content = reply.content
        received = message_nbytes(reply) if self.measure else None
        t0 = time.perf_counter()
        sent_records = dict(sent.array_records.items()) if sent is not None else {}
        compressed = [name for name, rec in content.items() if is_gradcodec_record(rec)]
        metas = {META_PREFIX + name for name in compressed}
        new = RecordDict()
        client: dict[str, float] = {}
        payload = 0
        spec = None
        for name, rec in content.items():
            if name in metas:
                continue
            if isinstance(rec, MetricRecord):
                kept = MetricRecord()
                for k, v in rec.items():
                    if k.startswith(METRIC_PREFIX):
                        client[k[len(METRIC_PREFIX):]] = v
                    else:
                        kept[k] = v
                if name == METRICS_RECORD and not len(kept):
                    continue
                new[name] = kept
            elif name in compressed:
                meta = content.get(META_PREFIX + name)
                ref_name = meta.get("ref") if isinstance(meta, ConfigRecord) else name
                if not isinstance(ref_name, str) or ref_name not in sent_records:
                    raise CorruptPayload(f"gradcodec record {name!r}: {META_PREFIX + name!r} names no reference sent to this node")
                new[name], record_spec = _rebuild(rec, meta, sent_records[ref_name], cache, self.models)
                spec = spec or record_spec
                payload += _array_nbytes(rec)
            else:
                if isinstance(rec, ArrayRecord):
                    payload += _array_nbytes(rec)
                new[name] = rec
        uncompressed = sum(_array_nbytes(r) for r in new.array_records.values())
        reply.content = new
        seconds = time.perf_counter() - t0
        original = message_nbytes(reply) if self.measure else None
        return Transfer(reply.metadata.src_node_id, spec, payload, uncompressed, received, original, seconds, client)

    # ------------------------------------------------------------------ evaluation: unchanged

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
