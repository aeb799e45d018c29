"""Faster drop-in replacements for the three Keras layers that dominate a ConvMixer step on CPU.

A profile of ConvMixer-256/8 on CPU (TensorFlow 2.21 with oneDNN) puts BatchNorm and the activation
at as much time as the convolutions, and the depthwise filter gradient at ~85% of the depthwise
layer. Each class here subclasses the Keras layer it replaces, so it creates the same variables
under the same names (`gamma`, `beta`, `moving_mean`, `moving_variance`; `kernel`, `bias`):
checkpoints move freely between `--kernels=keras` and `--kernels=fused`, and inference logits agree
to float32 rounding.

- `FusedBatchNormalization`: one FusedBatchNormV3 op (oneDNN on CPU, cuDNN on GPU) instead of Keras
  3's moments + batch_normalization passes. Same momentum/epsilon semantics and the same moving
  statistics as Keras (biased batch variance; TF's fused op returns the Bessel-corrected one, which
  is undone here). `synchronized=True` (`--sync_bn`) keeps Keras' cross-replica path, which needs
  the gradient through the global mean and variance that the fused op does not provide.
- `ExactGelu`: exact (erf) GELU trained with a custom gradient computed from the saved input; the
  forward and the backward are each one XLA-compiled element-wise loop instead of the five (forward)
  and about ten (backward) separate passes of `tf.nn.gelu` and its gradient. Inference is `tf.nn.gelu`.
- `FoldedDepthwiseConv2D`: the depthwise filter gradient computed as a depthwise convolution of the
  padded input, batch folded into channels, with the output gradient as the filter. On CPU it beats
  TensorFlow's DepthwiseConv2dNativeBackpropFilter as a lone op and, measured quietly, in whole
  training steps (1.06-1.07x over fused BatchNorm + GELU alone), so `auto` uses it on CPU. The input
  gradient and the forward pass stay native; inference (training=False) runs the plain Keras
  computation.

`resolve_kernels` picks the layers per device; `--kernels=keras` forces the plain Keras layers.
"""
from __future__ import annotations

import dataclasses
import math

import keras
import tensorflow as tf
from keras import layers

PACKAGE = "convmixer_dist"


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """Which implementation each replaceable layer uses (what `--kernels` resolves to on a device)."""

    fused_bn: bool = False
    exact_gelu: bool = False
    folded_depthwise: bool = False

    @property
    def name(self) -> str:
        """Short description for logs and benchmark records."""
        parts = [n for n, on in (("fused_bn", self.fused_bn), ("exact_gelu", self.exact_gelu),
                                 ("folded_depthwise", self.folded_depthwise)) if on]
        return "+".join(parts) or "keras"


def resolve_kernels(kernels: str, device_kind: str) -> KernelChoice:
    """`--kernels` on a device kind ("cpu" or "gpu") -> the layers to build.

    auto on CPU: all three, each measured faster in whole training steps on a quiet 2-core
    AVX-512 machine (ConvMixer-256/8 one device and mirrored x2, ConvMixer-768/32; the folded
    depthwise gradient lost only in a run on a machine shared with other jobs). auto on GPU, not
    measured here: the fused BatchNorm (the cuDNN kernel Keras 2 used), the Keras GELU (XLA, on by
    default on GPUs, fuses it) and TensorFlow's native depthwise gradient. `fused` on a GPU forces
    the GELU as well, never the folded depthwise gradient (a CPU trick); on CPU it equals auto.
    """
    if kernels == "keras":
        return KernelChoice()
    on_cpu = device_kind == "cpu"
    if kernels == "fused":
        return KernelChoice(fused_bn=True, exact_gelu=True, folded_depthwise=on_cpu)
    if kernels == "auto":
        return KernelChoice(fused_bn=True, exact_gelu=on_cpu, folded_depthwise=on_cpu)
    raise ValueError(f"unknown kernels {kernels!r}")


