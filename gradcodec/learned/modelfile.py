"""The learned codec's model file: an AE (or one of its halves) in safetensors, with its config and fingerprint.

One file holds the encoder, the decoder, or both (`parts`); a client ships the encoder-only file, a
server the decoder-only one (`LearnedModel.save(path, parts=...)`). Tensors are named
`encoder.<param>` / `decoder.<param>`; the safetensors metadata holds

    format        "gradcodec-ae-v1"
    config        AEConfig as JSON (architecture, canvas, layout digest)
    code_hashes   JSON {"encoder": sha256, "decoder": sha256} of the weights the AE was trained with
    part_hashes   JSON {part: sha256} of the weights in this file
    revision      "0" for TGAP weights; n for a decoder adapted n times in FAF (gradcodec.learned.faf)
    fingerprint   hex of sha256(format, config, code_hashes)[:16]

The fingerprint names the *code* (which latent means what): both halves of one AE carry it, every
payload's header carries it, and a decoder refuses payloads with another one (ModelMismatch). It covers
the config and all weights through their hashes, so an encoder-only file can prove its fingerprint
without the decoder's weights. A part hash is recomputed on load: a truncated file, an altered weight,
an altered config or a mislabelled part raises ModelMismatch naming the file, never a silently wrong
model. A weight hash covers each tensor's name, dtype, shape and bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import InvalidInput, ModelMismatch
from .model import AEConfig, build_decoder, build_encoder

FORMAT = "gradcodec-ae-v1"
PARTS = ("encoder", "decoder")
FINGERPRINT_BYTES = 16


def weights_hash(module: nn.Module) -> str:
    """sha256 over a module's tensors in name order: name, dtype, shape and little-endian bytes."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def compute_fingerprint(config: AEConfig, code_hashes: dict[str, str]) -> bytes:
    text = json.dumps([FORMAT, config.to_json(), code_hashes["encoder"], code_hashes["decoder"]])
    return hashlib.sha256(text.encode()).digest()[:FINGERPRINT_BYTES]


