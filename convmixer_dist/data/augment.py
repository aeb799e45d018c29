"""The reference ConvMixer CIFAR augmentation recipe, per image, on a batch, in either placement.

Reference (locuslab/convmixer-cifar10 `train.py`, torchvision): RandomResizedCrop(scale=(s, 1),
ratio=(1, 1)) -> horizontal flip -> RandAugment(num_ops=n, magnitude=m) -> ColorJitter(j, j, j) ->
Normalize -> RandomErasing(p) with the ImageNet recipe's timm MixUp/CutMix on top (the paper's
ImageNet runs: `--mixup 0.5 --cutmix 0.5`, switching between the two per batch with probability 0.5).

`BatchAugmenter` takes float32 NHWC images in [0, 255] and int32 labels and returns augmented float32
images in [0, 255] and float32 soft targets. It runs unchanged
  (a) inside a `tf.data` map over batches (`augmenter.map_dataset(ds)`), or
  (b) inside a `tf.function` train step under `strategy.run` (`augmenter(images, labels, step=step)`).

Randomness. Every random draw comes from a *stateless* seed derived from (spec.seed, step, replica id),
so results are a pure function of (seed, step, replica, batch): reproducible across runs, identical
in both placements for the same batch, safe in a parallel tf.data map, and different on each replica.
That last point is why the Keras layers are never *called* here: a Keras random layer draws from its
own `SeedGenerator` variable, which under MirroredStrategy is mirrored, so every replica draws the
same numbers (checked: both replicas got the same RandomBrightness delta every step). Instead we use
the Keras layers' public two-step API, `get_random_transformation(batch, seed=...)` then
`transform_images/transform_labels`, feeding them our per-call seed stream.

Where Keras 3 layers serve, and where they do not (Keras 3.15):
  - MixUp, CutMix, RandomErasing, AutoContrast: used (via the two-step API above).
      * RandomErasing's `factor` is the *upper bound* of a per-image probability drawn uniformly, so
        `factor=p` erases with probability p/2; we pass `factor=(p, p)`. Its default fill is
        N(0, 1) * 255 clipped (half the pixels black); torchvision erases with 0 *after*
        normalization, i.e. the dataset mean, which we pass as the fill (`erase_mode="const"`).
        timm's ImageNet recipe (`--remode pixel`) fills with per-pixel N(0, 1) *after*
        normalization, i.e. mean + std * N(0, 1) here (`erase_mode="pixel"`), and draws its region
        differently (area U(0.02, 1/3), log-uniform aspect ratio in (0.3, 1/0.3), 10 attempts);
        pixel mode is timm's RandomErasing as a whole (its region rule and its fill), const keeps
        Keras' region (height and width fractions drawn independently) with the mean colour.
      * CutMix's `factor` is the range of its Beta alpha; `factor=(a, a)` gives alpha = a, which the
        layer bounds to (0, 1].
      * Keras MixUp/CutMix draw one mixing weight per image (timm's "elem" mode) rather than one per
        batch (timm's default); the targets are exactly the weights of the two mixed images.
  - keras.layers.RandAugment: not used. It picks the `num_ops` operations once per *batch* (every
    image in a batch gets the same ops), its single `factor` is applied per op with different units
    (factor 0.4 means +-144 degrees of rotation and +-40% translation, against 12 degrees / 18% for
    torchvision's magnitude 12), it ignores the `seed` argument of `get_random_transformation`, and
    its Equalization computes one histogram over the whole batch. We compose RandAugment here with
    torchvision's 14 operations, op choice per image, and `keras.ops.image.affine_transform` for the
    geometric ones.
  - RandomColorJitter: not used: brightness is additive (torchvision multiplies), contrast uses the
    per-channel mean (torchvision: the grayscale mean), and it draws from its own SeedGenerator
    inside `transform_images`, ignoring any seed we pass. Jitter is three torchvision blends here.
  - Random resized crop of same-size batches (CIFAR): `tf.image.crop_and_resize` with one random
    box per image. Keras RandomCrop cuts a fixed size (no scale range) and RandomZoom always zooms
    about the centre; `tf.image.sample_distorted_bounding_box` works on one image at a time.
    crop_and_resize is one batched op, works in both placements, and with `crop_ratio=(1, 1)` is
    exactly torchvision's RandomResizedCrop(scale=(s, 1), ratio=(1, 1)): area fraction ~ U(s, 1),
    uniform position, bilinear resize back to `image_size`. Other ratio ranges follow timm's rule
    (10 attempts of area and log-uniform aspect ratio, else the whole image). Image folders and
    TFRecords cut the crop per example from the decoded original instead (`image_decode.py`), so
    there the spec's crop is off.

Magnitude convention. `randaug_m` is torchvision's magnitude (31 bins, 0..30), which the reference
CIFAR recipe uses (`--ra-m 12`). We map it to a normalized level = m / 30 in [0, 1] (the same [0, 1]
scale as keras.layers.RandAugment's `factor`), then each op uses level * its torchvision maximum:
shear 0.3, translate 150/331 of the side, rotate 30 degrees, brightness/color/contrast/sharpness
factor 1 +- 0.9, posterize 8 - round(4 * level) bits, solarize threshold 255 * (1 - level). timm's
`rand-mM` uses a 0..10 scale with the same maxima, so timm's m9 (the paper's ImageNet recipe) is
`randaug_m=27` here. timm's magnitude noise `mstd0.5` is `randaug_mstd=1.5` here (same scale factor
of 3): every op application draws its magnitude from N(randaug_m, randaug_mstd), clipped to [0, 30].
The op list stays torchvision's 14 (timm's `rand-` list has 15: no Identity, plus Invert and
SolarizeAdd, each applied with probability 0.5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import keras
import tensorflow as tf

from convmixer_dist.data import image_decode
from convmixer_dist.data.sources.cifar import CIFAR10_MEAN, CIFAR10_STD
from convmixer_dist.errors import UsageError

RANDAUG_MAX_MAGNITUDE = 30  # torchvision RandAugment: num_magnitude_bins=31 -> magnitudes 0..30
MIX_SWITCH_PROB = 0.5       # timm Mixup(switch_prob=0.5): CutMix instead of MixUp in half the batches

# torchvision RandAugment's operation list, in its order; the index is what we sample per image.
RANDAUG_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness",
               "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
_GEOMETRIC_OPS = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")


def normalize(images, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """(images - mean) / std per channel, in float32; mean/std in the images' scale (0..255 here)."""
    images = tf.cast(images, tf.float32)
    return (images - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def randaug_level(magnitude: float) -> float:
    """torchvision magnitude (0..30) -> normalized level in [0, 1] (see the module docstring)."""
    return float(magnitude) / RANDAUG_MAX_MAGNITUDE


@dataclass(frozen=True)
class AugmentSpec:
    """What to apply to a training batch; the defaults apply nothing (`is_identity`)."""

    crop_scale: float = 1.0   # min area fraction of the random resized crop; 1.0 = off
    crop_ratio: tuple = (1.0, 1.0)  # aspect-ratio (w/h) range of the crop, log-uniform; (1, 1) = square
    randaug_n: int = 0        # RandAugment ops per image; 0 = off
    randaug_m: float = 0      # RandAugment magnitude, torchvision scale 0..30
    randaug_mstd: float = 0.0  # per-op magnitude noise N(randaug_m, mstd), clipped to [0, 30] (timm mstd)
    jitter: float = 0.0       # ColorJitter(brightness=contrast=saturation=jitter)
    erase_prob: float = 0.0   # RandomErasing probability per image
    erase_mode: str = "const"  # erased pixels: const = mean colour, pixel = per-pixel N(mean, std) (timm)
    mixup_alpha: float = 0.0  # MixUp Beta(alpha, alpha); 0 = off
    cutmix_alpha: float = 0.0  # CutMix Beta(alpha, alpha), alpha in (0, 1]; 0 = off
    seed: int = 0
    hflip: bool = False       # random horizontal flip (the reference recipe flips)

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    @property
    def crops(self) -> bool:
        return self.crop_scale < 1.0 or tuple(self.crop_ratio) != (1.0, 1.0)

    @property
    def is_identity(self) -> bool:
        return (not self.crops and self.randaug_n == 0 and self.jitter == 0
                and self.erase_prob == 0 and not self.hflip and not self.mixes)

    def validate(self) -> "AugmentSpec":
        """Raise UsageError naming the flag if a value is out of range; return self."""
        def check(ok: bool, flag: str, expected: str, value) -> None:
            if not ok:
                raise UsageError(f"--{flag}={value!r}: expected {expected}")

        check(0 < self.crop_scale <= 1, "crop_scale", "a minimum crop area fraction in (0, 1]; 1 = off",
              self.crop_scale)
        check(isinstance(self.randaug_n, int) and 0 <= self.randaug_n <= 10, "randaug_n",
              "an integer number of RandAugment ops in [0, 10]; 0 = off", self.randaug_n)
        check(0 <= self.randaug_m <= RANDAUG_MAX_MAGNITUDE, "randaug_m",
              f"a RandAugment magnitude in [0, {RANDAUG_MAX_MAGNITUDE}] (torchvision scale)", self.randaug_m)
        check(len(self.crop_ratio) == 2 and 0 < self.crop_ratio[0] <= self.crop_ratio[1], "crop_ratio",
              "LOW,HIGH with 0 < LOW <= HIGH", self.crop_ratio)
        check(0 <= self.randaug_mstd <= RANDAUG_MAX_MAGNITUDE, "randaug_mstd",
              f"a magnitude standard deviation in [0, {RANDAUG_MAX_MAGNITUDE}]", self.randaug_mstd)
        check(self.erase_mode in ("const", "pixel"), "erase_mode", "const or pixel", self.erase_mode)
        check(0 <= self.jitter < 1, "jitter", "a color-jitter strength in [0, 1)", self.jitter)
        check(0 <= self.erase_prob <= 1, "erase_prob", "a random-erasing probability in [0, 1]",
              self.erase_prob)
        check(0 <= self.mixup_alpha <= 100 and math.isfinite(self.mixup_alpha), "mixup_alpha",
              "a MixUp Beta alpha >= 0 (0 = off; the recipe uses 0.5)", self.mixup_alpha)
        check(0 <= self.cutmix_alpha <= 1, "cutmix_alpha",
              "a CutMix Beta alpha in [0, 1] (0 = off; Keras CutMix bounds alpha to 1)", self.cutmix_alpha)
        check(isinstance(self.seed, int) and 0 <= self.seed < 2**31, "seed",
              "an integer seed in [0, 2**31)", self.seed)
        return self


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


def _per_image(x: tf.Tensor) -> tf.Tensor:
    """[N] -> [N, 1, 1, 1] for broadcasting over NHWC."""
    return tf.reshape(x, [-1, 1, 1, 1])


def _grayscale(images: tf.Tensor) -> tf.Tensor:
    """ITU-R 601-2 luma (torchvision's rgb_to_grayscale), keeping a channel axis of 1."""
    return tf.reduce_sum(images * tf.constant([0.299, 0.587, 0.114], images.dtype), -1, keepdims=True)


def _blend(degenerate: tf.Tensor, images: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """torchvision `_blend`: degenerate + factor * (images - degenerate), clipped to [0, 255]."""
    return tf.clip_by_value(degenerate + _per_image(factor) * (images - degenerate), 0.0, 255.0)


def _adjust_brightness(images, factor):
    return _blend(tf.zeros_like(images), images, factor)


def _adjust_saturation(images, factor):  # torchvision "Color" / ColorJitter saturation
    return _blend(_grayscale(images), images, factor)


def _adjust_contrast(images, factor):
    mean = tf.reduce_mean(_grayscale(images), axis=[1, 2, 3], keepdims=True)
    return _blend(mean, images, factor)


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
    return _blend(degenerate, images, factor)


def _posterize(images, bits):
    """Keep the top `bits` bits of each 8-bit value (per image)."""
    shift = tf.cast(_per_image(8 - bits), tf.int32)
    pixels = tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.int32)
    return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(pixels, shift), shift), tf.float32)


