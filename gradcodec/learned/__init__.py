"""The learned codec `cgfed` (CG-FedLLM made to work on round updates): its parts, one module each.

    canvas      LoRA factors <-> one 2-D canvas (CanvasLayout, lora_canvas_from_adapter, adapter_from_lora_canvas)
    model       the AutoEncoders: the paper's conv AE, the light per-block AE and the shared (scalable) one
    modelfile   the model file: safetensors + config + fingerprint, encoder-only / decoder-only parts
    tgap        TGAP: train an AE on captured round updates (train_autoencoder; fit_shared streams a capture)
    faf         FAF: the codec in the federated loop (FAFClient, FAFServer: decoder adaptation)
    evaluate    held-out figures next to classic codecs at the same bytes
    cli         `gradcodec capture`, `train-ae`, `eval-ae`

The codec itself is gradcodec.codecs.learned.CGFedCodec, registered as "cgfed":

    codec = gradcodec.get_codec("cgfed", model="ae.encoder.safetensors")
    update_hat = gradcodec.decode(codec.encode(update), models=["ae.decoder.safetensors"])
"""
from .canvas import CanvasLayout, adapter_from_lora_canvas, lora_canvas_from_adapter
from .model import AEConfig, AutoEncoder
from .modelfile import LearnedModel, load_model

__all__ = ["AEConfig", "AutoEncoder", "CanvasLayout", "LearnedModel", "adapter_from_lora_canvas", "load_model",
           "lora_canvas_from_adapter"]
