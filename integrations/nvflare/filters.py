"""NVIDIA FLARE (>= 2.9) filters: clients send gradcodec payloads of their update, the server decodes them.

    from gradcodec.integrations.nvflare import GradcodecDecoder, GradcodecEncoder

    job.to(GradcodecEncoder("int8"), "site-1", tasks=["train"])   # each client (data + result filter)
    job.to(GradcodecDecoder(), "server", tasks=["train"])         # the server (result filter)

Client (`GradcodecEncoder`) — one object that the Job API installs twice:

    task data (WEIGHTS) ──▶ kept as the reference, passed on unchanged ──▶ the executor trains
    task result WEIGHTS w ──▶ update = w - reference ─┐
    task result WEIGHT_DIFF d ──▶ update = d ─────────┴─▶ ErrorFeedback(codec).encode ──▶ DXO WEIGHT_DIFF
                                                           {"__gradcodec__": uint8 payload} + meta

FLARE result filters do not see the task data the executor was given, so the encoder also runs as a
task *data* filter to keep it. Exported job configs build each filter entry as its own object, so this
state, the reference and the error-feedback residuals, lives in a registry keyed by (job id, client
name): per client and per job, as the residuals must be, whatever FLARE does with filter objects.

Server (`GradcodecDecoder`), a task result filter: the payload is decoded into a WEIGHT_DIFF DXO with the
client's keys, dtypes and container type (numpy or torch), with the client's other meta (step counts
for FedAvg's weights) kept. FLARE's FedAvg adds averaged WEIGHT_DIFF results to the global model, so a
client that sends WEIGHTS and one that sends WEIGHT_DIFF aggregate the same way. A payload that does not
decode is logged with the sending client's name and replaced by an error reply
(`ReturnCode.TASK_RESULT_FILTER_ERROR`): the controller drops it (or stops the job if too few results
are left, by its own tolerance settings); it is never aggregated.

Learned codecs: a spec such as "cgfed" names no model file (paths differ per site). Each side lists the
model files it holds (`models=[...]`); the encoder uses the one whose fingerprint is `model` (hex, the
`Codec.model.fingerprint` printed by gradcodec), the payload carries that fingerprint, and the decoder
picks the matching file among its own `models`.
"""
import hashlib
import json
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.filter import Filter, FilterChainType, FilterContextKey
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
from nvflare.job_config.defs import FilterType

import gradcodec
from gradcodec.errors import GradcodecError, ModelMismatch
from gradcodec.learned import LearnedModel, load_model

__all__ = ["GradcodecEncoder", "GradcodecDecoder", "PAYLOAD_KEY", "allow_gradcodec_classes", "clear_client_state",
           "ship_as_installed_package"]

PAYLOAD_KEY = "__gradcodec__"  # the one entry of an encoded DXO's data: the payload as a uint8 array
META_SPEC = "gradcodec_spec"
META_MODEL = "gradcodec_model"  # learned model fingerprint (hex), "" for classic codecs
META_FORMAT = "gradcodec_format"  # "numpy" or "torch": the container the decoder rebuilds
META_SENT_AS = "gradcodec_sent_as"  # the result's own data kind before encoding (WEIGHTS or WEIGHT_DIFF)


class _ClientState:
    """One client's state in one job: the last task data received, and the codec with its residuals."""

    def __init__(self):
        self.reference: dict[str, torch.Tensor] | None = None
        self.codec = None


_CLIENT_STATES: dict[tuple[str, str], _ClientState] = {}
_LOCK = threading.Lock()


def _client_state(fl_ctx: FLContext) -> _ClientState:
    key = (str(fl_ctx.get_job_id()), str(fl_ctx.get_identity_name()))
    with _LOCK:
        return _CLIENT_STATES.setdefault(key, _ClientState())


