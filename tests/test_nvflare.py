"""NVIDIA FLARE filters: client encoding of updates, server decoding, state per client and job, bad payloads."""
import json
import logging

import numpy as np
import pytest
import torch

pytest.importorskip("nvflare")

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable  # noqa: E402
from nvflare.apis.filter import FilterChainType, FilterContextKey  # noqa: E402
from nvflare.apis.fl_constant import ReservedKey, ReturnCode  # noqa: E402
from nvflare.apis.fl_context import FLContext  # noqa: E402

import gradcodec  # noqa: E402
from gradcodec.integrations.nvflare import (  # noqa: E402
    PAYLOAD_KEY,
    GradcodecDecoder,
    GradcodecEncoder,
    allow_gradcodec_classes,
    clear_client_state,
)


@pytest.fixture(autouse=True)
def _fresh_state():
    clear_client_state()
    yield
    clear_client_state()


def _ctx(client: str, job: str = "job-1") -> FLContext:
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, client, private=False, sticky=False)
    ctx.set_prop(ReservedKey.RUN_NUM, job, private=False, sticky=False)
    return ctx


def _server_ctx(client: str) -> FLContext:
    ctx = _ctx("server")
    ctx.set_peer_context(_ctx(client))
    return ctx


def _encoder(spec: str, **kwargs) -> tuple[GradcodecEncoder, GradcodecEncoder]:
    """The encoder as FLARE builds it from an exported job: one object per chain."""
    data, result = GradcodecEncoder(spec, **kwargs), GradcodecEncoder(spec, **kwargs)
    data.set_prop(FilterContextKey.CHAIN_TYPE, FilterChainType.TASK_DATA_CHAIN)
    result.set_prop(FilterContextKey.CHAIN_TYPE, FilterChainType.TASK_RESULT_CHAIN)
    return data, result


def _weights(seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {"a.lora_A.weight": g.standard_normal((8, 32)).astype(np.float32),
            "a.lora_B.weight": g.standard_normal((32, 8)).astype(np.float32)}


def _round(encoders, client: str, sent: dict, trained: dict, kind: str = DataKind.WEIGHTS, meta: dict | None = None):
    data_filter, result_filter = encoders
    ctx = _ctx(client)
    task = data_filter.process(DXO(DataKind.WEIGHTS, sent).to_shareable(), ctx)
    assert from_shareable(task).data is not None  # task data passes through unchanged
    return result_filter.process(DXO(kind, trained, meta=meta or {}).to_shareable(), ctx)


def test_a_lossless_spec_delivers_the_exact_update_of_trained_weights_as_a_weight_diff():
    sent, trained = _weights(0), _weights(1)
    reply = _round(_encoder("raw"), "site-1", sent, trained, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 7})
    wire = from_shareable(reply)
    assert list(wire.data) == [PAYLOAD_KEY] and wire.data[PAYLOAD_KEY].dtype == np.uint8
    decoded = from_shareable(GradcodecDecoder().process(reply, _server_ctx("site-1")))
    assert decoded.data_kind == DataKind.WEIGHT_DIFF
    assert decoded.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 7
    for k in sent:
        assert isinstance(decoded.data[k], np.ndarray)
        np.testing.assert_array_equal(decoded.data[k], trained[k] - sent[k])


def test_a_weight_diff_result_is_encoded_as_it_is_and_torch_values_come_back_as_torch():
    diff = {k: torch.from_numpy(v) for k, v in _weights(2).items()}
    reply = _round(_encoder("int8"), "site-1", _weights(0), diff, kind=DataKind.WEIGHT_DIFF)
    decoded = from_shareable(GradcodecDecoder().process(reply, _server_ctx("site-1"))).data
    for k, v in diff.items():
        assert isinstance(decoded[k], torch.Tensor)
        # blockwise int8: |error| <= absmax(block) / 254 per element
        assert float((decoded[k] - v).abs().max()) <= float(v.abs().max()) / 254 + 1e-7


def test_error_feedback_is_kept_per_client_and_per_job():
    encoders = _encoder("sign", error_feedback=True)
    sent, trained = _weights(0), _weights(1)
    update = {k: trained[k] - sent[k] for k in sent}
    decoder = GradcodecDecoder()

    def received(client, job="job-1"):
        data_filter, result_filter = encoders
        ctx = _ctx(client, job)
        data_filter.process(DXO(DataKind.WEIGHTS, sent).to_shareable(), ctx)
        reply = result_filter.process(DXO(DataKind.WEIGHTS, trained).to_shareable(), ctx)
        return from_shareable(decoder.process(reply, _server_ctx(client))).data

    first = received("site-1")
    assert not np.allclose(first["a.lora_A.weight"], update["a.lora_A.weight"])  # 1-bit: lossy
    # the same client's second round carries the first round's residual: the two rounds' sum is closer
    second = received("site-1")
    err_one = sum(np.linalg.norm(2 * update[k] - 2 * first[k]) for k in update)
    err_two = sum(np.linalg.norm(2 * update[k] - first[k] - second[k]) for k in update)
    assert err_two < err_one
    # another client, or the same client in another job, starts without a residual
    for client, job in (("site-2", "job-1"), ("site-1", "job-2")):
        fresh = received(client, job)
        for k in update:
            np.testing.assert_array_equal(fresh[k], first[k])


