"""Named ConvMixer sizes from the paper (kept free of TensorFlow so flags validate before it loads)."""
from __future__ import annotations

from typing import Any

# Named sizes from the paper. CIFAR presets take 32x32 inputs and 10 classes; ImageNet ones 224 / 1000.
PRESETS: dict[str, dict[str, Any]] = {
    "convmixer_256_8": dict(hidden_dim=256, depth=8, kernel_size=5, patch_size=2, num_classes=10,
                            image_size=32, activation="gelu"),
    "convmixer_768_32": dict(hidden_dim=768, depth=32, kernel_size=7, patch_size=7, num_classes=1000,
                             image_size=224, activation="relu"),
    "convmixer_1024_20": dict(hidden_dim=1024, depth=20, kernel_size=9, patch_size=14, num_classes=1000,
                              image_size=224, activation="gelu"),
    "convmixer_1536_20": dict(hidden_dim=1536, depth=20, kernel_size=9, patch_size=7, num_classes=1000,
                              image_size=224, activation="gelu"),
}

ACTIVATIONS = ("gelu", "relu", "silu")
