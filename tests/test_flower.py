"""The Flower 1.42 integration: client mod + strategy wrapper, by hand and in Flower's simulation engine.

Unit tests call the mod and the wrapper's methods with hand-built Messages, carried between "server"
and "client" through Flower's own protobuf serde (what a deployment does). Two simulations run one
small linear-regression app, unmodified: once plain, once with the mod in its ClientApp and the
strategy wrapped (raw, int8, and int8 with a bf16 downlink, run back to back on the same nodes).
"""
from __future__ import annotations

import math
import os
import uuid

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg, Strategy  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

import gradcodec  # noqa: E402
from gradcodec.integrations.flower import (  # noqa: E402
    HANDSHAKE_KEY,
    META_PREFIX,
    RECORD_KEY,
    RESIDUALS_PREFIX,
    STYPE,
    CompressedStrategy,
    gradcodec_mod,
    is_gradcodec_record,
    message_nbytes,
)

# ====================================================================== helpers for hand-built rounds


@pytest.fixture
def task_identity(monkeypatch):
    """Message() needs the process's task identity, which a ServerApp/ClientApp process has."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def wire(msg: Message) -> Message:
    """What the other side receives: the Message through Flower's protobuf serde."""
    return message_from_proto(message_to_proto(msg))


def send(messages) -> list[Message]:
    """Push like a Grid does (message ids), then deliver serialised copies."""
    out = []
    for m in messages:
        m.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        out.append(wire(m))
    return out


def new_context(node_id: int) -> Context:
    return Context(run_id=1, node_id=node_id, node_config={"partition-id": node_id}, state=RecordDict(), run_config={})


def fedavg(n=3):
    return FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)


def model(seed=0):
    rng = np.random.default_rng(seed)
    return ArrayRecord(
        {
            "w": Array(rng.standard_normal((64, 48)).astype(np.float32)),
            "b": Array(rng.standard_normal(48).astype(np.float32)),
            "scale": Array(np.array(0.5, dtype=np.float32)),  # 0-d
            "empty": Array(np.zeros((0, 3), np.float32)),
            "half": Array(rng.standard_normal(40).astype(np.float16)),
            "double": Array(rng.standard_normal(40)),
            "steps": Array(np.array([7], dtype=np.int64)),
            "mask": Array(rng.random(30) > 0.5),
            "codes": Array(rng.integers(0, 255, 17, dtype=np.uint8)),
            "wide": Array(rng.integers(0, 60000, 9).astype(np.uint16)),  # no gradcodec dtype: passes through
        }
    )


