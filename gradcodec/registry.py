"""Codec names -> classes, and the pipeline spec language.

A spec is a chain of stages separated by "|"; each stage is a registered name optionally followed by
":" and comma-separated key=value parameters:

    "int8"                      blockwise int8, default parameters
    "int4:block=128,stochastic=true"
    "topk:ratio=0.01|int8|zstd" top-k, its values quantised to int8, the payload zstd-compressed

Rules: zero or more transforms, then at most one quantizer (raw when none is given), then at most one
byte stage (zstd). A whole-tensor-set codec (kind "codec", e.g. the learned `cgfed`) stands alone,
optionally followed by a byte stage. The canonical spec written into payloads lists every parameter
that decoding depends on, so a payload decodes the same whatever the defaults of a later version.
"""
from __future__ import annotations

import importlib
import inspect
import math
import re
import typing
from typing import Any

from .errors import InvalidInput, UnknownCodec

_REGISTRY: dict[str, type] = {}
_LOADED = False
KINDS = ("transform", "quantizer", "bytes", "codec")


def register(name: str):
    """Class decorator: make a stage or codec class available under `name` in specs."""

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise RuntimeError(f"codec name {name!r} registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        if getattr(cls, "kind", None) not in KINDS:
            raise RuntimeError(f"{cls.__name__}.kind must be one of {KINDS}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load() -> None:
    global _LOADED
    if not _LOADED:
        importlib.import_module("gradcodec.codecs")
        # whole-set codecs subclass gradcodec.codec.Codec, whose module imports gradcodec.codecs:
        # they cannot be imported from that package's __init__ without a cycle
        for module in ("gradcodec.codecs.learned", "gradcodec.codecs.budget"):
            importlib.import_module(module)
        _LOADED = True


def lookup(name: str) -> type:
    _load()
    if name not in _REGISTRY:
        raise UnknownCodec(f"unknown codec {name!r}; registered codecs: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_codecs() -> list[str]:
    """Names of every registered codec stage, sorted."""
    _load()
    return sorted(_REGISTRY)


def parse_spec(spec: str) -> list[tuple[str, dict[str, str]]]:
    """Split a spec into (name, raw parameters) pairs, without looking names up."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidInput(f"codec spec must be a non-empty string, got {spec!r}")
    stages = []
    for part in spec.split("|"):
        name, _, params = part.strip().partition(":")
        name = name.strip()
        if not name:
            raise InvalidInput(f"empty stage in codec spec {spec!r}")
        raw: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in params.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise InvalidInput(f"parameter {item!r} of stage {name!r} is not key=value (spec {spec!r})")
            if key.strip() in raw:
                raise InvalidInput(f"parameter {key.strip()!r} given twice for stage {name!r}")
            raw[key.strip()] = value.strip()
        stages.append((name, raw))
    return stages


def _coerce(value: Any, annotation: Any, what: str) -> Any:
    """Convert a spec string (or a Python value passed as a keyword) to the parameter's type."""
    args = typing.get_args(annotation)
    if type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        annotation = next(a for a in args if a is not type(None))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOLS:
            return _BOOLS[value.lower()]
        raise InvalidInput(f"{what} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,19}", value.strip()):
            return int(value)
        raise InvalidInput(f"{what} must be an integer, got {value!r}")
    if annotation is float:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise InvalidInput(f"{what} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not math.isfinite(out):
            raise InvalidInput(f"{what} must be a finite number, got {value!r}")
        return out
    if annotation is str:
        return str(value)
    return value


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _construct(cls: type, raw: dict[str, Any], extra: dict[str, Any]):
    sig = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__)
    accepted = {n for n in sig.parameters if accepts(cls, n)}
    unknown = set(raw) - accepted
    if unknown:
        raise InvalidInput(
            f"codec {cls.name!r} has no parameter {sorted(unknown)[0]!r}; its parameters: {', '.join(sorted(accepted)) or 'none'}"
        )
    kwargs = {k: _coerce(v, hints.get(k, str), f"parameter {k!r} of codec {cls.name!r}") for k, v in raw.items()}
    return cls(**kwargs, **extra)


def accepts(cls: type, param: str) -> bool:
    p = inspect.signature(cls.__init__).parameters.get(param)
    return p is not None and param not in ("self", "inner") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def build(spec: str, params: dict[str, Any] | None = None, resources: dict[str, Any] | None = None):
    """Build the stages of `spec`: returns (kind, root, byte_stage).

    kind is "pipeline" (root is the first Stage, each transform holding the next as `inner`) or
    "codec" (root is a ready whole-tensor-set Codec). `params` are keyword parameters from the
    caller, each given to the one stage that accepts it. `resources` (codec options such as seed,
    and loaded models for a learned codec) are passed to a whole-set codec's constructor where it
    names them, together with the byte stage.
    """
    parsed = [(lookup(name), dict(raw)) for name, raw in parse_spec(spec)]
    for key, value in (params or {}).items():
        takers = [i for i, (cls, _) in enumerate(parsed) if accepts(cls, key)]
        if len(takers) != 1:
            where = "no stage" if not takers else "several stages"
            raise InvalidInput(f"parameter {key!r} matches {where} of codec spec {spec!r}; put it in the spec instead")
        parsed[takers[0]][1][key] = value

    byte_stage = None
    if parsed and parsed[-1][0].kind == "bytes":
        cls, raw = parsed.pop()
        byte_stage = _construct(cls, raw, {})
    kinds = [cls.kind for cls, _ in parsed]
    if "bytes" in kinds:
        raise InvalidInput(f"a byte stage (zstd) may only end a codec spec: {spec!r}")
    misplaced = [cls.name for cls, _ in parsed[1:] if hasattr(cls, "prepare")]
    if misplaced:
        raise InvalidInput(f"{misplaced[0]!r} acts on the whole update and must be the first stage of the spec: {spec!r}")
    if "codec" in kinds:
        prepass = parsed.pop(0) if len(parsed) == 2 and hasattr(parsed[0][0], "prepare") else None
        if len(parsed) != 1:
            raise InvalidInput(f"codec {parsed[kinds.index('codec')][0].name!r} cannot be combined with other stages")
        cls, raw = parsed[0]
        extra = {k: v for k, v in (resources or {}).items() if accepts(cls, k)}
        codec = _construct(cls, raw, {**extra, "byte_stage": byte_stage})
        if prepass is not None:  # a whole-update stage (dp) in front of a whole-update codec
            codec.attach_prepass(_construct(prepass[0], prepass[1], {"inner": None}))
        return "codec", codec, byte_stage
    if not parsed or parsed[-1][0].kind != "quantizer":
        parsed.append((lookup("raw"), {}))
    if any(cls.kind == "quantizer" for cls, _ in parsed[:-1]):
        raise InvalidInput(f"a quantizer must be the last tensor stage of a codec spec: {spec!r}")
    root = None
    for cls, raw in reversed(parsed):
        root = _construct(cls, raw, {} if root is None else {"inner": root})
    return "pipeline", root, byte_stage


def byte_stage_of(spec: str):
    """The byte stage (zstd, ans, ...) that ends `spec`, built from its parameters; None if it has none."""
    name, raw = parse_spec(spec)[-1]
    cls = lookup(name)
    return _construct(cls, raw, {}) if cls.kind == "bytes" else None


def canonical_spec(stages: list[Any]) -> str:
    """The spec that rebuilds exactly these stages for decoding: every wire parameter explicit."""
    parts = []
    for stage in stages:
        params = stage.wire_params()
        parts.append(stage.name + (":" + ",".join(f"{k}={_format(v)}" for k, v in params.items()) if params else ""))
    return "|".join(parts)


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)
