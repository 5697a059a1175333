"""The exceptions gradcodec raises. Every failure a caller can cause is one of these.

`decode` of any byte string either returns a valid result or raises a `GradcodecError`; encoding
rejects bad input with `InvalidInput`. Messages say what is wrong and, where there is one, what to do.
"""


class GradcodecError(Exception):
    """Base class of every error gradcodec raises on purpose."""


class InvalidInput(GradcodecError, ValueError):
    """The tensors or parameters handed to gradcodec cannot be encoded as asked (NaN/Inf, dtype, shape)."""


class CorruptPayload(GradcodecError):
    """The bytes are not a valid gradcodec payload: truncated, altered, or inconsistent with themselves."""


class UnsupportedVersion(GradcodecError):
    """The payload was written by a wire-format version this gradcodec cannot read."""


class UnknownCodec(GradcodecError, KeyError):
    """A codec spec names a codec that is not registered."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class ModelMismatch(GradcodecError):
    """A learned codec's model file does not match the payload or the configuration it is used with."""


class PayloadTooLarge(CorruptPayload):
    """Decoding would allocate more than the limit derived from the payload (or set by the caller)."""


class LayoutMismatch(GradcodecError):
    """A by-reference payload names a tensor layout (names, dtypes, shapes) that the decoder was not given."""