def arrays_of(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def local_update(received: dict[str, np.ndarray], node: int) -> dict[str, np.ndarray]:
    """A client's training: float arrays move, integer/bool buffers change, one float array stays."""
    rng = np.random.default_rng(100 + node)
    out = dict(received)
    out["w"] = (received["w"] + 0.01 * rng.standard_normal(received["w"].shape)).astype(np.float32)
    out["scale"] = np.asarray(received["scale"] * np.float32(1.5))
    out["half"] = (received["half"] + np.float16(0.01) * node).astype(np.float16)
    out["double"] = received["double"] * (1 + 1e-3 * node)
    out["steps"] = received["steps"] + node
    out["mask"] = ~received["mask"]
    out["wide"] = received["wide"] + np.uint16(node)
    return out  # "b" and "codes" unchanged


def make_app(update_fn=local_update, seen=None):
    def train(msg: Message, context: Context) -> Message:
        received = arrays_of(msg.content["arrays"])
        if seen is not None:
            seen[context.node_id] = (list(msg.content.keys()), received)
        out = update_fn(received, context.node_id)
        return Message(
            RecordDict(
                {"arrays": ArrayRecord({k: Array(v) for k, v in out.items()}), "metrics": MetricRecord({"num-examples": 10 * context.node_id, "loss": 1.0})}
            ),
            reply_to=msg,
        )

    return train


def run_round(strategy, global_arrays, app, mod, contexts, server_round=1):
    """configure_train -> serde -> mod(app) -> serde -> aggregate_train.

    Returns the aggregate and the replies, which aggregate_train has restored in place."""
    sent = list(strategy.configure_train(server_round, global_arrays, ConfigRecord({"lr": 0.1}), FakeGrid(contexts)))
    sent.sort(key=lambda m: m.metadata.dst_node_id)  # FedAvg samples in random order; float sums do not commute
    replies = []
    for msg in send(sent):
        ctx = contexts[msg.metadata.dst_node_id]
        replies.append(wire(mod(msg, ctx, app)) if mod else wire(app(msg, ctx)))
    return strategy.aggregate_train(server_round, replies), replies


def bits(a: np.ndarray) -> bytes:
    return a.dtype.str.encode() + str(a.shape).encode() + a.tobytes()


# ====================================================================== unit tests


def test_raw_is_bit_exact_for_every_dtype_and_smaller_on_the_wire(task_identity):
    g = model()
    contexts = {n: new_context(n) for n in (1, 2, 3)}
    (ref_arrays, ref_metrics), _ = run_round(fedavg(), g, make_app(), None, {n: new_context(n) for n in (1, 2, 3)})
    wrapper = CompressedStrategy(fedavg())
    (arrays, metrics), compressed = run_round(wrapper, g, make_app(), gradcodec_mod("raw", measure=True), contexts)
    assert list(arrays.keys()) == list(ref_arrays.keys())
    for k in ref_arrays.keys():
        assert bits(arrays[k].numpy()) == bits(ref_arrays[k].numpy()), k
    assert metrics["loss"] == ref_metrics["loss"]
    # aggregate_train restored the replies in place: the wrapped FedAvg saw the app's records
    assert not any(is_gradcodec_record(r.content["arrays"]) for r in compressed)
    stats = wrapper.history[1]
    assert set(stats.uplink) == {1, 2, 3} and not stats.dropped
    for node, t in stats.uplink.items():
        # "b" and "codes" were returned unchanged and are not sent; the rest is raw, so smaller anyway.
        assert t.payload_bytes < t.uncompressed_bytes
        assert t.message_bytes < t.uncompressed_message_bytes
        assert t.client["message-bytes"] == t.message_bytes  # the mod measures what the server receives
        assert t.codec == "raw"


def test_a_compressed_record_is_one_payload_and_nothing_the_server_knows(task_identity):
    """Uplink layout: one gradcodec payload (float updates, integer values), the Arrays gradcodec cannot
    carry as they are; no ConfigRecord when the reply keeps the reference's name and keys, and only the
    encode time among the metrics."""
    g = model()
    contexts = {1: new_context(1), 2: new_context(2)}
    wrapper = CompressedStrategy(fedavg(2))
    replies = []
    for msg in send(wrapper.configure_train(1, g, ConfigRecord(), FakeGrid(contexts))):
        node = msg.metadata.dst_node_id
        reply = gradcodec_mod("int8")(msg, contexts[node], make_app())
        record = reply.content["arrays"]
        assert list(record.keys()) == [RECORD_KEY, "wide"] and record[RECORD_KEY].stype == STYPE
        assert META_PREFIX + "arrays" not in reply.content  # same name and keys as the reference: nothing to say
        assert [k for m in reply.content.metric_records.values() for k in m if k.startswith("gradcodec.")] == ["gradcodec.encode-s"]
        payload = gradcodec.decode(record[RECORD_KEY].data)  # a partial update: self-describing
        assert list(payload) == ["w", "scale", "half", "double", "steps", "mask"]  # "b", "empty", "codes" unchanged
        assert {payload[k].dtype for k in ("w", "scale", "half", "double")} == {torch.float32}  # updates
        assert bits(payload["steps"].numpy()) == bits(local_update(arrays_of(g), node)["steps"])  # values
        replies.append(wire(reply))
    node_2 = next(r for r in replies if r.metadata.src_node_id == 2)  # Flower samples nodes in random order
    node_2.content[META_PREFIX + "arrays"] = ConfigRecord({"ref": "elsewhere"})  # a reference never sent
    wrapper.aggregate_train(1, replies)
    assert set(wrapper.history[1].uplink) == {1} and "CorruptPayload" in wrapper.history[1].dropped[2]


def test_lossless_update_falls_back_to_values_where_float_rounding_cannot_rebuild(task_identity):
    # 1.0 -> 1e-8: the float32 update (1e-8 - 1) rounds to -1 + 2^-24, and 1.0 + that is not 1e-8.
    g = ArrayRecord({"x": Array(np.array([1.0, 2.0, -3.0], np.float32))})
    target = np.array([1e-8, 2.5, 3.0], np.float32)
    assert np.float32(1.0) + (target[0] - np.float32(1.0)) != target[0]
    wrapper = CompressedStrategy(fedavg(1))
    (arrays, _), _ = run_round(wrapper, g, make_app(lambda r, n: {"x": target}), gradcodec_mod("raw"), {5: new_context(5)})
    assert bits(arrays["x"].numpy()) == bits(target)


def test_a_full_update_names_its_layout_by_reference_and_a_changed_reference_is_refused(task_identity):
    """When every key moves, the payload carries no names, dtypes or shapes (the server rebuilds them
    from the arrays it sent); decoded against arrays of another shape it is dropped, never misread."""
    g = ArrayRecord({"layer.lora_A": Array(np.zeros((4, 8), np.float32)), "layer.lora_B": Array(np.ones((8, 4), np.float16))})
    moved = {"layer.lora_A": np.full((4, 8), 0.5, np.float32), "layer.lora_B": np.full((8, 4), 2.0, np.float16)}
    wrapper = CompressedStrategy(fedavg(1))
    (arrays, _), (reply,) = run_round(wrapper, g, make_app(lambda r, n: moved), gradcodec_mod("int8"), {1: new_context(1)})
    np.testing.assert_allclose(arrays["layer.lora_A"].numpy(), moved["layer.lora_A"], atol=1e-6)
    np.testing.assert_array_equal(arrays["layer.lora_B"].numpy(), moved["layer.lora_B"])

    contexts = {1: new_context(1)}
    msg = send(wrapper.configure_train(2, g, ConfigRecord(), FakeGrid(contexts)))[0]
    reply = wire(gradcodec_mod("int8")(msg, contexts[1], make_app(lambda r, n: moved)))
    blob = reply.content["arrays"][RECORD_KEY].data
    info = gradcodec.inspect(blob, layout={"layer.lora_A": torch.zeros(4, 8), "layer.lora_B": torch.zeros(8, 4)})
    assert info.by_reference and "layer" not in blob.decode("latin-1")  # no names on the wire
    other = ArrayRecord({"layer.lora_A": Array(np.zeros((8, 4), np.float32)), "layer.lora_B": Array(np.ones((8, 4), np.float16))})
    wrapper._sent = [(msg, RecordDict({"arrays": other}))]  # as if the server had sent another shape
    wrapper.aggregate_train(2, [reply])
    assert "LayoutMismatch" in wrapper.history[2].dropped[1]


@pytest.mark.parametrize("decay", [1.0, 0.5, 0.0])
def test_a_stale_residual_is_decayed_by_the_rounds_its_client_missed(task_identity, decay):
    """Sampled in round 1, then in round 4: before encoding, the residual is scaled by decay**2; with
    no new update, what round 4 sends plus what it keeps back is exactly that scaled residual."""
    g = ArrayRecord({"x": Array(np.zeros(256, np.float32))})
    rng = np.random.default_rng(0)
    moved = (rng.standard_normal(256) * np.logspace(-3, 0, 256)).astype(np.float32)
    wrapper, ctx = CompressedStrategy(fedavg(1)), new_context(1)
    mod = gradcodec_mod("int4", residual_decay=decay)
    (arrays, _), _ = run_round(wrapper, g, make_app(lambda r, n: {"x": moved}), mod, {1: ctx}, 1)
    state_key = RESIDUALS_PREFIX + "arrays"
    before = ctx.state[state_key]["residual.x"].numpy().copy()
    assert np.abs(before).max() > 0
    g4 = ArrayRecord({"x": Array(arrays["x"].numpy())})
    (arrays4, _), _ = run_round(wrapper, g4, make_app(lambda r, n: {"x": r["x"]}), mod, {1: ctx}, 4)  # no new update
    sent = arrays4["x"].numpy() - g4["x"].numpy()
    after = ctx.state[state_key]["residual.x"].numpy() if state_key in ctx.state else np.zeros(256, np.float32)
    np.testing.assert_allclose(sent + after, decay**2 * before, atol=5e-7)  # float32 rounding of g + update - g
    assert ctx.state["gradcodec:rounds"][state_key] == 4


def test_round_codecs_switch_the_uplink_and_the_next_codec_sends_the_residuals_left_waiting(task_identity):
    """Two rounds of top-k 1 %, then a round of int8 (`round_codecs`): each round's payload has the codec
    asked for, and the int8 round carries what top-k held back: after it, everything sent plus the client's
    residual is the sum of its updates, and the residual is int8-small. A later lossless round sends all
    that is left."""
    n = 4096
    g = ArrayRecord({"x": Array(np.zeros(n, np.float32))})
    updates = [np.random.default_rng(r).standard_normal(n).astype(np.float32) for r in range(3)]
    wrapper = CompressedStrategy(fedavg(1), uplink_codec="topk:ratio=0.01|raw", round_codecs={3: "int8", 5: "raw"})
    topk, int8 = gradcodec.get_codec("topk:ratio=0.01|raw").spec, gradcodec.get_codec("int8").spec
    assert [wrapper.uplink_for(r) for r in (1, 2, 3, 4, 5)] == [topk, topk, int8, topk, "raw"]
    ctx, mod = new_context(1), gradcodec_mod("raw")
    total = np.zeros(n, np.float32)
    for r, u in enumerate(updates, start=1):
        current = ArrayRecord({"x": Array(total.copy())})
        (arrays, _), (reply,) = run_round(wrapper, current, make_app(lambda rec, node, u=u: {"x": rec["x"] + u}), mod, {1: ctx}, r)
        assert wrapper.history[r].uplink[1].codec == wrapper.uplink_for(r)
        total = arrays["x"].numpy()
        residual = ctx.state[RESIDUALS_PREFIX + "arrays"]["residual.x"].numpy()
        np.testing.assert_allclose(total + residual, np.sum(updates[:r], axis=0), atol=1e-4)
        if r < 3:
            assert np.abs(residual).max() > 1.0  # top-k 1 % leaves most of the update waiting
    assert np.linalg.norm(residual) < 0.02 * np.linalg.norm(np.sum(updates, axis=0))  # flushed by int8
    # Round 4 (top-k again) holds most of its update back; round 5 is lossless, has no error feedback,
    # and sends the update plus everything waiting: nothing is left behind, and nothing is lost.
    for r in (4, 5):
        u = np.random.default_rng(r + 10).standard_normal(n).astype(np.float32)
        updates.append(u)
        current = ArrayRecord({"x": Array(total.copy())})
        (arrays, _), _ = run_round(wrapper, current, make_app(lambda rec, node, u=u: {"x": rec["x"] + u}), mod, {1: ctx}, r)
        total = arrays["x"].numpy()
    assert wrapper.history[5].uplink[1].codec == "raw"
    assert RESIDUALS_PREFIX + "arrays" not in ctx.state
    np.testing.assert_allclose(total, np.sum(updates, axis=0), atol=1e-4)
    with pytest.raises(gradcodec.errors.UnknownCodec):
        CompressedStrategy(fedavg(1), round_codecs={3: "nonsense"})
    with pytest.raises(gradcodec.errors.InvalidInput, match="rounds are server rounds"):
        CompressedStrategy(fedavg(1), round_codecs={"3": "int8"})


@pytest.mark.parametrize("case", ["nan", "new key"])
def test_a_dp_reply_that_cannot_be_encoded_is_withheld_not_sent_as_is(task_identity, case):
    """Under dp the app's reply is the un-noised update: where the mod would send it uncompressed it
    answers with an error instead, and the server drops that node."""
    g = ArrayRecord({"x": Array(np.zeros(16, np.float32))})
    moved = {"nan": {"x": np.full(16, np.nan, np.float32)},
             "new key": {"x": np.ones(16, np.float32), "fresh": np.ones(3, np.float32)}}[case]
    wrapper = CompressedStrategy(fedavg(1), uplink_codec="dp:clip=1.0,noise=0.5|int8")
    _, (reply,) = run_round(wrapper, g, make_app(lambda r, n: moved), gradcodec_mod("int8"), {1: new_context(1)})
    assert reply.has_error() and "gradcodec" in reply.error.reason
    assert 1 in wrapper.history[1].dropped


def test_keys_order_dropped_and_new_arrays_are_restored(task_identity):
    g = model()

    def reshuffle(received, node):
        out = {k: received[k] for k in reversed(list(received)) if k != "half"}  # new order, one dropped
        out["w"] = out["w"] + np.float32(1)
        out["extra"] = np.arange(5, dtype=np.float32)  # not in the global: sent as values
        return out

    wrapper = CompressedStrategy(fedavg(1))
    _, (reply,) = run_round(wrapper, g, make_app(reshuffle), gradcodec_mod("int8"), {4: new_context(4)})
    arrays = reply.content["arrays"]  # restored in place for the wrapped strategy
    expected = reshuffle(arrays_of(g), 4)
    assert list(arrays.keys()) == list(expected)
    for k, v in expected.items():
        if k != "w":
            assert bits(arrays[k].numpy()) == bits(v), k
    np.testing.assert_allclose(arrays["w"].numpy(), expected["w"], atol=1e-6)  # update is exactly 1.0


@pytest.mark.parametrize("spec", ["int4", "topk:ratio=0.05|int8|zstd", "powersgd", "sign", "qsgd", "bf16", "zstd"])
def test_any_codec_carries_the_update_and_the_buffers(task_identity, spec):
    g = model()
    wrapper = CompressedStrategy(fedavg(1))
    _, (reply,) = run_round(wrapper, g, make_app(), gradcodec_mod(spec, seed=1), {2: new_context(2)})
    restored, expected = arrays_of(reply.content["arrays"]), local_update(arrays_of(g), 2)
    assert list(restored) == list(expected)
    for k, v in expected.items():
        assert restored[k].dtype == v.dtype and restored[k].shape == v.shape, k
        if v.dtype.kind != "f":
            assert bits(restored[k]) == bits(v), k
    sent, true = restored["w"] - arrays_of(g)["w"], expected["w"] - arrays_of(g)["w"]
    assert np.linalg.norm(sent - true) < np.linalg.norm(true)  # better than sending nothing
    t = wrapper.history[1].uplink[2]
    assert t.payload_bytes < t.uncompressed_bytes and t.codec == gradcodec.get_codec(spec).spec


def test_learned_codec_is_asked_for_by_fingerprint_and_decoded_with_its_model(task_identity, tmp_path):
    from gradcodec.learned.tgap import TrainConfig, train_autoencoder

    from .test_learned_codec import ARCHS, LAYOUT, SHAPES, trained, update
    from .test_learned_model import low_rank_set

    ae = trained("block")
    other = train_autoencoder(low_rank_set(40, LAYOUT, seed=1), ARCHS["block"], TrainConfig(steps=0))  # another AE
    path = tmp_path / "ae.safetensors"
    ae.save(path)
    g = ArrayRecord({k: Array(np.full(shape, 0.5, np.float32)) for k, shape in SHAPES.items()})
    delta = {k: v.numpy() for k, v in update().items()}

    def train(received, node):
        return {k: received[k] + delta[k] for k in received}

    wrapper = CompressedStrategy(fedavg(1), uplink_codec=f"cgfed:model={path}")
    # The client's own default is int8; it holds the server's AE among other models.
    _, (reply,) = run_round(wrapper, g, make_app(train), gradcodec_mod("int8", models=[other, str(path)]), {1: new_context(1)})
    assert wrapper.history[1].uplink[1].codec == gradcodec.get_codec("cgfed", model=ae).spec
    sent = {k: torch.from_numpy(a - 0.5) for k, a in arrays_of(reply.content["arrays"]).items()}
    expected = gradcodec.decode(gradcodec.encode({k: torch.from_numpy(v) for k, v in delta.items()}, "cgfed", model=ae), models=[ae])
    assert all(torch.allclose(sent[k], expected[k], atol=1e-6) for k in SHAPES)  # first round: no residual yet
    # A client without that model trains as usual and replies uncompressed; the round aggregates it.
    (arrays, _), _ = run_round(wrapper, g, make_app(train), gradcodec_mod("int8", models=[other]), {2: new_context(2)}, 2)
    assert wrapper.history[2].uplink[2].codec is None and not wrapper.history[2].dropped
    assert np.array_equal(arrays["l0.q.lora_A"].numpy(), train(arrays_of(g), 2)["l0.q.lora_A"])


def test_reply_record_with_another_name_is_relative_to_the_one_received(task_identity):
    g = model()

    def app(msg, context):
        received = arrays_of(msg.content["arrays"])
        out = local_update(received, 1)
        return Message(
            RecordDict({"model": ArrayRecord({k: Array(v) for k, v in out.items()}), "m": MetricRecord({"num-examples": 1})}),
            reply_to=msg,
        )

    wrapper = CompressedStrategy(fedavg(1))
    _, (reply,) = run_round(wrapper, g, app, gradcodec_mod("raw"), {1: new_context(1)})
    expected = local_update(arrays_of(g), 1)
    assert list(reply.content.keys()) == ["model", "m"]
    assert {k: bits(v) for k, v in arrays_of(reply.content["model"]).items()} == {k: bits(v) for k, v in expected.items()}
    assert wrapper.history[1].uplink[1].payload_bytes < wrapper.history[1].uplink[1].uncompressed_bytes  # unchanged not sent


def test_an_update_gradcodec_refuses_is_sent_uncompressed(task_identity):
    g = model()

    def nan_update(received, node):
        out = local_update(received, node)
        out["w"] = out["w"].copy()
        out["w"][0, 0] = np.nan
        return out

    ctx = new_context(1)
    wrapper = CompressedStrategy(fedavg(1))
    run_round(wrapper, g, make_app(), gradcodec_mod("int8"), {1: ctx})
    assert RESIDUALS_PREFIX + "arrays" in ctx.state  # residuals saved
    _, (reply,) = run_round(wrapper, g, make_app(nan_update), gradcodec_mod("int8"), {1: ctx}, 2)
    assert wrapper.history[2].uplink[1].codec is None  # arrived as the app made it
    assert np.isnan(reply.content["arrays"]["w"].numpy()[0, 0])
    assert RESIDUALS_PREFIX + "arrays" not in ctx.state  # and the stale residuals are gone


def test_mod_does_nothing_without_the_handshake(task_identity):
    g = model()
    msg = wire(Message(RecordDict({"arrays": g, "config": ConfigRecord({"lr": 0.1})}), dst_node_id=3, message_type=MessageType.TRAIN))
    app = make_app()
    plain = app(wire(msg), new_context(3))
    out = gradcodec_mod("int8")(wire(msg), new_context(3), app)
    assert not is_gradcodec_record(out.content["arrays"])
    assert out.content["metrics"] == plain.content["metrics"]
    assert [bits(a) for a in arrays_of(out.content["arrays"]).values()] == [bits(a) for a in arrays_of(plain.content["arrays"]).values()]
    # FedAvg aggregates it as usual; a wrapped strategy accepts uncompressed replies too.
    wrapper = CompressedStrategy(fedavg(1))
    (arrays, _), _ = run_round(wrapper, g, app, None, {3: new_context(3)})
    assert wrapper.history[1].uplink[3].codec is None
    assert bits(arrays["w"].numpy()) == bits(plain.content["arrays"]["w"].numpy())


def test_error_feedback_state_persists_in_context_state_and_survives_missed_rounds(task_identity):
    n = 3000
    g = ArrayRecord({"x": Array(np.zeros(n, np.float32))})
    updates = [np.random.default_rng(r).standard_normal(n).astype(np.float32) * (1 + r) for r in range(3)]
    ctx = new_context(7)
    state_key = RESIDUALS_PREFIX + "arrays"
    wrapper = CompressedStrategy(fedavg(1))
    total_sent = np.zeros(n, np.float32)
    global_np = arrays_of(g)["x"]
    for r, u in enumerate(updates):
        app = make_app(lambda rec, node, u=u: {"x": rec["x"] + u})
        (arrays, _), _ = run_round(wrapper, ArrayRecord({"x": Array(global_np)}), app, gradcodec_mod("int4"), {7: ctx}, r + 1)
        total_sent += arrays["x"].numpy() - global_np
        global_np = arrays["x"].numpy()
        residual = ctx.state[state_key]["residual.x"].numpy()
        # Error feedback: everything lost so far is exactly the residual still held by the client.
        np.testing.assert_allclose(total_sent + residual, np.sum(updates[: r + 1], axis=0), atol=1e-4)
        assert np.abs(residual).max() > 0
        # The state survives Flower's Context serialisation (how a deployed SuperNode keeps it).
        ctx = context_from_proto(context_to_proto(ctx))
        if r == 0:
            # Node 7 misses a round in which another node moves the global; its residual waits.
            other = new_context(8)
            moved = make_app(lambda rec, node: {"x": rec["x"] + np.float32(0.5)})
            (arrays, _), _ = run_round(wrapper, ArrayRecord({"x": Array(global_np)}), moved, gradcodec_mod("int4"), {8: other}, 50)
            global_np = arrays["x"].numpy()
            assert other.state[state_key]["residual.x"].numpy().shape == (n,)  # each node has its own


def test_a_reply_that_fails_to_decode_or_errs_is_dropped_and_the_rest_aggregate(task_identity):
    g = model()
    contexts = {n: new_context(n) for n in (1, 2, 3, 4)}
    wrapper = CompressedStrategy(fedavg(4))
    sent = list(wrapper.configure_train(1, g, ConfigRecord(), FakeGrid(contexts)))
    replies = []
    for msg in send(sent):
        node = msg.metadata.dst_node_id
        if node == 4:
            replies.append(Message(Error(code=2, reason="client crashed"), reply_to=msg))
            continue
        reply = gradcodec_mod("int8")(msg, contexts[node], make_app())
        if node == 2:
            array = reply.content["arrays"][RECORD_KEY]
            data = bytearray(array.data)
            data[-10] ^= 0xFF  # inside the last gradcodec payload: its CRC no longer matches
            array.data = bytes(data)
        replies.append(wire(reply))
    arrays, metrics = wrapper.aggregate_train(1, replies)
    stats = wrapper.history[1]
    assert set(stats.uplink) == {1, 3}
    assert set(stats.dropped) == {2, 4}
    assert "CorruptPayload" in stats.dropped[2] and "client crashed" in stats.dropped[4]
    # The aggregate is FedAvg over nodes 1 and 3 (weights 10 and 30) of their (int8-coded) arrays.
    want = (10 * local_update(arrays_of(g), 1)["steps"] + 30 * local_update(arrays_of(g), 3)["steps"]) / 40
    np.testing.assert_array_equal(arrays["steps"].numpy(), want)
    assert metrics["gradcodec.uplink-payload-bytes"] == stats.uplink_payload_bytes


def test_downlink_round_trip_and_updates_are_applied_to_the_exact_global(task_identity):
    g = model()
    seen = {}
    contexts = {n: new_context(n) for n in (1, 2)}
    wrapper = CompressedStrategy(fedavg(2), downlink_codec="int8", uplink_codec="raw")
    (arrays, _), replies = run_round(wrapper, g, make_app(seen=seen), gradcodec_mod("int4"), contexts)
    exact = arrays_of(g)
    decoded = {k: v.numpy() for k, v in ArrayRecord({k: Array(v) for k, v in exact.items()}).items()}
    coded = gradcodec.decode(gradcodec.encode({k: torch.from_numpy(v) for k, v in exact.items() if v.dtype.kind == "f"}, "int8"))
    decoded.update({k: t.numpy() for k, t in coded.items()})
    for node, (keys, received) in seen.items():
        assert keys == ["arrays", "config"]  # the handshake never reaches the app
        assert list(received) == list(exact)
        for k in exact:
            assert bits(received[k]) == bits(decoded[k]), k  # floats as int8 decodes them, the rest exact
    # raw uplink (the server's choice overrides the client's int4): local - decoded, added to the
    # exact global, so the aggregate is exact global + average update.
    w = {1: 10 / 30, 2: 20 / 30}
    for k in ("w", "double"):
        upd = sum(w[n] * (local_update(seen[n][1], n)[k] - seen[n][1][k]) for n in (1, 2))
        np.testing.assert_allclose(arrays[k].numpy(), exact[k] + upd, rtol=1e-6, atol=1e-6)
    for reply in replies:  # "b", unchanged by every client, is restored as the exact global
        assert bits(reply.content["arrays"]["b"].numpy()) == bits(exact["b"])
    stats = wrapper.history[1]
    assert all(t.codec == "raw" for t in stats.uplink.values())
    for t in stats.downlink.values():
        assert t.codec == "int8:block=64" and t.message_bytes < 0.5 * t.uncompressed_message_bytes


def test_composes_with_flowers_server_side_dp_wrapper(task_identity):
    """DP clipping measures each update against the arrays it sent: with a lossy downlink the update
    must still be the client's own training delta, not that plus the downlink error."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    g = ArrayRecord({"x": Array(np.random.default_rng(0).standard_normal(512).astype(np.float32))})
    steps = {1: np.float32(0.01), 2: np.float32(-0.02)}
    app = make_app(lambda rec, node: {"x": rec["x"] + steps[node]})
    inner = DifferentialPrivacyServerSideFixedClipping(fedavg(2), noise_multiplier=0.0, clipping_norm=0.3, num_sampled_clients=2)
    wrapper = CompressedStrategy(inner, downlink_codec="int8", uplink_codec="raw")
    (arrays, _), _ = run_round(wrapper, g, app, gradcodec_mod(), {1: new_context(1), 2: new_context(2)})
    # node 1's update (norm 0.23) passes, node 2's (0.45) is clipped to norm 0.3; FedAvg weights 10:20
    upd = (10 * steps[1] + 20 * steps[2] * 0.3 / (0.02 * math.sqrt(512))) / 30
    np.testing.assert_allclose(arrays["x"].numpy(), g["x"].numpy() + upd, atol=1e-6)


def test_wrapper_delegates_what_it_does_not_change(task_identity):
    inner = FedAvg(fraction_train=0.5, fraction_evaluate=1.0, min_evaluate_nodes=1, min_available_nodes=1)
    wrapper = CompressedStrategy(inner, downlink_codec="bf16")
    assert isinstance(wrapper, Strategy)
    assert wrapper.fraction_train == 0.5 and wrapper.weighted_by_key == "num-examples"
    wrapper.summary()
    msgs = list(wrapper.configure_evaluate(1, model(), ConfigRecord(), FakeGrid([1])))
    assert not is_gradcodec_record(msgs[0].content["arrays"]) and HANDSHAKE_KEY not in msgs[0].content
    with pytest.raises(gradcodec.errors.UnknownCodec):
        CompressedStrategy(inner, downlink_codec="nope")
    with pytest.raises(gradcodec.errors.UnknownCodec):
        gradcodec_mod("nope")


def test_message_nbytes_counts_the_payload_once_per_object(task_identity):
    g = model()
    msg = Message(RecordDict({"arrays": g}), dst_node_id=1, message_type=MessageType.TRAIN)
    n = message_nbytes(msg)
    data = sum(len(a.data) for a in g.values())
    assert data < n < data + 600 * len(g) + 1024  # about 500 B of object headers and ids per Array
    assert message_to_proto(msg).ByteSize() < n  # the object layout carries ids and headers besides
    import pickle

    pickle.dumps(msg)  # measuring leaves no unpicklable chunk caches behind (Ray pickles messages)


# ====================================================================== simulation

D_IN, D_OUT, STEPS = 256, 16, 5
RESULTS: dict[str, dict] = {}


def _client_data(pid: int):
    rng = np.random.default_rng(1000 + pid)
    n = 24 + 16 * pid  # distinct sizes: FedAvg weights differ and order the replies
    x = (rng.standard_normal((n, D_IN)) / math.sqrt(D_IN)).astype(np.float32)
    w_true = np.random.default_rng(7).standard_normal((D_IN, D_OUT)).astype(np.float32)
    y = x @ w_true + 0.05 * rng.standard_normal((n, D_OUT)).astype(np.float32)
    return x, y


def train_linear(msg: Message, context: Context) -> Message:
    """The app: a few full-batch gradient steps of least squares, numpy only."""
    x, y = _client_data(int(context.node_config["partition-id"]))
    w = msg.content["arrays"]["w"].numpy()
    b = msg.content["arrays"]["b"].numpy()
    w0, b0 = w.copy(), b.copy()
    lr = np.float32(0.9 * len(x) / np.linalg.norm(np.hstack([x, np.ones((len(x), 1), np.float32)]), 2) ** 2)
    for _ in range(STEPS):  # lr < 2 / L: each step, hence each round, is non-expansive
        err = x @ w + b - y
        w = w - lr * (x.T @ err) / len(x)
        b = b - lr * err.mean(axis=0)
    absmax = float(max(np.abs(w - w0).max(), np.abs(b - b0).max()))
    return Message(
        RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(w.astype(np.float32)), "b": Array(b.astype(np.float32))}),
                "metrics": MetricRecord({"num-examples": len(x), "update-absmax": absmax}),
            }
        ),
        reply_to=msg,
    )


plain_client = ClientApp()
plain_client.train()(train_linear)
compressed_client = ClientApp(mods=[gradcodec_mod("int8", error_feedback=True, seed=0, measure=True)])  # the one change
compressed_client.train()(train_linear)


def _max_metrics(records, weight_key):
    """Keep the max update size over clients (FedAvg would average it)."""
    return MetricRecord({"update-absmax": max(next(iter(r.metric_records.values()))["update-absmax"] for r in records)})


class OrderedFedAvg(FedAvg):
    """FedAvg that sums replies in a fixed order (arrival order varies, float sums do not commute) and
    records the sizes of the replies it receives."""

    def __init__(self):
        super().__init__(fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3, train_metrics_aggr_fn=_max_metrics)
        self.reply_bytes = []

    def aggregate_train(self, server_round, replies):
        replies = sorted(replies, key=lambda m: next(iter(m.content.metric_records.values()))["num-examples"])
        self.reply_bytes.append([message_nbytes(m) for m in replies])
        return super().aggregate_train(server_round, replies)


def _initial():
    return ArrayRecord({"w": Array(np.zeros((D_IN, D_OUT), np.float32)), "b": Array(np.zeros(D_OUT, np.float32))})


plain_server = ServerApp()


@plain_server.main()
def _plain_main(grid: Grid, context: Context) -> None:
    strategy = OrderedFedAvg()
    result = strategy.start(grid=grid, initial_arrays=_initial(), num_rounds=2)
    RESULTS["plain"] = {"arrays": arrays_of(result.arrays), "metrics": result.train_metrics_clientapp, "reply_bytes": strategy.reply_bytes}


compressed_server = ServerApp()


@compressed_server.main()
def _compressed_main(grid: Grid, context: Context) -> None:
    for name, kwargs in [("raw", {"uplink_codec": "raw"}), ("int8", {"uplink_codec": "int8"}), ("int8+bf16", {"uplink_codec": "int8", "downlink_codec": "bf16"})]:
        strategy = CompressedStrategy(OrderedFedAvg(), **kwargs)  # the one change on the server
        result = strategy.start(grid=grid, initial_arrays=_initial(), num_rounds=2)
        RESULTS[name] = {"arrays": arrays_of(result.arrays), "metrics": result.train_metrics_clientapp, "history": strategy.history}


def _simulate(server, client):
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a Ray FutureWarning; no GPU is used
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2, "log_to_driver": False}}
    run_simulation(server_app=server, client_app=client, num_supernodes=3, backend_config=backend)


@pytest.fixture(scope="module")
def simulated():
    """Two simulations (about 15 s each here, mostly Ray start-up): plain, then compressed."""
    RESULTS.clear()
    _simulate(plain_server, plain_client)
    _simulate(compressed_server, compressed_client)
    assert set(RESULTS) == {"plain", "raw", "int8", "int8+bf16"}, sorted(RESULTS)
    return RESULTS


def test_simulation_raw_is_bit_identical_to_the_uncompressed_run(simulated):
    plain, raw = simulated["plain"]["arrays"], simulated["raw"]["arrays"]
    assert list(raw) == list(plain)
    for k in plain:
        assert bits(raw[k]) == bits(plain[k]), k
    assert np.abs(plain["w"]).max() > 0.1  # it trained


def test_simulation_int8_stays_within_the_codec_bound(simulated):
    plain, int8 = simulated["plain"]["arrays"], simulated["int8"]["arrays"]
    diff = np.concatenate([(int8[k] - plain[k]).ravel() for k in plain])
    # int8 rounds each value to the nearest multiple of scale = absmax(block)/127: error <= U/254 per
    # element, U the largest value quantised (an update plus the carried residual, <= (1 + 1/254) x the
    # largest update). Error feedback re-sends round 1's error r1 in round 2, so after two rounds
    #   int8 - plain = [T(g1 + e1) - T(g1)] + mean(r1) - mean(r2),
    # T the round's (non-expansive: lr < 2/L) local training averaged over clients, hence
    #   ||int8 - plain||_2 <= 3 sqrt(n) U / 254.
    u = max(m["update-absmax"] for r in ("plain", "int8") for m in simulated[r]["metrics"].values()) * (1 + 1 / 254)
    bound = 3 * math.sqrt(diff.size) * u / 254
    err = float(np.linalg.norm(diff))
    assert 0 < err <= bound, (err, bound)
    print(f"int8 vs plain after 2 rounds: ||diff||_2 = {err:.3g} <= bound {bound:.3g} (max |diff| {np.abs(diff).max():.3g}, U = {u:.3g})")


def test_simulation_downlink_bf16_plus_int8_stays_close(simulated):
    plain, both = simulated["plain"]["arrays"], simulated["int8+bf16"]["arrays"]
    for k in plain:
        rel = np.linalg.norm(both[k] - plain[k]) / np.linalg.norm(plain[k])
        assert rel < 2e-2, (k, rel)
    for stats in simulated["int8+bf16"]["history"].values():
        for t in stats.downlink.values():
            assert t.codec == "bf16" and t.payload_bytes < 0.55 * t.uncompressed_bytes


def test_simulation_reports_bytes_per_round_and_int8_is_a_quarter_of_raw(simulated):
    raw_h, int8_h = simulated["raw"]["history"], simulated["int8"]["history"]
    plain_sizes = simulated["plain"]["reply_bytes"]
    assert sorted(raw_h) == sorted(int8_h) == [1, 2]
    for rnd in (1, 2):
        raw, int8 = raw_h[rnd], int8_h[rnd]
        assert len(raw.uplink) == len(int8.uplink) == 3 and not raw.dropped and not int8.dropped
        ratio = int8.uplink_payload_bytes / raw.uplink_payload_bytes
        assert 0.24 < ratio < 0.30, ratio  # 8.5 bits of 32 per value, plus headers
        assert simulated["int8"]["metrics"][rnd]["gradcodec.uplink-payload-bytes"] == int8.uplink_payload_bytes
        for t in int8.uplink.values():
            assert t.codec == "int8:block=64"
            assert t.client["payload-bytes"] == t.payload_bytes
            # the engine adds delivery metadata to the reply after the client measured it
            assert abs(t.client["message-bytes"] - t.message_bytes) < 100
            assert t.message_bytes < 0.35 * t.uncompressed_message_bytes
        # The uncompressed message size the wrapper reconstructs matches what the plain run carried.
        plain_total = sum(plain_sizes[rnd - 1])
        assert abs(int8.uplink_uncompressed_message_bytes - plain_total) < 0.01 * plain_total
        assert int8.uplink_message_bytes < 0.35 * plain_total
        print(
            f"round {rnd}, 3 replies: payload raw {raw.uplink_payload_bytes} B, int8 {int8.uplink_payload_bytes} B ({ratio:.3f});"
            f" on the wire plain {plain_total} B, raw {raw.uplink_message_bytes} B, int8 {int8.uplink_message_bytes} B"
        )
