"""Codec families, one module each; importing this package registers them all."""
from . import cast, lossless, quant  # noqa: F401
