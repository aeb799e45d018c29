"""RandAugment with torchvision's 14 operations, each image drawing its own op (docs/augmentation.md).

`OPS` is the one table of the operations: name -> `op(images, signed_level)`, in torchvision's
order (the index is what is sampled per image). Images are float32 NHWC in [0, 255]; `signed_level`
is [N], the normalized magnitude (torchvision magnitude / 30) with the op's direction, and each op
uses level x its torchvision maximum: shear 0.3, translate 150/331 of the side, rotate 30 degrees,
brightness/color/contrast/sharpness factor 1 +- 0.9, posterize 8 - round(4 x level) bits, solarize
threshold 255 x (1 - level).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import keras
import tensorflow as tf

MAX_MAGNITUDE = 30  # torchvision RandAugment: num_magnitude_bins=31 -> magnitudes 0..30


def level(magnitude: float) -> float:
    """torchvision magnitude (0..30) -> normalized level in [0, 1]."""
    return float(magnitude) / MAX_MAGNITUDE


def per_image(x: tf.Tensor) -> tf.Tensor:
    """[N] -> [N, 1, 1, 1] for broadcasting over NHWC."""
    return tf.reshape(x, [-1, 1, 1, 1])


def grayscale(images: tf.Tensor) -> tf.Tensor:
    """ITU-R 601-2 luma (torchvision's rgb_to_grayscale), keeping a channel axis of 1."""
    return tf.reduce_sum(images * tf.constant([0.299, 0.587, 0.114], images.dtype), -1, keepdims=True)


def blend(degenerate: tf.Tensor, images: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """torchvision `_blend`: degenerate + factor * (images - degenerate), clipped to [0, 255]."""
    return tf.clip_by_value(degenerate + per_image(factor) * (images - degenerate), 0.0, 255.0)


def adjust_brightness(images, factor):
    return blend(tf.zeros_like(images), images, factor)


def adjust_saturation(images, factor):  # torchvision "Color" / ColorJitter saturation
    return blend(grayscale(images), images, factor)


def adjust_contrast(images, factor):
    mean = tf.reduce_mean(grayscale(images), axis=[1, 2, 3], keepdims=True)
    return blend(mean, images, factor)


def _adjust_sharpness(images, factor):
    """Blend with a 3x3 smoothed image; border pixels stay unsmoothed, as in torchvision."""
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    channels = images.shape[-1]
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
    smoothed = tf.nn.depthwise_conv2d(images, kernel, [1, 1, 1, 1], "VALID")
    smoothed = tf.pad(smoothed, [[0, 0], [1, 1], [1, 1], [0, 0]])
    inner = tf.zeros(tf.concat([[1], tf.shape(images)[1:3] - 2, [1]], 0))
    border = tf.pad(inner, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=1.0)  # 1 on the border
    degenerate = border * images + (1.0 - border) * smoothed
    return blend(degenerate, images, factor)


def _posterize(images, bits):
    """Keep the top `bits` bits of each 8-bit value (per image)."""
    shift = tf.cast(per_image(8 - bits), tf.int32)
    pixels = tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.int32)
    return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(pixels, shift), shift), tf.float32)


def _solarize(images, threshold):
    return tf.where(images >= per_image(threshold), 255.0 - images, images)


