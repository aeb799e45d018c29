"""The ConvMixer model ("Patches Are All You Need?", Trockman & Kolter, 2022, arXiv:2201.09792).

`build_convmixer` is a pure function of the hyper-parameters and returns a `keras.Model` mapping
already-normalized float images to float32 logits (the loss is computed from logits in float32, which
keeps mixed precision safe). `PRESETS` maps the paper's named sizes to its keyword arguments.

Layer names are stable and hierarchical (`stem_conv`, `block03_depthwise_conv`, `block03_pointwise_bn`,
`head_dense`, ...): checkpoints, TensorBoard graphs and profiler op tables group by block and by kind.
"""
from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

from convmixer_dist import fused
from convmixer_dist.config import Config
from convmixer_dist.presets import ACTIVATIONS, PRESETS  # noqa: F401  (re-exported)

# PyTorch BatchNorm2d defaults used by the reference model: momentum 0.1 (new-statistic weight), which
# is 0.9 in Keras' convention (old-statistic weight), and epsilon 1e-5. Keras' own defaults (0.99, 1e-3)
# make evaluation-mode statistics lag badly on short runs.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _act_bn(x, activation: str, prefix: str, sync_bn: bool, kernels: fused.KernelChoice):
    """Activation then BatchNorm, the order used throughout ConvMixer."""
    if activation == "gelu" and kernels.exact_gelu:
        x = fused.ExactGelu(name=f"{prefix}_act")(x)
    else:
        x = layers.Activation(activation, name=f"{prefix}_act")(x)
    bn = fused.FusedBatchNormalization if kernels.fused_bn else layers.BatchNormalization
    return bn(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=sync_bn, name=f"{prefix}_bn")(x)


def _mixer_block(x, index: int, hidden_dim: int, kernel_size: int, activation: str, sync_bn: bool,
                 kernels: fused.KernelChoice):
    """Residual(depthwise conv -> act -> BN), then pointwise (1x1) conv -> act -> BN."""
    name = f"block{index:02d}"
    shortcut = x
    depthwise = fused.FoldedDepthwiseConv2D if kernels.folded_depthwise else layers.DepthwiseConv2D
    x = depthwise(kernel_size, padding="same", name=f"{name}_depthwise_conv")(x)
    x = _act_bn(x, activation, f"{name}_depthwise", sync_bn, kernels)
    x = layers.Add(name=f"{name}_residual")([x, shortcut])
    x = layers.Conv2D(hidden_dim, 1, name=f"{name}_pointwise_conv")(x)
    return _act_bn(x, activation, f"{name}_pointwise", sync_bn, kernels)


def build_convmixer(hidden_dim: int, depth: int, kernel_size: int, patch_size: int, num_classes: int,
                    image_size: int, activation: str = "gelu", dropout_rate: float = 0.0,
                    sync_bn: bool = False, channels: int = 3, name: str = "convmixer",
                    kernels: fused.KernelChoice = fused.KernelChoice()) -> keras.Model:
    """Build a ConvMixer-`hidden_dim`/`depth` that returns float32 logits.

    Architecture (exactly the reference implementation): patch embedding Conv(patch, stride patch)
    -> act -> BN; `depth` x [Residual(DepthwiseConv k 'same' -> act -> BN) -> Conv 1x1 -> act -> BN];
    global average pool -> Dense. Optional dropout (as in the seed implementation) before every block
    and before the head; the paper uses none (0.0). `sync_bn` computes BatchNorm statistics over the
    global batch (all replicas) instead of each replica's share, at the cost of an all-reduce per layer.
    `kernels` swaps BatchNorm, GELU and the depthwise conv for the faster layers of `fused` (same
    variables, same results); the default is the plain Keras layers.
    """
    inputs = keras.Input((image_size, image_size, channels), name="images")
    x = layers.Conv2D(hidden_dim, patch_size, strides=patch_size, name="stem_conv")(inputs)
    x = _act_bn(x, activation, "stem", sync_bn, kernels)
    for i in range(depth):
        if dropout_rate > 0:
            x = layers.Dropout(dropout_rate, name=f"block{i:02d}_dropout")(x)
        x = _mixer_block(x, i, hidden_dim, kernel_size, activation, sync_bn, kernels)
    # The head runs in float32 so logits (and the loss computed from them) are float32 under any policy.
    x = layers.GlobalAveragePooling2D(name="head_pool", dtype="float32")(x)
    if dropout_rate > 0:
        x = layers.Dropout(dropout_rate, name="head_dropout", dtype="float32")(x)
    logits = layers.Dense(num_classes, name="head_dense", dtype="float32")(x)
    return keras.Model(inputs, logits, name=name)


def count_params(model: keras.Model) -> int:
    """All weights, trainable or not (BN moving statistics included), as the reference counts them."""
    return int(sum(int(keras.ops.size(w)) for w in model.weights))


def create_model(config: Config, kind: str | None = None) -> keras.Model:
    """The ConvMixer described by the config, with `--kernels` resolved for the device `kind` ("cpu"
    or "gpu"; default: "gpu" if TensorFlow sees one)."""
    if kind is None:
        kind = "gpu" if tf.config.list_logical_devices("GPU") else "cpu"
    return build_convmixer(hidden_dim=config.hidden_dim, depth=config.depth,
                           kernel_size=config.kernel_size, patch_size=config.patch_size,
                           num_classes=config.num_classes, image_size=config.image_size,
                           activation=config.activation, dropout_rate=config.dropout_rate,
                           sync_bn=config.sync_bn, kernels=fused.resolve_kernels(config.kernels, kind))

