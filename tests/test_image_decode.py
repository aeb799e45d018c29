"""image_decode: timm's random-resized-crop window (scale/ratio distributions, fallback), decoding only
the JPEG crop window equals decoding then cropping, and timm's crop_pct evaluation transform."""
from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from convmixer_dist.data import image_decode

IMAGENET_RATIO = (3 / 4, 4 / 3)


def _windows(height, width, scale, ratio, n=3000):
    fn = tf.function(lambda s: tf.stack(image_decode.sample_crop_window(height, width, s, scale, ratio)))
    out = tf.map_fn(fn, tf.stack([tf.fill([n], 5), tf.range(n)], axis=1), fn_output_signature=tf.int32)
    return out.numpy()  # [n, 4]: top, left, crop_h, crop_w


def test_crop_area_and_log_aspect_follow_the_requested_uniform_distributions():
    # Large image, scale capped so every first attempt fits: the accepted windows are exactly the
    # requested distributions (up to rounding to whole pixels).
    size, scale = 2000, (0.08, 0.4)
    top, left, h, w = _windows(size, size, scale, IMAGENET_RATIO).T
    area = h * w / size ** 2
    log_aspect = np.log(w / h)
    low, high = math.log(IMAGENET_RATIO[0]), math.log(IMAGENET_RATIO[1])
    assert stats.kstest(area, stats.uniform(scale[0], scale[1] - scale[0]).cdf).pvalue > 1e-3
    assert stats.kstest(log_aspect, stats.uniform(low, high - low).cdf).pvalue > 1e-3
    # Positions: uniform over every place the window fits (both ends included).
    assert stats.kstest(top / (size - h + 1), "uniform").pvalue > 1e-3
    assert stats.kstest(left / (size - w + 1), "uniform").pvalue > 1e-3
    assert (top + h <= size).all() and (left + w <= size).all() and (top >= 0).all()


def test_square_ratio_gives_square_crops_with_uniform_area():
    top, left, h, w = _windows(1000, 1000, (0.35, 1.0), (1.0, 1.0)).T
    assert np.abs(h - w).max() <= 1
    assert stats.kstest(h * w / 1e6, stats.uniform(0.35, 0.65).cdf).pvalue > 1e-3


def test_windows_on_imagenet_like_images_stay_inside_and_within_the_ratio():
    top, left, h, w = _windows(375, 500, (0.08, 1.0), IMAGENET_RATIO).T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 375).all() and (left + w <= 500).all()
    # Whole-pixel rounding moves the ratio slightly past its bounds on small windows only.
    assert (w / h >= 0.75 * 0.97).all() and (w / h <= 4 / 3 / 0.97).all()
    # Large areas often fail to fit (10 attempts), as in timm: the mean area is below 0.54.
    assert 0.3 < (h * w / (375 * 500)).mean() < 0.54


def test_fallback_is_timms_central_crop_clamped_to_the_ratio():
    # A 400-high, 100-wide image cannot hold any window of ratio >= 4 with area >= 90%.
    top, left, h, w = _windows(400, 100, (0.9, 1.0), (4.0, 5.0), n=5).T
    assert (w == 100).all() and (h == 25).all() and (top == 187).all() and (left == 0).all()
    # The image is wider than the widest allowed ratio: full height, width clamped, centred.
    top, left, h, w = _windows(400, 100, (0.9, 1.0), (0.1, 0.2), n=5).T
    assert (h == 400).all() and (w == 80).all() and (top == 0).all() and (left == 10).all()


def _jpeg(height=90, width=120, seed=0, png=False, subsample=False):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = (np.stack([xx * 2, yy * 2, xx + yy], -1) + rng.normal(0, 8, (height, width, 3)))
    image = np.clip(image, 0, 255).astype(np.uint8)
    if png:
        return tf.io.encode_png(image), image
    return tf.io.encode_jpeg(image, quality=90, chroma_downsampling=subsample), image


