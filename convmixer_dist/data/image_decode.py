"""Encoded image bytes -> the training crop or the evaluation centre crop, as timm's ImageNet recipe.

Training (timm `RandomResizedCropAndInterpolation`, bicubic): the crop window is drawn on the
*original* image — area fraction ~ U(scale), aspect ratio log-uniform in `ratio`, up to 10 attempts,
then timm's fallback (the whole image, or its central part clamped to the ratio range) — and resized
to `image_size` with bicubic interpolation. The window depends only on the image's height/width and
a stateless seed, so a run's crops are a pure function of (seed, stream position) and resume is exact.

Because the window is known before any pixel is decoded, JPEGs decode only the window
(`tf.image.decode_and_crop_jpeg`, which skips the undecoded rows and blocks; what TF's own ImageNet
pipelines do). Other formats (PNG, GIF, BMP) are decoded whole and then cropped to the same window;
both give the same pixels (tested).

Evaluation (timm's `crop_pct` transform): resize the shorter side to floor(image_size /
crop_fraction) with bicubic interpolation, then take the central image_size x image_size crop.
crop_fraction 0.96 is what timm's ConvMixer ImageNet models use; 1.0 resizes straight to the crop.
"""
from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

CROP_ATTEMPTS = 10  # timm / torchvision RandomResizedCrop
JPEG_SIGNATURE = b"\xff\xd8\xff"


def sample_crop_window(height, width, seed, scale: Sequence[float], ratio: Sequence[float]):
    """timm's random-resized-crop window on a height x width image: (top, left, crop_h, crop_w) int32.

    All `CROP_ATTEMPTS` attempts are drawn at once (stateless, from `seed`); the first that fits is
    used, else timm's central fallback. Pure function of (height, width, seed, scale, ratio).
    """
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
    area = tf.random.stateless_uniform([CROP_ATTEMPTS], seeds[0], scale[0], scale[1]) * h * w
    log_ratio = tf.random.stateless_uniform([CROP_ATTEMPTS], seeds[1], math.log(ratio[0]),
                                            math.log(ratio[1]))
    aspect = tf.exp(log_ratio)
    crop_w = tf.round(tf.sqrt(area * aspect))
    crop_h = tf.round(tf.sqrt(area / aspect))
    fits = tf.logical_and(crop_w <= w, crop_h <= h)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    # Fallback: the central crop of the largest window whose aspect ratio is within `ratio`.
    in_ratio = w / h
    fallback_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
    fallback_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
    found = tf.reduce_any(fits)
    crop_h = tf.where(found, crop_h[first], fallback_h)
    crop_w = tf.where(found, crop_w[first], fallback_w)
    # random.randint(0, H - h), both ends inclusive: floor(U[0, 1) * (H - h + 1)).
    top_u = tf.random.stateless_uniform([], seeds[2])
    left_u = tf.random.stateless_uniform([], seeds[3])
    top = tf.where(found, tf.floor(top_u * (h - crop_h + 1)), tf.floor((h - crop_h) / 2))
    left = tf.where(found, tf.floor(left_u * (w - crop_w + 1)), tf.floor((w - crop_w) / 2))
    return tuple(tf.cast(v, tf.int32) for v in (top, left, crop_h, crop_w))


def is_jpeg(data: tf.Tensor) -> tf.Tensor:
    """True when the encoded bytes start with the JPEG signature."""
    return tf.equal(tf.strings.substr(data, 0, len(JPEG_SIGNATURE)), JPEG_SIGNATURE)


def decode_full(data: tf.Tensor) -> tf.Tensor:
    """Any format tf.io.decode_image reads -> uint8 HxWx3."""
    image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def resize_to(image: tf.Tensor, height, width) -> tf.Tensor:
    """Bicubic resize (antialiased when shrinking, as PIL's) -> uint8."""
    resized = tf.image.resize(image, tf.stack([height, width]), method="bicubic", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def decode_random_crop(data: tf.Tensor, seed, image_size: int, scale: Sequence[float],
                       ratio: Sequence[float], decode_crop: bool = True) -> tf.Tensor:
    """Encoded image -> the random-resized crop at image_size x image_size, uint8.

    With `decode_crop`, JPEGs decode only the window; otherwise (and for other formats) the whole
    image is decoded and the same window sliced out.
    """
    def jpeg_window() -> tf.Tensor:
        shape = tf.image.extract_jpeg_shape(data)
        top, left, crop_h, crop_w = sample_crop_window(shape[0], shape[1], seed, scale, ratio)
        return tf.image.decode_and_crop_jpeg(data, tf.stack([top, left, crop_h, crop_w]), channels=3)

    def full_then_crop() -> tf.Tensor:
        image = decode_full(data)
        shape = tf.shape(image)
        top, left, crop_h, crop_w = sample_crop_window(shape[0], shape[1], seed, scale, ratio)
        return image[top:top + crop_h, left:left + crop_w]

    if decode_crop:
        crop = tf.cond(is_jpeg(data), jpeg_window, full_then_crop)
    else:
        crop = full_then_crop()
    crop = tf.ensure_shape(crop, [None, None, 3])
    return tf.ensure_shape(resize_to(crop, image_size, image_size), [image_size, image_size, 3])


def center_crop(image: tf.Tensor, image_size: int, crop_fraction: float = 1.0) -> tf.Tensor:
    """timm's evaluation transform on a decoded uint8 image (HxWx3) or batch of images of one size
    (NxHxWx3): shorter side -> floor(image_size / crop_fraction) (bicubic; the longer side keeps the
    aspect ratio, truncated as torchvision's Resize), then the central image_size square (offsets
    rounded as torchvision's CenterCrop)."""
    image = tf.convert_to_tensor(image)
    resize_short = math.floor(image_size / crop_fraction + 1e-6)
    shape = tf.shape(image)[-3:-1]
    short = tf.reduce_min(shape)
    long_side = tf.cast(tf.cast(resize_short, tf.int64) * tf.cast(tf.reduce_max(shape), tf.int64)
                        // tf.cast(short, tf.int64), tf.int32)
    height = tf.where(shape[0] <= shape[1], resize_short, long_side)
    width = tf.where(shape[0] <= shape[1], long_side, resize_short)
    resized = resize_to(image, height, width)
    top = tf.cast(tf.round(tf.cast(height - image_size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(width - image_size, tf.float32) / 2.0), tf.int32)
    crop = resized[..., top:top + image_size, left:left + image_size, :]
    return tf.ensure_shape(crop, image.shape[:-3] + [image_size, image_size, 3])