# --- GELU ------------------------------------------------------------------------------------------

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# TensorFlow runs each element-wise op of the erf formula as its own pass over memory; compiled by
# XLA, the forward is one fused loop and so is the backward (forward+backward measured about 4x
# faster than tf.nn.gelu's on a 2-core AVX-512 CPU, 64x16x16x256 float32). On CPU each compiled call
# runs as an asynchronous function-call op (a PartitionedCall named after the layer) that the
# profiler's TF op table leaves out; profile_report reads those calls from the trace instead.
# A bfloat16 (or float16) input is computed in float32 inside the loop and rounded once at the end:
# XLA's CPU code for erf and exp in bfloat16 converts around every operation and ran 2.3x (forward)
# and 2.7x (backward) slower than float32; loaded and stored as bfloat16 and computed in float32,
# both are as fast as float32 or faster (64x16x16x256, AVX512-BF16 CPU). float32 is unchanged.
@tf.function(jit_compile=True)
def _gelu_forward(x):
    xf = tf.cast(x, tf.float32)
    return tf.cast(xf * (0.5 + 0.5 * tf.math.erf(xf * _INV_SQRT2)), x.dtype)


@tf.function(jit_compile=True)
def _gelu_backward(x, dy):
    xf, dyf = tf.cast(x, tf.float32), tf.cast(dy, tf.float32)
    cdf = 0.5 + 0.5 * tf.math.erf(xf * _INV_SQRT2)
    pdf = tf.exp(-0.5 * tf.square(xf)) * _INV_SQRT_2PI
    return tf.cast(dyf * (cdf + xf * pdf), x.dtype)


def exact_gelu(x, scope: str = "gelu"):
    """x * Phi(x) with Phi the standard normal CDF (erf form); d/dx = Phi(x) + x * phi(x), computed
    from the saved input in one fused pass.

    The gradient call is created under the name scope `scope`/gradient (`scope`: the layer's name);
    TensorFlow would otherwise name it after the enclosing function only, and profiles could not
    attribute it to the layer as they do TensorFlow's own gradients.
    """

    @tf.custom_gradient
    def gelu(x):
        def grad(dy):
            with tf.name_scope(scope), tf.name_scope("gradient"):
                return _gelu_backward(x, dy)

        return _gelu_forward(x), grad

    return gelu(x)


@keras.saving.register_keras_serializable(package=PACKAGE)
class ExactGelu(layers.Layer):
    """Exact GELU, the function Keras' "gelu" activation computes, trained with fused kernels.

    Inference (training=False) runs `tf.nn.gelu`, Keras' own computation, so exported models hold
    only standard TensorFlow ops.
    """

    def call(self, inputs, training=None):
        if training:
            return exact_gelu(inputs, self.name)
        return tf.nn.gelu(inputs, approximate=False)

    def compute_output_shape(self, input_shape):
        return input_shape


# --- BatchNorm -------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package=PACKAGE)
class FusedBatchNormalization(layers.BatchNormalization):
    """keras.layers.BatchNormalization computed by one FusedBatchNormV3 op (4-D channels-last input).

    Falls back to Keras' own computation where the fused op does not apply (synchronized statistics,
    masks, renorm, other ranks or axes, no scale or centre).
    """

    def _fused_applies(self, inputs, mask) -> bool:
        return (not self.synchronized and mask is None and not self.renorm and self.scale
                and self.center and len(inputs.shape) == 4 and self.axis in (-1, 3))

    def call(self, inputs, training=None, mask=None):
        if not self._fused_applies(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        # The fused op normalizes a float32 or bfloat16 tensor with float32 statistics, scale and
        # offset (it accumulates in float32), so a bfloat16 input is read and written as it is:
        # casting to float32 and back cost two extra passes and made BatchNorm 3x slower (oneDNN,
        # AVX512-BF16). Other dtypes (float16) are normalized in float32, as Keras does.
        x = inputs if inputs.dtype in (tf.float32, tf.bfloat16) else tf.cast(inputs, tf.float32)
        if training and self.trainable:
            y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x, self.gamma, self.beta, epsilon=self.epsilon, is_training=True)
            # The op returns the unbiased (n / (n - 1)) variance for moving averages; Keras averages
            # the biased one it normalizes with.
            shape = tf.shape(x)
            n = tf.cast(shape[0] * shape[1] * shape[2], tf.float32)
            variance = variance * ((n - 1.0) / tf.maximum(n, 1.0))
            momentum = self.momentum
            self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
            self.moving_variance.assign(self.moving_variance * momentum + variance * (1.0 - momentum))
        else:
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, self.gamma, self.beta, mean=self.moving_mean, variance=self.moving_variance,
                epsilon=self.epsilon, is_training=False)
        return tf.cast(y, self.compute_dtype)


