"""Codec families, one module each; importing this package registers them all."""
from . import cast, dp, entropy, lossless, lowrank, qsgd, quant, sign, sparse  # noqa: F401