def _equalize(images):
    """Per-image, per-channel histogram equalization with torchvision's lookup table (vectorized)."""
    shape = tf.shape(images)
    pixels = tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.int32)
    rows = tf.reshape(tf.transpose(pixels, [0, 3, 1, 2]), [shape[0] * shape[3], -1])  # [N*C, H*W]
    num_rows = tf.shape(rows)[0]
    offsets = tf.range(num_rows)[:, None] * 256
    hist = tf.reshape(tf.math.bincount(tf.reshape(rows + offsets, [-1]), minlength=num_rows * 256,
                                       maxlength=num_rows * 256), [num_rows, 256])
    last_nonzero = 255 - tf.argmax(tf.cast(tf.reverse(hist, [1]) > 0, tf.int32), axis=1, output_type=tf.int32)
    last_count = tf.gather(hist, last_nonzero, batch_dims=1)
    step = (tf.reduce_sum(hist, 1) - last_count) // 255
    safe_step = tf.maximum(step, 1)[:, None]
    lut = (tf.cumsum(hist, axis=1) + safe_step // 2) // safe_step
    lut = tf.clip_by_value(tf.concat([tf.zeros_like(lut[:, :1]), lut[:, :-1]], 1), 0, 255)
    equalized = tf.gather(lut, rows, batch_dims=1)
    equalized = tf.where(step[:, None] == 0, rows, equalized)
    equalized = tf.transpose(tf.reshape(equalized, [shape[0], shape[3], shape[1], shape[2]]), [0, 2, 3, 1])
    return tf.cast(equalized, tf.float32)


def _affine(rows: Callable) -> Callable:
    """A geometric op via keras.ops.image.affine_transform: nearest neighbour, black fill, shears
    about the origin, rotation about the centre. `rows(signed_level, height, width, one, zero)` gives
    the first six entries of the [N, 8] matrices that map output to input coordinates."""
    def op(images: tf.Tensor, signed_level: tf.Tensor) -> tf.Tensor:
        n = tf.shape(images)[0]
        height, width = tf.cast(tf.shape(images)[1], tf.float32), tf.cast(tf.shape(images)[2], tf.float32)
        one, zero = tf.ones([n]), tf.zeros([n])
        matrices = tf.stack(rows(signed_level, height, width, one, zero) + [zero, zero], axis=1)
        return keras.ops.image.affine_transform(images, matrices, interpolation="nearest",
                                                fill_mode="constant", fill_value=0)
    return op


def _rotation(signed_level, height, width, one, zero) -> list:
    angle = 30.0 * signed_level * (math.pi / 180.0)
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    return [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy]


@functools.cache
def autocontrast_layer() -> keras.layers.Layer:
    """The one AutoContrast layer (stateless; build it eagerly, before tracing, with `BatchAugmenter`)."""
    # Explicit float32: under a mixed-precision global policy the layer would compute in float16.
    return keras.layers.AutoContrast(value_range=(0, 255), dtype="float32")


def _enhance(adjust: Callable) -> Callable:
    """An op blending by the factor 1 + 0.9 x signed level (brightness, color, contrast, sharpness)."""
    return lambda images, signed_level: adjust(images, 1.0 + 0.9 * signed_level)


# torchvision RandAugment's operations, in its order.
OPS: dict[str, Callable] = {
    "identity": lambda images, signed_level: images,
    "shear_x": _affine(lambda s, h, w, one, zero: [one, 0.3 * s, zero, zero, one, zero]),
    "shear_y": _affine(lambda s, h, w, one, zero: [one, zero, zero, 0.3 * s, one, zero]),
    "translate_x": _affine(lambda s, h, w, one, zero: [one, zero, -150.0 / 331.0 * w * s, zero, one, zero]),
    "translate_y": _affine(lambda s, h, w, one, zero: [one, zero, zero, zero, one, -150.0 / 331.0 * h * s]),
    "rotate": _affine(_rotation),
    "brightness": _enhance(adjust_brightness),
    "color": _enhance(adjust_saturation),
    "contrast": _enhance(adjust_contrast),
    "sharpness": _enhance(_adjust_sharpness),
    "posterize": lambda images, signed_level: _posterize(images, 8 - tf.round(4.0 * tf.abs(signed_level))),
    "solarize": lambda images, signed_level: _solarize(images, 255.0 * (1.0 - tf.abs(signed_level))),
    "autocontrast": lambda images, signed_level: autocontrast_layer().transform_images(images, None),
    "equalize": lambda images, signed_level: _equalize(images),
}
NAMES = tuple(OPS)


def apply_ops(images: tf.Tensor, op: tf.Tensor, signed_level: tf.Tensor) -> tf.Tensor:
    """Apply NAMES[op[i]] at signed_level[i] to image i.

    The batch is partitioned by op, so each op runs only on the images that drew it (about 1x the
    work of one op per slot, instead of computing all 14 on the whole batch and selecting)."""
    indices = tf.dynamic_partition(tf.range(tf.shape(images)[0]), op, len(OPS))
    parts = tf.dynamic_partition(images, op, len(OPS))
    signs = tf.dynamic_partition(signed_level, op, len(OPS))
    # Partitions are often empty; some kernels mishandle an empty batch (Keras' min asserts,
    # TF's CPU depthwise conv returns the wrong shape), so empty ones are passed through.
    outputs = [tf.cond(tf.size(part) > 0, lambda f=function, x=part, s=part_sign: f(x, s), lambda x=part: x)
               for function, part, part_sign in zip(OPS.values(), parts, signs)]
    return tf.ensure_shape(tf.dynamic_stitch(indices, outputs), images.shape)