def test_a_payload_that_does_not_decode_is_dropped_with_the_client_named(caplog):
    reply = _round(_encoder("int8"), "site-1", _weights(0), _weights(1))
    dxo = from_shareable(reply)
    blob = dxo.data[PAYLOAD_KEY].copy()
    blob[len(blob) // 2] ^= 0x10
    dxo.data[PAYLOAD_KEY] = blob
    with caplog.at_level(logging.ERROR):
        out = GradcodecDecoder().process(dxo.update_shareable(reply), _server_ctx("site-7"))
    assert out.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    with pytest.raises(Exception):
        from_shareable(out)  # no update left to aggregate
    assert "site-7" in caplog.text and "does not decode" in caplog.text


def test_a_payload_decoding_to_non_finite_values_is_dropped(caplog):
    bad = {"w": torch.tensor([1.0, float("nan")])}
    payload = gradcodec.encode(bad, "raw", allow_nonfinite=True)
    reply = DXO(DataKind.WEIGHT_DIFF, {PAYLOAD_KEY: np.frombuffer(payload, dtype=np.uint8)}).to_shareable()
    out = GradcodecDecoder().process(reply, _server_ctx("site-3"))
    assert out.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert "site-3" in caplog.text and "NaN" in caplog.text


def test_weights_without_a_received_reference_are_sent_uncompressed():
    _, result_filter = _encoder("int8")
    trained = _weights(1)
    reply = result_filter.process(DXO(DataKind.WEIGHTS, trained).to_shareable(), _ctx("site-1"))
    out = from_shareable(reply)
    assert out.data_kind == DataKind.WEIGHTS and set(out.data) == set(trained)
    # and the decoder leaves such a result alone
    passed = from_shareable(GradcodecDecoder().process(reply, _server_ctx("site-1")))
    np.testing.assert_array_equal(passed.data["a.lora_A.weight"], trained["a.lora_A.weight"])


def test_a_bad_spec_is_refused_when_the_job_is_built():
    with pytest.raises(gradcodec.errors.GradcodecError):
        GradcodecEncoder("int9")


class _SiteWorkspace:
    """What FLARE's component authorizer asks of a site's workspace: where its resources file is."""

    def __init__(self, local_dir):
        self.local_dir = local_dir

    def get_resources_file_path(self):
        return str(self.local_dir / "resources.json")


def _authorize(local_dir, class_path: str) -> None:
    from nvflare.app_common.widgets.component_path_authorizer import ComponentPathAuthorizer

    ComponentPathAuthorizer().authorize_component_config({"path": class_path}, workspace=_SiteWorkspace(local_dir))


def test_a_site_allowing_gradcodec_builds_its_classes_and_still_nvflares_own(tmp_path):
    from nvflare.apis.fl_exception import UnsafeComponentError

    (tmp_path / "resources.json").write_text(json.dumps({}))
    with pytest.raises(UnsafeComponentError, match="not in allow_list"):  # FLARE's default: nvflare's classes only
        _authorize(tmp_path, "gradcodec.integrations.nvflare.lora_job.LoraFedAvg")
    allow_gradcodec_classes(str(tmp_path))
    _authorize(tmp_path, "gradcodec.integrations.nvflare.lora_job.LoraFedAvg")
    _authorize(tmp_path, "gradcodec.integrations.nvflare.filters.GradcodecEncoder")
    _authorize(tmp_path, "nvflare.app_common.workflows.fedavg.FedAvg")
    with pytest.raises(UnsafeComponentError):
        _authorize(tmp_path, "gradcodecx.Evil")


def test_allowing_gradcodec_keeps_the_sites_own_settings_and_list(tmp_path):
    (tmp_path / "resources.json.default").write_text(json.dumps({"format_version": 2, "class_allow_list": ["mylab."]}))
    allow_gradcodec_classes(str(tmp_path))
    allow_gradcodec_classes(str(tmp_path))  # idempotent
    written = json.loads((tmp_path / "resources.json").read_text())
    assert written == {"format_version": 2, "class_allow_list": ["mylab.", "gradcodec."]}
    (tmp_path / "resources.json").write_text(json.dumps({"class_allow_list": ["*"]}))
    allow_gradcodec_classes(str(tmp_path))
    assert json.loads((tmp_path / "resources.json").read_text())["class_allow_list"] == ["*"]


@pytest.mark.slow
def test_flare_simulator_job_trains_with_and_without_the_filters(tmp_path):
    """Two clients, two rounds of LoRA FedAvg in FLARE's simulator; int8 ends close to uncompressed."""
    from gradcodec.integrations.nvflare.lora_job import build_job, eval_loss, lora_model, run_job
    from gradcodec.integrations.peft import lora_state

    small = {"examples_per_client": 16, "local_steps": 2, "batch_size": 8}
    initial = lora_state(lora_model())
    adapters = {spec: run_job(build_job(spec, rounds=2, trainer=small), str(tmp_path / (spec or "plain")))
                for spec in (None, "int8")}
    for adapter in adapters.values():
        assert set(adapter) == set(initial)
        assert any(not torch.equal(adapter[k], initial[k]) for k in initial)  # it trained
    losses = {spec: eval_loss(a, n=32) for spec, a in adapters.items()}
    assert abs(losses["int8"] - losses[None]) < 0.05 * losses[None]
