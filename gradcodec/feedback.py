"""Error feedback around any lossy codec: what one round's encoding loses is added to the next.

    x_t ──▶ e = x_t + r_t ──▶ codec.encode(e) ──▶ bytes        r_{t+1} = e - decode(bytes)

The residual r lives only on the client (the encoder side): the decoder needs nothing from it, so
clients may join and leave; each keeps its own ErrorFeedback object across rounds and saves it with
`state_dict()` if it restarts. Residuals are float32, one per tensor name, on the input's device.
With int8/int4 codecs the update runs as one fused kernel pass (see gradcodec.kernels).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .codec import Codec, Tensors, as_named
from .errors import InvalidInput

RESIDUAL = "residual."
CODEC = "codec."


class ErrorFeedback:
    """Wrap `codec` so that each encode also carries what earlier encodes left out."""

    def __init__(self, codec: Codec):
        if codec.lossless:
            raise InvalidInput(f"error feedback needs a lossy codec; {codec.spec!r} loses nothing")
        self.codec = codec
        self.residuals: dict[str, torch.Tensor] = {}

    @property
    def spec(self) -> str:
        return self.codec.spec

    @property
    def lossless(self) -> bool:
        return False

    def encode(self, x: Tensors, *, by_reference: bool = False) -> bytes:
        """Encode x + residual (see Codec.encode for `by_reference`) and keep what the payload misses."""
        named, _ = as_named(x)
        for name, t in named.items():
            if not t.is_floating_point():
                continue  # sent raw, nothing to feed back
            r = self.residuals.get(name)
            if r is not None and r.shape != t.shape:
                raise InvalidInput(
                    f"tensor {name!r} has shape {tuple(t.shape)} but its residual has {tuple(r.shape)};"
                    " call reset() (or reset([name])) when the model changes shape"
                )
            if r is None or r.device != t.device:
                self.residuals[name] = torch.zeros(t.shape, dtype=torch.float32, device=t.device) if r is None else r.to(t.device)
        return self.codec.encode(x, residuals=self.residuals, by_reference=by_reference)

    def decode(self, blob: bytes, device: str | torch.device | None = None, max_output_bytes: int | None = None,
               layout=None) -> Tensors:
        return self.codec.decode(blob, device, max_output_bytes, layout)

    def reset(self, names: Iterable[str] | None = None) -> None:
        """Forget the residuals of `names`, or all of them (e.g. when the model is re-initialised)."""
        if names is None:
            self.residuals.clear()
        for name in names or ():
            self.residuals.pop(name, None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Residuals and the wrapped codec's state, for torch.save between sessions."""
        state = {RESIDUAL + k: v for k, v in self.residuals.items()}
        state.update({CODEC + k: v for k, v in self.codec.state_dict().items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        residuals, codec_state = {}, {}
        for key, value in state.items():
            if key.startswith(RESIDUAL):
                if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
                    raise InvalidInput(f"residual {key!r} must be a float32 tensor")
                residuals[key[len(RESIDUAL):]] = value.detach().clone()
            elif key.startswith(CODEC):
                codec_state[key[len(CODEC):]] = value
            else:
                raise InvalidInput(f"unexpected key {key!r} in error-feedback state")
        self.codec.load_state_dict(codec_state)
        self.residuals = residuals
