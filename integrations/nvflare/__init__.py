"""NVIDIA FLARE integration: task filters that send gradcodec payloads (see filters.py), and a runnable
LoRA fine-tuning job that uses them (lora_job.py)."""
from .filters import (PAYLOAD_KEY, GradcodecDecoder, GradcodecEncoder, allow_gradcodec_classes, clear_client_state,
                      ship_as_installed_package)

__all__ = ["GradcodecDecoder", "GradcodecEncoder", "PAYLOAD_KEY", "allow_gradcodec_classes", "clear_client_state",
           "ship_as_installed_package"]