def _solarize(images, threshold):
    return tf.where(images >= _per_image(threshold), 255.0 - images, images)


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


def _affine(images: tf.Tensor, name: str, signed_level: tf.Tensor) -> tf.Tensor:
    """torchvision's geometric RandAugment ops via keras.ops.image.affine_transform: nearest
    neighbour, black fill, shears about the origin, rotation about the centre. The [N, 8] matrices
    map output to input coordinates."""
    n = tf.shape(images)[0]
    height, width = tf.cast(tf.shape(images)[1], tf.float32), tf.cast(tf.shape(images)[2], tf.float32)
    one, zero = tf.ones([n]), tf.zeros([n])
    if name == "shear_x":
        rows = [one, 0.3 * signed_level, zero, zero, one, zero]
    elif name == "shear_y":
        rows = [one, zero, zero, 0.3 * signed_level, one, zero]
    elif name == "translate_x":
        rows = [one, zero, -150.0 / 331.0 * width * signed_level, zero, one, zero]
    elif name == "translate_y":
        rows = [one, zero, zero, zero, one, -150.0 / 331.0 * height * signed_level]
    else:  # rotate
        angle = 30.0 * signed_level * (math.pi / 180.0)
        cos, sin = tf.cos(angle), tf.sin(angle)
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        rows = [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy]
    matrices = tf.stack(rows + [zero, zero], axis=1)
    return keras.ops.image.affine_transform(images, matrices, interpolation="nearest",
                                            fill_mode="constant", fill_value=0)


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
        self._level = randaug_level(spec.randaug_m)
        # Explicit float32: under a mixed-precision global policy these layers would compute in float16.
        kw = dict(dtype="float32", seed=spec.seed)
        self._autocontrast = keras.layers.AutoContrast(value_range=(0, 255), dtype="float32")
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
        return tf.where(_per_image(flip), tf.reverse(images, axis=[2]), images)

    def _randaug_op(self, images, stream):
        """One RandAugment slot: each image gets one of the 14 ops (uniformly), sign at random."""
        n = tf.shape(images)[0]
        op = tf.random.stateless_uniform([n], stream.next(), 0, len(RANDAUG_OPS), dtype=tf.int32)
        sign = tf.where(_uniform(stream, [n]) < 0.5, -1.0, 1.0)
        levels = None
        if self.spec.randaug_mstd > 0:  # timm: magnitude ~ N(m, mstd) per op application, clipped
            noise = tf.random.stateless_normal([n], stream.next())
            magnitude = tf.clip_by_value(self.spec.randaug_m + self.spec.randaug_mstd * noise,
                                         0.0, float(RANDAUG_MAX_MAGNITUDE))
            levels = magnitude / RANDAUG_MAX_MAGNITUDE
        return self.apply_randaug_ops(images, op, sign, levels)

    def apply_randaug_ops(self, images, op, sign, levels=None):
        """Apply RANDAUG_OPS[op[i]] with direction sign[i] to image i, at normalized level levels[i]
        (default: this spec's magnitude for every image).

        The batch is partitioned by op, so each op runs only on the images that drew it (about 1x the
        work of one op per slot, instead of computing all 14 on the whole batch and selecting)."""
        indices = tf.dynamic_partition(tf.range(tf.shape(images)[0]), op, len(RANDAUG_OPS))
        parts = tf.dynamic_partition(images, op, len(RANDAUG_OPS))
        signed = sign * (self._level if levels is None else levels)
        signs = tf.dynamic_partition(signed, op, len(RANDAUG_OPS))
        # Partitions are often empty; some kernels mishandle an empty batch (Keras' min asserts,
        # TF's CPU depthwise conv returns the wrong shape), so empty ones are passed through.
        outputs = [tf.cond(tf.size(part) > 0,
                           lambda n=name, x=part, sg=part_sign: self._randaug_single_op(n, x, sg),
                           lambda x=part: x)
                   for name, part, part_sign in zip(RANDAUG_OPS, parts, signs)]
        out = tf.dynamic_stitch(indices, outputs)
        return tf.ensure_shape(out, images.shape)

    def _randaug_single_op(self, name: str, images, signed_level):
        level = tf.abs(signed_level)
        enhance = 1.0 + 0.9 * signed_level
        if name in _GEOMETRIC_OPS:
            return _affine(images, name, signed_level)
        if name == "brightness":
            return _adjust_brightness(images, enhance)
        if name == "color":
            return _adjust_saturation(images, enhance)
        if name == "contrast":
            return _adjust_contrast(images, enhance)
        if name == "sharpness":
            return _adjust_sharpness(images, enhance)
        if name == "posterize":
            return _posterize(images, 8 - tf.round(4.0 * level))
        if name == "solarize":
            return _solarize(images, 255.0 * (1.0 - level))
        if name == "autocontrast":
            return self._autocontrast.transform_images(images, None)
        if name == "equalize":
            return _equalize(images)
        return images  # identity

    def _color_jitter(self, images, stream):
        """ColorJitter(j, j, j): brightness, contrast, saturation factors ~ U(1 - j, 1 + j), applied in
        this fixed order (torchvision permutes the order per image)."""
        n, j = tf.shape(images)[0], self.spec.jitter
        images = _adjust_brightness(images, _uniform(stream, [n], max(0.0, 1 - j), 1 + j))
        images = _adjust_contrast(images, _uniform(stream, [n], max(0.0, 1 - j), 1 + j))
        return _adjust_saturation(images, _uniform(stream, [n], max(0.0, 1 - j), 1 + j))

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