def test_decode_and_crop_equals_decode_then_crop_on_the_same_window():
    data, _ = _jpeg()  # 4:4:4 chroma: bit-identical
    for i in range(20):
        seed = tf.constant([3, i], tf.int64)
        window = [int(v) for v in image_decode.sample_crop_window(90, 120, seed, (0.08, 1), IMAGENET_RATIO)]
        top, left, h, w = window
        cropped_first = tf.image.decode_and_crop_jpeg(data, window, channels=3).numpy()
        full = tf.io.decode_jpeg(data, channels=3).numpy()
        np.testing.assert_array_equal(cropped_first, full[top:top + h, left:left + w])
        fast = image_decode.decode_random_crop(data, seed, 32, (0.08, 1), IMAGENET_RATIO, decode_crop=True)
        slow = image_decode.decode_random_crop(data, seed, 32, (0.08, 1), IMAGENET_RATIO, decode_crop=False)
        np.testing.assert_array_equal(fast.numpy(), slow.numpy())
        assert fast.shape == (32, 32, 3) and fast.dtype == tf.uint8


def test_subsampled_chroma_differs_only_in_the_windows_edge_columns():
    # 4:2:0 JPEGs (most photos): libjpeg's horizontal chroma upsampling sees no neighbour beyond the
    # window, so its first and last columns may differ by a few levels; every other pixel is identical.
    data, _ = _jpeg(subsample=True)
    full = tf.io.decode_jpeg(data, channels=3).numpy().astype(int)
    for i in range(20):
        seed = tf.constant([3, i], tf.int64)
        window = [int(v) for v in image_decode.sample_crop_window(90, 120, seed, (0.08, 1), IMAGENET_RATIO)]
        top, left, h, w = window
        cropped_first = tf.image.decode_and_crop_jpeg(data, window, channels=3).numpy().astype(int)
        expected = full[top:top + h, left:left + w]
        np.testing.assert_array_equal(cropped_first[:, 1:-1], expected[:, 1:-1])
        assert np.abs(cropped_first - expected).max() <= 4


def test_png_is_decoded_whole_and_cropped_to_the_same_window():
    data, pixels = _jpeg(png=True)
    seed = tf.constant([1, 2], tf.int64)
    top, left, h, w = [int(v) for v in image_decode.sample_crop_window(90, 120, seed, (0.08, 1),
                                                                      IMAGENET_RATIO)]
    expected = image_decode.resize_to(pixels[top:top + h, left:left + w], 16, 16)
    out = image_decode.decode_random_crop(data, seed, 16, (0.08, 1), IMAGENET_RATIO)
    np.testing.assert_array_equal(out.numpy(), expected.numpy())


@pytest.mark.parametrize("height,width,fraction,resized,offset", [
    (375, 500, 0.96, (233, 310), (4, 43)),   # timm ConvMixer: 224 / 0.96 -> 233, then centre 224
    (500, 375, 1.0, (298, 224), (37, 0)),
])
def test_center_crop_is_timms_crop_pct_transform(height, width, fraction, resized, offset):
    image = tf.constant(np.random.default_rng(0).integers(0, 255, (height, width, 3)), tf.uint8)
    out = image_decode.center_crop(image, 224, fraction)
    full = image_decode.resize_to(image, *resized)
    top, left = offset
    np.testing.assert_array_equal(out.numpy(), full.numpy()[top:top + 224, left:left + 224])


def test_center_crop_of_a_batch_crops_each_image_alike():
    images = tf.constant(np.random.default_rng(1).integers(0, 255, (3, 90, 70, 3)), tf.uint8)
    batched = image_decode.center_crop(images, 32, 0.875)
    assert batched.shape == (3, 32, 32, 3)
    for image, out in zip(images, batched):
        np.testing.assert_array_equal(out.numpy(), image_decode.center_crop(image, 32, 0.875).numpy())