@dataclass
class LearnedModel:
    """A loaded AE: config, its encoder and/or decoder (None when the file lacked that part), identity.

    Build one from trained modules with `LearnedModel.trained(...)`, read one with `load_model`.
    """

    config: AEConfig
    encoder: nn.Module | None
    decoder: nn.Module | None
    code_hashes: dict[str, str]
    revision: int = 0
    path: str | None = None
    training: dict = field(default_factory=dict)  # informational: how TGAP trained it, held-out quality

    @classmethod
    def trained(cls, config: AEConfig, encoder: nn.Module, decoder: nn.Module, training: dict | None = None) -> "LearnedModel":
        """Freeze freshly trained modules into a model with a fingerprint (revision 0)."""
        hashes = {"encoder": weights_hash(encoder), "decoder": weights_hash(decoder)}
        return cls(config, encoder.eval(), decoder.eval(), hashes, training=dict(training or {}))

    @property
    def fingerprint(self) -> bytes:
        return compute_fingerprint(self.config, self.code_hashes)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in PARTS if getattr(self, p) is not None)

    def describe(self) -> str:
        where = self.path or "in memory"
        return f"AE {self.fingerprint.hex()} ({self.config.arch}, parts {'+'.join(self.parts) or 'none'}, {where})"

    def require(self, part: str) -> nn.Module:
        module = getattr(self, part)
        if module is None:
            raise ModelMismatch(f"{self.describe()} has no {part}; load the file that holds it "
                                f"(the {'client' if part == 'encoder' else 'server'} side needs the {part})")
        return module

    def save(self, path: str | os.PathLike, parts: tuple[str, ...] | None = None) -> None:
        """Write `parts` (default: all this model holds) to a safetensors file, atomically."""
        from safetensors.torch import save_file

        parts = tuple(parts or self.parts)
        tensors, part_hashes = {}, {}
        for part in parts:
            module = self.require(part)
            part_hashes[part] = weights_hash(module)
            tensors.update({f"{part}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
        if "encoder" in parts and part_hashes["encoder"] != self.code_hashes["encoder"]:
            raise InvalidInput("the encoder's weights changed since training: that is a new AE; train or "
                               "freeze it with LearnedModel.trained")
        metadata = {
            "format": FORMAT, "config": self.config.to_json(), "code_hashes": json.dumps(self.code_hashes),
            "part_hashes": json.dumps(part_hashes), "revision": str(self.revision),
            "fingerprint": self.fingerprint.hex(), "training": json.dumps(self.training),
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        save_file(tensors, str(partial), metadata=metadata)
        os.replace(partial, path)


def load_model(path: str | os.PathLike | LearnedModel, parts: tuple[str, ...] | None = None,
               device: str | torch.device = "cpu") -> LearnedModel:
    """Read and verify a model file; `parts` (default: whatever it holds) must be present.

    Raises ModelMismatch for anything that is not an intact gradcodec AE file.
    """
    if isinstance(path, LearnedModel):
        for part in parts or ():
            path.require(part)
        return path
    from safetensors import safe_open

    where = os.fspath(path)
    try:
        with safe_open(where, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated or malformed files
        raise ModelMismatch(f"model file {where} is not a readable safetensors file (truncated or corrupted?): {e}") from None
    if meta.get("format") != FORMAT:
        raise ModelMismatch(f"model file {where} is not a gradcodec AE file (format {meta.get('format')!r}, expected {FORMAT!r})")
    try:
        config = AEConfig.from_json(meta["config"])
        code_hashes = json.loads(meta["code_hashes"])
        part_hashes = json.loads(meta["part_hashes"])
        revision = int(meta["revision"])
        training = json.loads(meta.get("training", "{}"))
        stored_fp = bytes.fromhex(meta["fingerprint"])
    except (KeyError, ValueError, TypeError, InvalidInput) as e:
        raise ModelMismatch(f"model file {where} has corrupted metadata: {e}") from None
    if not (isinstance(code_hashes, dict) and set(code_hashes) == set(PARTS) and isinstance(part_hashes, dict)
            and set(part_hashes) <= set(PARTS)):
        raise ModelMismatch(f"model file {where} has corrupted metadata: bad hash tables")
    if compute_fingerprint(config, code_hashes) != stored_fp:
        raise ModelMismatch(f"model file {where}: its fingerprint does not match its config and weight hashes "
                            "(the metadata was altered)")
    present = tuple(p for p in PARTS if p in part_hashes)
    missing = [p for p in (parts or ()) if p not in present]
    if missing:
        raise ModelMismatch(f"model file {where} holds {'+'.join(present) or 'no part'}, not the {'+'.join(missing)} needed here")
    modules: dict[str, nn.Module | None] = {p: None for p in PARTS}
    for part in present:
        module = build_encoder(config) if part == "encoder" else build_decoder(config)
        prefix = part + "."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ModelMismatch(f"model file {where}: the {part}'s tensors do not fit its config: {str(e)[:300]}") from None
        actual = weights_hash(module)
        if actual != part_hashes[part]:
            raise ModelMismatch(f"model file {where}: the {part}'s weights are corrupted (hash {actual[:16]}..., "
                                f"expected {part_hashes[part][:16]}...)")
        if (part == "encoder" or revision == 0) and actual != code_hashes[part]:
            raise ModelMismatch(f"model file {where}: the {part}'s weights are not the ones its fingerprint names")
        modules[part] = module.to(device).eval()
    unexpected = [k for k in tensors if k.split(".", 1)[0] not in present]
    if unexpected:
        raise ModelMismatch(f"model file {where} has tensors outside its declared parts, e.g. {unexpected[0]!r}")
    return LearnedModel(config, modules["encoder"], modules["decoder"], code_hashes, revision, where, training)