# --- Depthwise convolution -------------------------------------------------------------------------

def _folded_filter_gradient(x, dy, kernel_size: tuple[int, int], padding: str):
    """d(loss)/d(filter) of a stride-1 depthwise conv, as one depthwise conv with batch in channels.

    filter_grad[a, b, c] = sum_{n,i,j} x_pad[n, i+a, j+b, c] * dy[n, i, j, c], i.e. a VALID depthwise
    convolution of x_pad laid out as [1, H', W', N*C] with dy laid out as the filter [H, W, N*C, 1].
    """
    kh, kw = kernel_size
    if padding == "same":
        x = tf.pad(x, [[0, 0], [(kh - 1) // 2, kh - 1 - (kh - 1) // 2],
                       [(kw - 1) // 2, kw - 1 - (kw - 1) // 2], [0, 0]])
    n, hp, wp, c = tf.unstack(tf.shape(x))
    h, w = tf.shape(dy)[1], tf.shape(dy)[2]
    x_folded = tf.reshape(tf.transpose(x, [1, 2, 0, 3]), [1, hp, wp, n * c])
    dy_filter = tf.reshape(tf.transpose(dy, [1, 2, 0, 3]), [h, w, n * c, 1])
    per_image = tf.nn.depthwise_conv2d(x_folded, dy_filter, [1, 1, 1, 1], "VALID")
    return tf.reshape(tf.reduce_sum(tf.reshape(per_image, [kh, kw, n, c]), axis=2), [kh, kw, c, 1])


def folded_depthwise_conv2d(x, kernel, padding: str, scope: str = "folded_depthwise"):
    """Stride-1 depthwise convolution whose filter gradient is `_folded_filter_gradient`.

    The gradient ops are created under the name scope `scope` (the layer's name), so profiles
    attribute them to the layer as they do TensorFlow's own gradients.
    """
    tf_padding = padding.upper()

    @tf.custom_gradient
    def conv(x, kernel):
        y = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], tf_padding)

        def grad(dy):
            with tf.name_scope(scope):
                dx = tf.nn.depthwise_conv2d_backprop_input(tf.shape(x), kernel, dy, [1, 1, 1, 1],
                                                           tf_padding)
                dk = _folded_filter_gradient(x, dy, tuple(kernel.shape[:2]), padding)
                return dx, tf.cast(dk, kernel.dtype)

        return y, grad

    return conv(x, kernel)


@keras.saving.register_keras_serializable(package=PACKAGE)
class FoldedDepthwiseConv2D(layers.DepthwiseConv2D):
    """keras.layers.DepthwiseConv2D whose training-time filter gradient is `_folded_filter_gradient`.

    Applies to stride 1, no dilation, depth multiplier 1, channels-last (ConvMixer's layer); any other
    configuration, and inference, run Keras' own computation.
    """

    def _folded_applies(self) -> bool:
        return (tuple(self.strides) == (1, 1) and tuple(self.dilation_rate) == (1, 1)
                and self.depth_multiplier == 1 and self.data_format == "channels_last")

    def call(self, inputs, training=None):
        if not (training and self._folded_applies()):
            return super().call(inputs)
        kernel = tf.cast(tf.convert_to_tensor(self.kernel), inputs.dtype)
        y = folded_depthwise_conv2d(inputs, kernel, self.padding, self.name)
        if self.use_bias:
            y = tf.nn.bias_add(y, tf.cast(self.bias, y.dtype))
        if self.activation is not None:
            y = self.activation(y)
        return y
