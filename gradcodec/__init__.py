"""gradcodec: compress gradients and LoRA updates for federated fine-tuning of LLMs.

    blob = gradcodec.encode(update, "topk:ratio=0.01|int8|zstd")   # bytes, self-describing
    update_hat = gradcodec.decode(blob)                             # same names, shapes, dtypes

See docs/architecture.md for the design and docs/codecs.md for every codec's bound.
"""
from . import errors
from .api import PayloadInfo, TensorInfo, decode, encode, get_codec, inspect, list_codecs
from .codec import Codec
from .feedback import ErrorFeedback
from .wire import CODE_OF_DTYPE as _WIRE_DTYPES
from .wire import Layout

#: dtypes a payload can carry (floats through every codec; integers and bool always raw)
SUPPORTED_DTYPES = frozenset(_WIRE_DTYPES)

__version__ = "0.1.0"
__all__ = [
    "Codec",
    "ErrorFeedback",
    "Layout",
    "PayloadInfo",
    "SUPPORTED_DTYPES",
    "TensorInfo",
    "decode",
    "encode",
    "errors",
    "get_codec",
    "inspect",
    "list_codecs",
    "__version__",
]