def clear_client_state(job_id: str | None = None) -> None:
    """Forget the references and residuals of one job's clients (all jobs' by default)."""
    with _LOCK:
        for key in [k for k in _CLIENT_STATES if job_id is None or k[0] == job_id]:
            del _CLIENT_STATES[key]


def _as_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        return torch.from_numpy(np.ascontiguousarray(value))
    return None


def _learned(models: Sequence[str | LearnedModel]) -> list[LearnedModel]:
    return [m if isinstance(m, LearnedModel) else load_model(m) for m in models]


def ship_as_installed_package(job) -> None:
    """Have `job` (a FLARE FedJob) refer to gradcodec's classes instead of copying their source into it.

    gradcodec is installed on every site, like nvflare. FLARE copies the source of any other package
    into the job's "custom" folder, and before it looks at `set_app_packages` it checks that a module's
    file path ends in its dotted name, which fails for gradcodec (its `integrations/` folder installs as
    `gradcodec.integrations`). So modules of gradcodec are skipped before that check, on this job only.

    A job without a "custom" folder is not bring-your-own-code, so FLARE (>= 2.8) builds only the
    classes its sites list in `class_allow_list`: each site must allow "gradcodec." once
    (`allow_gradcodec_classes`), as it would any other installed package.
    """
    config = job.job
    packages = list(getattr(config, "app_packages", None) or [])
    if "gradcodec" not in packages:
        job.set_app_packages(packages + ["gradcodec"])
    original = config._get_custom_file
    if getattr(original, "gradcodec_skips", False):
        return

    def get_custom_file(custom_dir, module, source_file, *args, **kwargs):
        if module.split(".")[0] == "gradcodec":
            return None
        return original(custom_dir, module, source_file, *args, **kwargs)

    get_custom_file.gradcodec_skips = True
    config._get_custom_file = get_custom_file


SITE_RESOURCES = "resources.json"


