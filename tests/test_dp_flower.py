"""gradcodec with Flower's own DP: the order of the mods and of the strategy wrappers, by hand and in
the simulation engine; and gradcodec's `dp` stage carried to clients by the handshake.

Client: ``ClientApp(mods=[gradcodec_mod(...), fixedclipping_mod])``: the gradcodec mod outermost,
so fixedclipping_mod sees the instruction without the handshake and clips the app's reply, which the
gradcodec mod then compresses. Server: DifferentialPrivacyClientSideFixedClipping (noise on the
aggregate) and CompressedStrategy nest either way round.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.clientapp.mod import fixedclipping_mod  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping  # noqa: E402

from gradcodec.integrations.flower import CompressedStrategy, gradcodec_mod  # noqa: E402

from .test_flower import _simulate, fedavg, make_app, new_context, run_round, task_identity, train_linear  # noqa: E402,F401

CLIP = 0.3
STEPS = {1: np.float32(0.01), 2: np.float32(-0.02)}  # node 1's update has norm 0.23 (kept), node 2's 0.45 (clipped)


def _global():
    return ArrayRecord({"x": Array(np.random.default_rng(0).standard_normal(512).astype(np.float32))})


def _app():
    return make_app(lambda rec, node: {"x": rec["x"] + STEPS[node]})


def _clipped_mean(g):
    # FedAvg weights 10:20 (make_app reports 10 x node examples)
    return g["x"].numpy() + (10 * STEPS[1] + 20 * STEPS[2] * CLIP / (0.02 * math.sqrt(512))) / 30


def _chain(*mods):
    """Flower's mod order: mods[0] outermost."""
    def run(msg, ctx, app):
        call = app
        for mod in reversed(mods):
            call = (lambda m, inner: lambda msg_, ctx_: m(msg_, ctx_, inner))(mod, call)
        return call(msg, ctx)
    return run


def _contexts():
    return {1: new_context(1), 2: new_context(2)}


@pytest.mark.parametrize("nesting", ["compressed-outside", "dp-outside"])
def test_gradcodec_mod_first_then_fixedclipping_sends_the_clipped_update(task_identity, nesting):
    if nesting == "compressed-outside":
        strategy = CompressedStrategy(DifferentialPrivacyClientSideFixedClipping(fedavg(2), 0.0, CLIP, 2), uplink_codec="raw")
    else:
        strategy = DifferentialPrivacyClientSideFixedClipping(CompressedStrategy(fedavg(2), uplink_codec="raw"), 0.0, CLIP, 2)
    g = _global()
    (arrays, _), replies = run_round(strategy, g, _app(), _chain(gradcodec_mod(), fixedclipping_mod), _contexts())
    np.testing.assert_allclose(arrays["x"].numpy(), _clipped_mean(g), atol=1e-6)


def test_fixedclipping_outside_the_gradcodec_mod_fails_the_round(task_identity):
    """fixedclipping_mod needs exactly one ConfigRecord; outside the gradcodec mod it also sees the
    handshake, so every client replies with an error and the DP wrapper skips aggregation."""
    strategy = CompressedStrategy(DifferentialPrivacyClientSideFixedClipping(fedavg(2), 0.0, CLIP, 2), uplink_codec="int8")
    (arrays, _), replies = run_round(strategy, _global(), _app(), _chain(fixedclipping_mod, gradcodec_mod()), _contexts())
    assert arrays is None
    assert all(r.has_error() and "ConfigRecord" in r.error.reason for r in replies)


def test_server_noise_is_added_to_the_decoded_aggregate(task_identity):
    noise = 1.0
    strategy = CompressedStrategy(DifferentialPrivacyClientSideFixedClipping(fedavg(2), noise, CLIP, 2), uplink_codec="raw")
    g = _global()
    (arrays, _), _ = run_round(strategy, g, _app(), _chain(gradcodec_mod(), fixedclipping_mod), _contexts())
    added = arrays["x"].numpy() - _clipped_mean(g)
    sigma = noise * CLIP / 2  # Flower: noise_multiplier * clipping_norm / num_sampled_clients
    assert abs(added.std() - sigma) < 5 * sigma / math.sqrt(2 * added.size)


def test_the_dp_stage_travels_in_the_handshake_and_not_in_the_payload(task_identity):
    strategy = CompressedStrategy(fedavg(2), uplink_codec=f"dp:clip={CLIP},noise=0|raw")
    assert strategy.uplink_codec == f"dp:clip={CLIP},noise=0.0|raw"
    g = _global()
    (arrays, _), _ = run_round(strategy, g, _app(), gradcodec_mod("int8"), _contexts())  # the server's codec wins
    np.testing.assert_allclose(arrays["x"].numpy(), _clipped_mean(g), atol=1e-6)
    assert all(t.codec == "raw" for t in strategy.history[1].uplink.values())


# ====================================================================== the simulation engine

RESULTS: dict[str, object] = {}
dp_client = ClientApp(mods=[gradcodec_mod("int8", error_feedback=True, seed=0), fixedclipping_mod])
dp_client.train()(train_linear)
dp_server = ServerApp()


@dp_server.main()
def _dp_main(grid: Grid, context: Context) -> None:
    from .test_flower import OrderedFedAvg, _initial, arrays_of

    strategy = CompressedStrategy(DifferentialPrivacyClientSideFixedClipping(OrderedFedAvg(), 0.5, 0.05, 3), uplink_codec="int8")
    result = strategy.start(grid=grid, initial_arrays=_initial(), num_rounds=2, train_config=ConfigRecord({"lr": 0.1}))
    RESULTS["arrays"] = arrays_of(result.arrays)
    RESULTS["history"] = strategy.history


@pytest.mark.slow
def test_simulation_with_flower_client_side_clipping_and_server_noise():
    RESULTS.clear()
    _simulate(dp_server, dp_client)
    assert set(RESULTS) == {"arrays", "history"}
    for stats in RESULTS["history"].values():
        assert len(stats.uplink) == 3 and not stats.dropped
        assert all(t.codec == "int8:block=64" for t in stats.uplink.values())
    assert all(np.isfinite(a).all() for a in RESULTS["arrays"].values())
