"""The batch augmentation of the reference recipe: `BatchAugmenter` applies an `AugmentSpec` to a
batch, in tf.data (`map_dataset`) or inside the train step on the device (docs/augmentation.md).

Reference order (locuslab/convmixer-cifar10, torchvision; timm for the ImageNet additions):
random resized crop -> horizontal flip -> RandAugment (randaugment.py) -> ColorJitter ->
RandomErasing -> MixUp/CutMix. Every draw comes from a stateless seed of (spec.seed, step, replica),
so a batch's augmentation is the same in both placements and different on each replica.
"""
from __future__ import annotations

import math
from typing import Sequence

import keras
import tensorflow as tf

from convmixer_dist.data import image_decode, randaugment
from convmixer_dist.data.augment_spec import AugmentSpec
from convmixer_dist.data.randaugment import adjust_brightness, adjust_contrast, adjust_saturation, per_image
from convmixer_dist.data.sources.cifar import CIFAR10_MEAN, CIFAR10_STD

MIX_SWITCH_PROB = 0.5       # timm Mixup(switch_prob=0.5): CutMix instead of MixUp in half the batches


def normalize(images, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """(images - mean) / std per channel, in float32; mean/std in the images' scale (0..255 here)."""
    images = tf.cast(images, tf.float32)
    return (images - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


class _SeedStream(keras.random.SeedGenerator):
    """A variable-free SeedGenerator: the k-th `next()` is fold_in(base, k) (stateless, traceable).

    Keras random ops and layers accept a SeedGenerator as `seed`; passing this one makes every draw a
    deterministic function of `base` and the order of draws, with no TF variable to mirror or capture.
    """

    def __init__(self, base: tf.Tensor):  # noqa: D107 - deliberately not calling super(): no variable
        self._base = tf.cast(base, tf.int64)
        self._count = 0

    def next(self, ordered: bool = True) -> tf.Tensor:
        self._count += 1
        return tf.random.experimental.stateless_fold_in(self._base, self._count)


def _uniform(stream: _SeedStream, shape, minval=0.0, maxval=1.0) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed=stream.next(), minval=minval, maxval=maxval)


class BatchAugmenter:
    """Applies an `AugmentSpec` to a batch: `(images, labels) -> (images, soft_targets)`.

    Holds no TF variables (all randomness is stateless), so it can be built anywhere; building it
    inside `strategy.scope()` is harmless. `step` (an int or int tensor; e.g. the optimizer's
    iteration count or the batch index) selects the randomness; without it, calls are numbered
    0, 1, 2, ... by a Python counter at trace time — fine eagerly, but a `tf.function` traced once
    would repeat the same randomness, so always pass `step` in a graph.
    """

    def __init__(self, spec: AugmentSpec, num_classes: int, image_size: int,
                 fill_mean: Sequence[float] = CIFAR10_MEAN, fill_std: Sequence[float] = CIFAR10_STD):
        self.spec = spec.validate()
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.fill_mean = tuple(float(v) for v in fill_mean)
        self.fill_std = tuple(float(v) for v in fill_std)
        self._eager_calls = 0
        self._level = randaugment.level(spec.randaug_m)
        if spec.randaug_n:
            randaugment.autocontrast_layer()  # built now, not inside a trace
        # Explicit float32: under a mixed-precision global policy these layers would compute in float16.
        kw = dict(dtype="float32", seed=spec.seed)
        self._erasing = (keras.layers.RandomErasing(factor=(spec.erase_prob, spec.erase_prob),
                                                    fill_value=list(self.fill_mean), value_range=(0, 255), **kw)
                         if spec.erase_prob > 0 else None)
        self._mixup = keras.layers.MixUp(alpha=spec.mixup_alpha, **kw) if spec.mixup_alpha > 0 else None
        self._cutmix = (keras.layers.CutMix(factor=(spec.cutmix_alpha, spec.cutmix_alpha), **kw)
                        if spec.cutmix_alpha > 0 else None)

    # ---- seeds -----------------------------------------------------------------------------------
    def _stream(self, step, replica_id) -> _SeedStream:
        if step is None:
            if not tf.executing_eagerly():
                raise ValueError("BatchAugmenter: pass step= inside tf.function/tf.data (a trace-time "
                                 "counter would repeat the same randomness every step)")
            step = self._eager_calls
            self._eager_calls += 1
        if replica_id is None:
            context = tf.distribute.get_replica_context()
            replica_id = 0 if context is None else context.replica_id_in_sync_group
        base = tf.stack([tf.constant(self.spec.seed, tf.int64), tf.cast(step, tf.int64)])
        return _SeedStream(tf.random.experimental.stateless_fold_in(base, tf.cast(replica_id, tf.int64)))

    # ---- the transforms, in the reference order --------------------------------------------------
    def _random_resized_crop(self, images, stream):
        n = tf.shape(images)[0]
        if tuple(self.spec.crop_ratio) == (1.0, 1.0):
            side = tf.sqrt(_uniform(stream, [n], self.spec.crop_scale, 1.0))  # square: ratio (1, 1)
            height = width = side
            y0 = _uniform(stream, [n]) * (1.0 - side)
            x0 = _uniform(stream, [n]) * (1.0 - side)
        else:
            height, width, y0, x0 = self._crop_boxes(n, stream)
        boxes = tf.stack([y0, x0, y0 + height, x0 + width], axis=1)
        return tf.image.crop_and_resize(images, boxes, tf.range(n), [self.image_size, self.image_size])

    def _crop_boxes(self, n, stream):
        """timm's window rule in normalized coordinates of a square batch image: 10 attempts of area
        ~ U(scale, 1) and log-uniform aspect ratio, the first that fits, else the whole image."""
        attempts = [n, image_decode.CROP_ATTEMPTS]
        low, high = self.spec.crop_ratio
        area = _uniform(stream, attempts, self.spec.crop_scale, 1.0)
        aspect = tf.exp(_uniform(stream, attempts, math.log(low), math.log(high)))
        width, height = tf.sqrt(area * aspect), tf.sqrt(area / aspect)
        fits = tf.logical_and(width <= 1.0, height <= 1.0)
        first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
        found = tf.reduce_any(fits, axis=1)
        # Fallback on a square image: the largest centred window within the ratio range.
        fallback_w = tf.fill([n], min(1.0, high) if low <= 1.0 else 1.0)
        fallback_h = tf.fill([n], 1.0 if low <= 1.0 else 1.0 / low)
        width = tf.where(found, tf.gather(width, first, batch_dims=1), fallback_w)
        height = tf.where(found, tf.gather(height, first, batch_dims=1), fallback_h)
        y0 = tf.where(found, _uniform(stream, [n]) * (1.0 - height), (1.0 - height) / 2)
        x0 = tf.where(found, _uniform(stream, [n]) * (1.0 - width), (1.0 - width) / 2)
        return height, width, y0, x0

    def _hflip(self, images, stream):
        flip = _uniform(stream, [tf.shape(images)[0]]) < 0.5
        return tf.where(per_image(flip), tf.reverse(images, axis=[2]), images)

    def _randaug_op(self, images, stream):
        """One RandAugment slot: each image gets one of the 14 ops (uniformly), sign at random."""
        n = tf.shape(images)[0]
        op = tf.random.stateless_uniform([n], stream.next(), 0, len(randaugment.OPS), dtype=tf.int32)
        sign = tf.where(_uniform(stream, [n]) < 0.5, -1.0, 1.0)
        levels = None
        if self.spec.randaug_mstd > 0:  # timm: magnitude ~ N(m, mstd) per op application, clipped
            noise = tf.random.stateless_normal([n], stream.next())
            magnitude = tf.clip_by_value(self.spec.randaug_m + self.spec.randaug_mstd * noise,
                                         0.0, float(randaugment.MAX_MAGNITUDE))
            levels = magnitude / randaugment.MAX_MAGNITUDE
        return self.apply_randaug_ops(images, op, sign, levels)

    def apply_randaug_ops(self, images, op, sign, levels=None):
        """Apply randaugment.NAMES[op[i]] with direction sign[i] to image i, at normalized level
        levels[i] (default: this spec's magnitude for every image)."""
        return randaugment.apply_ops(images, op, sign * (self._level if levels is None else levels))

    def _color_jitter(self, images, stream):
        """ColorJitter(j, j, j): brightness, contrast, saturation factors ~ U(1 - j, 1 + j), applied in
        this fixed order (torchvision permutes the order per image)."""
        n, j = tf.shape(images)[0], self.spec.jitter
        images = adjust_brightness(images, _uniform(stream, [n], max(0.0, 1 - j), 1 + j))
        images = adjust_contrast(images, _uniform(stream, [n], max(0.0, 1 - j), 1 + j))
        return adjust_saturation(images, _uniform(stream, [n], max(0.0, 1 - j), 1 + j))

    def _apply_layer(self, layer, images, targets, stream):
        transformation = layer.get_random_transformation(images, training=True, seed=stream)
        images = layer.transform_images(images, transformation, training=True)
        if targets is not None:
            targets = layer.transform_labels(targets, transformation, training=True)
        return images, targets

    def _erase(self, images, stream):
        """const: Keras RandomErasing with the mean colour (torchvision's recipe). pixel: timm's
        RandomErasing (`--remode pixel`, one region): with probability p, up to 10 attempts of area
        U(0.02, 1/3) x image and aspect ratio log-uniform in (0.3, 1/0.3), the first that fits
        strictly inside, filled with per-pixel N(0, 1) in normalized space = mean + std * N(0, 1)."""
        if self.spec.erase_mode != "pixel":
            transformation = self._erasing.get_random_transformation(images, training=True, seed=stream)
            return self._erasing.transform_images(images, transformation, training=True)
        mask = self._timm_erase_mask(images, stream)
        noise = tf.random.stateless_normal(tf.shape(images), stream.next())
        fill = tf.constant(self.fill_mean) + tf.constant(self.fill_std) * noise
        return tf.where(mask, fill, images)

    def _timm_erase_mask(self, images, stream):
        """[N, H, W, 1] boolean: each image's erased region (none when not erased or nothing fits)."""
        n, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
        h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
        attempts = [n, image_decode.CROP_ATTEMPTS]
        area = _uniform(stream, attempts, 0.02, 1 / 3) * h * w
        aspect = tf.exp(_uniform(stream, attempts, math.log(0.3), math.log(1 / 0.3)))
        region_h, region_w = tf.round(tf.sqrt(area * aspect)), tf.round(tf.sqrt(area / aspect))
        fits = tf.logical_and(region_h < h, region_w < w)
        first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
        region_h = tf.gather(region_h, first, batch_dims=1)
        region_w = tf.gather(region_w, first, batch_dims=1)
        top = tf.floor(_uniform(stream, [n]) * (h - region_h + 1))
        left = tf.floor(_uniform(stream, [n]) * (w - region_w + 1))
        erase = tf.logical_and(_uniform(stream, [n]) < self.spec.erase_prob, tf.reduce_any(fits, axis=1))
        rows = tf.cast(tf.range(height), tf.float32)[None, :]
        cols = tf.cast(tf.range(width), tf.float32)[None, :]
        in_rows = tf.logical_and(rows >= top[:, None], rows < (top + region_h)[:, None])  # [N, H]
        in_cols = tf.logical_and(cols >= left[:, None], cols < (left + region_w)[:, None])  # [N, W]
        mask = tf.logical_and(in_rows[:, :, None], in_cols[:, None, :])
        return tf.logical_and(mask, erase[:, None, None])[..., None]

    def _mix(self, images, targets, stream):
        if self._mixup is not None and self._cutmix is not None:
            use_cutmix = _uniform(stream, []) < MIX_SWITCH_PROB
            # Each branch gets its own stream so the trace order of the branches does not matter.
            mix_stream, cut_stream = _SeedStream(stream.next()), _SeedStream(stream.next())
            return tf.cond(use_cutmix,
                           lambda: self._apply_layer(self._cutmix, images, targets, cut_stream),
                           lambda: self._apply_layer(self._mixup, images, targets, mix_stream))
        layer = self._mixup if self._mixup is not None else self._cutmix
        return self._apply_layer(layer, images, targets, stream)

    def __call__(self, images, labels, training: bool = True, step=None, replica_id=None):
        """Augment one (per-replica or global) batch. Returns (float32 images in [0, 255],
        float32 targets [N, num_classes]: one-hot, or the MixUp/CutMix mixture of two labels).

        `replica_id` defaults to the current replica (0 outside `strategy.run`); pass it only to
        reproduce a given replica's draws elsewhere.
        """
        images = tf.cast(images, tf.float32)
        targets = tf.one_hot(tf.reshape(tf.cast(labels, tf.int32), [-1]), self.num_classes, dtype=tf.float32)
        if not training or self.spec.is_identity:
            return images, targets
        spec, stream = self.spec, self._stream(step, replica_id)
        if spec.crops:
            images = self._random_resized_crop(images, stream)
        if spec.hflip:
            images = self._hflip(images, stream)
        for _ in range(spec.randaug_n):
            images = self._randaug_op(images, stream)
        if spec.jitter > 0:
            images = self._color_jitter(images, stream)
        if self._erasing is not None:
            images = self._erase(images, stream)
        if spec.mixes:
            images, targets = self._mix(images, targets, stream)
        return images, targets

    def map_dataset(self, dataset: tf.data.Dataset, start_step: int = 0,
                    num_parallel_calls=tf.data.AUTOTUNE) -> tf.data.Dataset:
        """Placement (a): augment a dataset of (images, labels) *batches*; batch i uses step
        start_step + i. Apply it after `.repeat()` so the step keeps increasing across epochs (or
        pass start_step = epoch * steps_per_epoch when rebuilding per epoch, and the resumed step
        on restart). Deterministic even with a parallel map, since the seed is the batch index."""
        return dataset.enumerate(start_step).map(
            lambda i, batch: self(batch[0], batch[1], training=True, step=i),
            num_parallel_calls=num_parallel_calls, deterministic=True)