def allow_gradcodec_classes(local_dir: str) -> str:
    """Add "gradcodec." to the class allow-list of the FLARE site whose `local/` folder is `local_dir`.

    FLARE (>= 2.8) builds a job's components only from classes the site allows (`class_allow_list` in
    local/resources.json; nvflare's own classes when the key is absent) unless the job brings its own
    code, which jobs using gradcodec's installed classes do not. The site's resources.json (or, when
    there is none yet, its resources.json.default) is kept and the prefix added; a site without either
    gets nvflare's default list plus gradcodec. For the simulator, `local_dir` is `<workspace>/local`,
    which it copies to every site it creates. Returns the path written.
    """
    os.makedirs(local_dir, exist_ok=True)
    resources = {}
    for name in (SITE_RESOURCES, SITE_RESOURCES + ".default"):
        path = os.path.join(local_dir, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                resources = json.load(f)
            break
    allowed = list(resources.get("class_allow_list", DEFAULT_CLASS_ALLOW_LIST))
    if "*" not in allowed and "gradcodec." not in allowed:
        allowed.append("gradcodec.")
    resources["class_allow_list"] = allowed
    target = os.path.join(local_dir, SITE_RESOURCES)
    with open(target, "w", encoding="utf-8") as f:
        json.dump(resources, f, indent=2)
    return target


class _AddsItselfToJobs(Filter):
    """Lets the Job API install the filter without a filter_type (see default_filter_types)."""

    default_filter_types: tuple[str, ...] = ()

    def add_to_fed_job(self, job, ctx, **kwargs):
        ship_as_installed_package(job)
        job.check_kwargs(args_to_check=kwargs, args_expected={"filter_type": False, "tasks": False})
        tasks = kwargs.get("tasks", ["*"])
        for filter_type in [kwargs["filter_type"]] if kwargs.get("filter_type") else self.default_filter_types:
            job.add_filter(obj=self, filter_type=filter_type, tasks=tasks, ctx=ctx)


class GradcodecEncoder(_AddsItselfToJobs):
    """Client filter: replace the task result by a gradcodec payload of the update.

    spec: any gradcodec spec ("int8", "int4:block=128", "topk:ratio=0.01|int8|zstd", "cgfed", ...).
    error_feedback: carry what each round's encoding loses into the next (lossy specs only).
    models: learned-codec model files on this site; `model` (fingerprint hex) picks the one to use.
    seed: makes stochastic codecs reproducible.
    """

    default_filter_types = (FilterType.TASK_DATA, FilterType.TASK_RESULT)

    def __init__(self, spec: str = "int8", error_feedback: bool = True, models: Sequence[str] = (), model: str = "",
                 seed: int | None = None):
        super().__init__()
        self.spec = spec
        self.error_feedback = error_feedback
        self.models = list(models)
        self.model = model
        self.seed = seed
        self._model: LearnedModel | None = None
        probe = self._new_codec()  # refuse a bad spec or a missing model when the job is built, not mid-run
        self.lossless = probe.lossless

    def _new_codec(self, client: str = ""):
        params = {}
        if self.model:
            if self._model is None:
                known = _learned(self.models)
                found = [m for m in known if m.fingerprint.hex() == self.model]
                if not found:
                    raise ModelMismatch(f"no model with fingerprint {self.model} among {self.models or 'no files'}; "
                                        "give this site the model file in models=[...]")
                self._model = found[0]
            params["model"] = self._model
        lossless = gradcodec.get_codec(self.spec, **params).lossless
        # clients draw different random streams from one job seed
        seed = None if self.seed is None else int.from_bytes(hashlib.sha256(f"{self.seed}:{client}".encode()).digest()[:7], "little")
        return gradcodec.get_codec(self.spec, error_feedback=self.error_feedback and not lossless, seed=seed, **params)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if self.get_prop(FilterContextKey.CHAIN_TYPE) == FilterChainType.TASK_DATA_CHAIN:
            self._keep_reference(shareable, fl_ctx)
            return shareable
        return self._encode_result(shareable, fl_ctx)

    def _keep_reference(self, shareable: Shareable, fl_ctx: FLContext) -> None:
        state = _client_state(fl_ctx)
        try:
            dxo = from_shareable(shareable)
        except Exception:  # noqa: BLE001 - not a DXO (another task): nothing to measure updates from
            state.reference = None
            return
        if dxo.data_kind != DataKind.WEIGHTS or not isinstance(dxo.data, Mapping):
            state.reference = None
            return
        state.reference = {k: t.clone() for k, v in dxo.data.items() if (t := _as_tensor(v)) is not None}

    def _encode_result(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        try:
            dxo = from_shareable(shareable)
        except Exception:  # noqa: BLE001 - not a DXO: sent as the executor made it
            return shareable
        if dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF) or not dxo.data:
            return shareable
        state = _client_state(fl_ctx)
        update, container = self._update(dxo, state.reference, fl_ctx)
        if update is None:
            return shareable
        if state.codec is None:
            state.codec = self._new_codec(str(fl_ctx.get_identity_name()))
        payload = state.codec.encode(update)
        meta = dict(dxo.meta or {})
        meta.update({META_SPEC: state.codec.spec, META_FORMAT: container, META_SENT_AS: dxo.data_kind,
                     META_MODEL: self._model.fingerprint.hex() if self._model is not None else ""})
        encoded = DXO(DataKind.WEIGHT_DIFF, {PAYLOAD_KEY: np.frombuffer(payload, dtype=np.uint8)}, meta=meta)
        self.log_info(fl_ctx, f"gradcodec {state.codec.spec}: update of {sum(t.numel() * t.element_size() for t in update.values())} "
                              f"bytes sent as {len(payload)}")
        return encoded.update_shareable(shareable)

    def _update(self, dxo: DXO, reference: dict[str, torch.Tensor] | None,
                fl_ctx: FLContext) -> tuple[dict[str, torch.Tensor] | None, str]:
        """The update to encode (None: send the result as it is) and the container type of its values."""
        values = {k: _as_tensor(v) for k, v in dxo.data.items()}
        unsupported = [k for k, t in values.items() if t is None]
        if unsupported:
            self.log_warning(fl_ctx, f"result holds values gradcodec cannot carry ({unsupported[:3]}); sent uncompressed")
            return None, ""
        container = "torch" if all(isinstance(v, torch.Tensor) for v in dxo.data.values()) else "numpy"
        if dxo.data_kind == DataKind.WEIGHT_DIFF:
            return values, container
        missing = [k for k, t in values.items() if reference is None or k not in reference
                   or reference[k].shape != t.shape or not t.is_floating_point()]
        if missing:
            self.log_warning(fl_ctx, f"no received value to measure {missing[:3]} from; result sent uncompressed")
            return None, ""
        return {k: t.float() - reference[k].float() for k, t in values.items()}, container


class GradcodecDecoder(_AddsItselfToJobs):
    """Server filter: decode clients' gradcodec payloads into WEIGHT_DIFF results before aggregation.

    models: learned-codec model files (or loaded models) that payloads may name by fingerprint.
    max_output_bytes: the largest update a payload may decode to (default: gradcodec's limit).
    """

    default_filter_types = (FilterType.TASK_RESULT,)

    def __init__(self, models: Sequence[str] = (), max_output_bytes: int | None = None):
        super().__init__()
        self.models = list(models)
        self.max_output_bytes = max_output_bytes
        self._loaded = _learned(self.models)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        try:
            dxo = from_shareable(shareable)
        except Exception:  # noqa: BLE001 - not a DXO: not ours
            return shareable
        if not isinstance(dxo.data, Mapping) or PAYLOAD_KEY not in dxo.data:
            return shareable
        client = _sender(fl_ctx)
        try:
            decoded = self._decode(dxo)
        except GradcodecError as e:
            self.log_error(fl_ctx, f"dropping the update from client {client}: its gradcodec payload "
                                   f"({dxo.get_meta_prop(META_SPEC)!r}) does not decode: {e}")
            return make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR)
        meta = {k: v for k, v in (dxo.meta or {}).items() if not k.startswith("gradcodec_")}
        meta[MetaKey.PROCESSED_ALGORITHM] = f"gradcodec {dxo.get_meta_prop(META_SPEC)}"
        return DXO(DataKind.WEIGHT_DIFF, decoded, meta=meta).update_shareable(shareable)

    def _decode(self, dxo: DXO) -> dict[str, Any]:
        blob = dxo.data[PAYLOAD_KEY]
        if not isinstance(blob, np.ndarray) or blob.dtype != np.uint8 or blob.ndim != 1 or len(dxo.data) != 1:
            raise gradcodec.errors.CorruptPayload(f"{PAYLOAD_KEY!r} must be the only entry, a 1-D uint8 array")
        fingerprint = dxo.get_meta_prop(META_MODEL) or ""
        if fingerprint and not any(m.fingerprint.hex() == fingerprint for m in self._loaded):
            raise ModelMismatch(f"it was encoded with learned model {fingerprint}, which the server was not given "
                                "(GradcodecDecoder(models=[...]))")
        tensors = gradcodec.decode(blob.tobytes(), models=self._loaded, max_output_bytes=self.max_output_bytes)
        if not isinstance(tensors, dict):
            raise gradcodec.errors.CorruptPayload("the payload holds a single tensor, not a named update")
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise gradcodec.errors.CorruptPayload(f"tensor {name!r} decodes to NaN or Inf")
        if dxo.get_meta_prop(META_FORMAT) == "torch":
            return tensors
        return {k: t.numpy() for k, t in tensors.items()}


def _sender(fl_ctx: FLContext) -> str:
    peer = fl_ctx.get_peer_context()
    return peer.get_identity_name() if peer is not None else "<unknown client>"
