"""BatchAugmenter: range/shape/dtype, seeding, both placements (tf.data and strategy.run on 2 logical
CPUs), MixUp/CutMix targets, the RandAugment operations, and AugmentSpec validation."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf


def _two_logical_cpus() -> list[str]:
    """Split the CPU into 2 logical devices (must happen before any TF op in this process)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    except RuntimeError:
        pass  # Runtime already initialized (e.g. by another test module): use what it has.
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    assert len(devices) >= 2, f"need 2 logical CPU devices, have {devices}"
    return devices[:2]


DEVICES = _two_logical_cpus()

from convmixer_dist.data.augment import BatchAugmenter, normalize  # noqa: E402  (after the device split)
from convmixer_dist.data.augment_spec import AugmentSpec  # noqa: E402
from convmixer_dist.data.randaugment import NAMES as RANDAUG_OPS  # noqa: E402
from convmixer_dist.data.sources.cifar import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from convmixer_dist.errors import UsageError  # noqa: E402

NUM_CLASSES = 10
SIZE = 32
FULL = AugmentSpec(crop_scale=0.5, randaug_n=2, randaug_m=12, jitter=0.2, erase_prob=0.5,
                   mixup_alpha=0.5, cutmix_alpha=0.5, hflip=True, seed=7)
PER_IMAGE = AugmentSpec(crop_scale=0.5, randaug_n=2, randaug_m=12, jitter=0.2, erase_prob=0.5,
                        hflip=True, seed=7)


def _batch(n=16, seed=0, size=SIZE):
    rng = np.random.default_rng(seed)
    # Smooth-ish images with structure (a random gradient plus noise), values in [0, 255].
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0, 255, (n, 1, 1, 3)) * xx[None, :, :, None] + rng.uniform(0, 120, (n, 1, 1, 3))
    images = np.clip(base + rng.normal(0, 20, (n, size, size, 3)), 0, 255).astype("float32")
    labels = rng.integers(0, NUM_CLASSES, n).astype("int32")
    return tf.constant(images), tf.constant(labels)


# ---- spec -------------------------------------------------------------------------------------------
def test_default_spec_is_identity_and_returns_input_with_one_hot():
    spec = AugmentSpec()
    assert spec.is_identity and not spec.mixes
    images, labels = _batch(4)
    out, targets = BatchAugmenter(spec, NUM_CLASSES, SIZE)(images, labels, step=0)
    np.testing.assert_array_equal(out.numpy(), images.numpy())
    np.testing.assert_array_equal(targets.numpy(), np.eye(NUM_CLASSES)[labels.numpy()])
    assert not FULL.is_identity and FULL.mixes and not PER_IMAGE.mixes


@pytest.mark.parametrize("field,value,flag", [
    ("crop_scale", 0.0, "--crop_scale"), ("crop_scale", 1.5, "--crop_scale"),
    ("randaug_n", -1, "--randaug_n"), ("randaug_n", 1.5, "--randaug_n"),
    ("randaug_m", 31, "--randaug_m"), ("jitter", -0.1, "--jitter"),
    ("erase_prob", 1.2, "--erase_prob"), ("mixup_alpha", -1.0, "--mixup_alpha"),
    ("cutmix_alpha", 2.0, "--cutmix_alpha"),
])
def test_validate_names_the_flag(field, value, flag):
    with pytest.raises(UsageError, match=flag):
        AugmentSpec(**{field: value}).validate()
    with pytest.raises(UsageError, match=flag):  # The augmenter validates too.
        BatchAugmenter(AugmentSpec(**{field: value}), NUM_CLASSES, SIZE)


def test_training_false_is_identity():
    images, labels = _batch(4)
    out, targets = BatchAugmenter(FULL, NUM_CLASSES, SIZE)(images, labels, training=False)
    np.testing.assert_array_equal(out.numpy(), images.numpy())
    np.testing.assert_array_equal(targets.numpy().argmax(1), labels.numpy())


# ---- range, shape, seeding ---------------------------------------------------------------------------
def test_full_recipe_keeps_shape_dtype_range_and_changes_images():
    images, labels = _batch(32)
    out, targets = BatchAugmenter(FULL, NUM_CLASSES, SIZE)(images, labels, step=3)
    assert out.shape == images.shape and out.dtype == tf.float32
    assert targets.shape == (32, NUM_CLASSES) and targets.dtype == tf.float32
    assert float(tf.reduce_min(out)) >= 0.0 and float(tf.reduce_max(out)) <= 255.0
    changed = np.abs(out.numpy() - images.numpy()).reshape(32, -1).max(1) > 1.0
    assert changed.all()


def test_random_resized_crop_resizes_to_image_size():
    images, labels = _batch(4, size=40)
    out, _ = BatchAugmenter(AugmentSpec(crop_scale=0.3), NUM_CLASSES, SIZE)(images, labels, step=0)
    assert out.shape == (4, SIZE, SIZE, 3)


def test_deterministic_under_seed_and_step():
    images, labels = _batch(16)
    a = BatchAugmenter(FULL, NUM_CLASSES, SIZE)(images, labels, step=11)
    b = BatchAugmenter(FULL, NUM_CLASSES, SIZE)(images, labels, step=11)  # a fresh augmenter
    other_step = BatchAugmenter(FULL, NUM_CLASSES, SIZE)(images, labels, step=12)
    other_seed = BatchAugmenter(dataclasses.replace(FULL, seed=8), NUM_CLASSES, SIZE)(
        images, labels, step=11)
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
    assert not np.array_equal(a[0].numpy(), other_step[0].numpy())
    assert not np.array_equal(a[0].numpy(), other_seed[0].numpy())


def test_eager_calls_without_step_count_from_zero_and_graph_requires_step():
    images, labels = _batch(8)
    augmenter = BatchAugmenter(PER_IMAGE, NUM_CLASSES, SIZE)
    first, second = augmenter(images, labels), augmenter(images, labels)
    np.testing.assert_array_equal(first[0].numpy(), augmenter(images, labels, step=0)[0].numpy())
    np.testing.assert_array_equal(second[0].numpy(), augmenter(images, labels, step=1)[0].numpy())
    with pytest.raises(ValueError, match="step="):
        tf.function(lambda x, y: augmenter(x, y))(images, labels)


# ---- placements --------------------------------------------------------------------------------------
def test_tf_data_and_tf_function_give_identical_results():
    images, labels = _batch(24)
    augmenter = BatchAugmenter(FULL, NUM_CLASSES, SIZE)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    from_data = list(augmenter.map_dataset(dataset, start_step=100))
    step_fn = tf.function(lambda x, y, s: augmenter(x, y, step=s))
    for i, (out, targets) in enumerate(from_data):
        x, y = images[8 * i: 8 * i + 8], labels[8 * i: 8 * i + 8]
        on_device = step_fn(x, y, tf.constant(100 + i, tf.int64))
        np.testing.assert_array_equal(out.numpy(), on_device[0].numpy())
        np.testing.assert_array_equal(targets.numpy(), on_device[1].numpy())


def _run_on_two_replicas(spec, images, labels, steps):
    strategy = tf.distribute.MirroredStrategy(DEVICES)
    with strategy.scope():
        augmenter = BatchAugmenter(spec, NUM_CLASSES, SIZE)
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat(len(steps))
    dist = strategy.experimental_distribute_dataset(dataset)  # splits each global batch in 2

    @tf.function
    def train_step(batch, step):
        return strategy.run(lambda x, y: augmenter(x, y, step=step), args=batch)

    outputs = []
    for batch, step in zip(dist, steps):
        out, targets = train_step(batch, tf.constant(step, tf.int64))
        outputs.append(([t.numpy() for t in strategy.experimental_local_results(out)],
                        [t.numpy() for t in strategy.experimental_local_results(targets)]))
    return outputs


def test_on_device_replicas_match_tf_data_for_their_shard_and_differ_from_each_other():
    images, labels = _batch(16)
    identical = tf.concat([images[:8], images[:8]], 0)  # both replicas see the same 8 images
    (outs, targets), = _run_on_two_replicas(FULL, identical, labels, steps=[5])
    augmenter = BatchAugmenter(FULL, NUM_CLASSES, SIZE)
    for r in range(2):
        shard = slice(8 * r, 8 * r + 8)
        expected = augmenter(identical[shard], labels[shard], step=5, replica_id=r)
        np.testing.assert_array_equal(outs[r], expected[0].numpy())
        np.testing.assert_array_equal(targets[r], expected[1].numpy())
    # Independent randomness per replica (a Keras layer's own SeedGenerator would repeat it).
    assert not np.allclose(outs[0], outs[1])


def _stats(images: np.ndarray) -> dict[str, np.ndarray]:
    flat = images.reshape(len(images), -1, 3)
    return {"mean": flat.mean((1, 2)), "std": flat.std((1, 2)),
            "erased": (np.abs(images - np.array(CIFAR10_MEAN, "float32")).max(-1) < 1e-3
                       ).reshape(len(images), -1).mean(1) > 0.01}


def test_on_device_and_tf_data_have_the_same_statistics():
    # The same 256 images, augmented (i) as one global batch in tf.data and (ii) split over 2
    # replicas inside strategy.run; the draws differ, the distributions must not.
    images, labels = _batch(256, seed=1)
    steps = [0, 1]
    augmenter = BatchAugmenter(PER_IMAGE, NUM_CLASSES, SIZE)
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat(len(steps))
    host = np.concatenate([x.numpy() for x, _ in augmenter.map_dataset(dataset)])
    device = np.concatenate([np.concatenate(outs) for outs, _ in
                             _run_on_two_replicas(PER_IMAGE, images, labels, steps)])
    assert host.shape == device.shape == (512, SIZE, SIZE, 3)
    assert not np.array_equal(host, device)
    a, b = _stats(host), _stats(device)
    for key in ("mean", "std"):
        # Two-sample z-test on the per-image statistic's mean, and similar spread.
        se = np.sqrt(a[key].var() / len(a[key]) + b[key].var() / len(b[key]))
        assert abs(a[key].mean() - b[key].mean()) < 4 * se, key
        assert 0.8 < a[key].std() / b[key].std() < 1.25, key
    # Erasing probability 0.5 in both placements (binomial, n=512: sd ~ 0.022).
    assert abs(a["erased"].mean() - 0.5) < 0.09 and abs(b["erased"].mean() - 0.5) < 0.09


# ---- MixUp / CutMix ----------------------------------------------------------------------------------
def _distinct_label_batch(n=16):
    images, _ = _batch(n)
    return images, tf.constant(np.arange(n) % NUM_CLASSES, tf.int32)


def test_mixup_targets_sum_to_one_and_mix_the_two_images():
    images, labels = _distinct_label_batch()
    out, targets = BatchAugmenter(AugmentSpec(mixup_alpha=0.5), NUM_CLASSES, SIZE)(images, labels, step=0)
    x, y, out, t = images.numpy(), labels.numpy(), out.numpy(), targets.numpy()
    np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-5)
    mixed = 0
    for i in range(len(x)):
        assert np.count_nonzero(t[i] > 1e-6) <= 2
        w = t[i, y[i]]
        if w > 0.999:
            continue
        mixed += 1
        # The partner: the image whose label carries the rest of the weight and reproduces the pixels.
        errors = [np.abs(w * x[i] + (1 - w) * x[j] - out[i]).max()
                  for j in range(len(x)) if y[j] != y[i] and t[i, y[j]] > 1e-6]
        assert errors and min(errors) < 1e-2
    assert mixed >= len(x) // 2


def test_cutmix_targets_match_pasted_area():
    images, labels = _distinct_label_batch()
    out, targets = BatchAugmenter(AugmentSpec(cutmix_alpha=1.0), NUM_CLASSES, SIZE)(images, labels, step=0)
    x, y, out, t = images.numpy(), labels.numpy(), out.numpy(), targets.numpy()
    np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-5)
    for i in range(len(x)):
        own = np.all(out[i] == x[i], axis=-1).mean()  # fraction of pixels kept from image i
        assert abs(own - t[i, y[i]]) < 2.5 / SIZE + 1e-6  # box edges are rounded to whole pixels
        assert np.count_nonzero(t[i] > 1e-6) <= 2


def test_mixup_and_cutmix_switch_per_batch():
    images, labels = _distinct_label_batch()
    augmenter = BatchAugmenter(AugmentSpec(mixup_alpha=0.5, cutmix_alpha=0.5), NUM_CLASSES, SIZE)
    kinds = set()
    for step in range(12):
        out, targets = augmenter(images, labels, step=step)
        np.testing.assert_allclose(targets.numpy().sum(1), 1.0, atol=1e-5)
        kept = np.all(out.numpy() == images.numpy(), axis=-1).reshape(len(labels), -1).mean(1)
        weights = targets.numpy()[np.arange(len(labels)), labels.numpy()]
        # CutMix keeps untouched pixels; MixUp blends every pixel of a mixed image.
        kinds.add("cutmix" if np.all(kept > 0.0) or np.abs(kept - weights).max() < 0.1 else "mixup")
    assert kinds == {"cutmix", "mixup"}


# ---- RandAugment operations --------------------------------------------------------------------------
def _ops(images, names, magnitude, sign=1.0):
    augmenter = BatchAugmenter(AugmentSpec(randaug_n=1, randaug_m=magnitude), NUM_CLASSES, SIZE)
    op = tf.constant([RANDAUG_OPS.index(n) for n in names], tf.int32)
    return augmenter.apply_randaug_ops(images, op, tf.fill([len(names)], sign)).numpy()


def test_randaug_operations_follow_torchvision_definitions():
    images, _ = _batch(1)
    x = images.numpy()[0]
    names = ["identity", "solarize", "posterize", "brightness", "translate_x", "equalize"]
    out = _ops(tf.repeat(images, len(names), 0), names, magnitude=30, sign=-1.0)
    np.testing.assert_array_equal(out[0], x)
    np.testing.assert_allclose(out[1], 255.0 - x)                    # threshold 0: everything inverts
    assert np.all(out[2] % 16 == 0)                                   # 8 - 4 = 4 bits kept
    np.testing.assert_allclose(out[3], x * 0.1, rtol=1e-5)            # brightness factor 1 - 0.9
    # Shift left by 150/331 * 32 = 14.5 px, nearest neighbour: by 14 or 15 whole pixels, black fill.
    matches = [k for k in (14, 15) if np.array_equal(out[4][:, :SIZE - k], x[:, k:])
               and np.all(out[4][:, SIZE - k + 1:] == 0)]
    assert len(matches) == 1, matches
    for c in range(3):                                                # equalized: ~flat histogram
        counts = np.histogram(out[5][..., c], bins=4, range=(0, 256))[0]
        assert counts.min() > 0.15 * x[..., c].size
    at_zero = _ops(tf.repeat(images, 3, 0), ["rotate", "shear_x", "contrast"], magnitude=0)
    np.testing.assert_allclose(at_zero, np.repeat(x[None], 3, 0), atol=1e-3)


def test_normalize_uses_per_channel_statistics():
    images = tf.fill([2, 4, 4, 3], 0.0) + tf.constant(CIFAR10_MEAN)
    np.testing.assert_allclose(normalize(images, CIFAR10_MEAN, CIFAR10_STD).numpy(), 0.0, atol=1e-5)
    ones = normalize(images + tf.constant(CIFAR10_STD), CIFAR10_MEAN, CIFAR10_STD).numpy()
    np.testing.assert_allclose(ones, 1.0, atol=1e-5)


def test_the_input_pipeline_normalizes_with_the_published_statistics(tmp_path):
    from convmixer_dist.config import Config
    from convmixer_dist.data import pipeline as data

    (tmp_path / "train" / "a").mkdir(parents=True)
    published = {"cifar10": ([0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]),
                 "cifar100": ([0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]),
                 "image_folder": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
                 "tfrecord": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}
    for dataset, (mean, std) in published.items():
        got_mean, got_std = data.normalization(Config(dataset=dataset, data_dir=str(tmp_path)))
        np.testing.assert_allclose(np.array(got_mean) / 255, mean, atol=1e-6, err_msg=dataset)
        np.testing.assert_allclose(np.array(got_std) / 255, std, atol=1e-6, err_msg=dataset)


# ---- timm's ImageNet additions: crop aspect ratio, magnitude noise, per-pixel erasing ----------------
def test_defaults_keep_the_cifar_recipe_draws():
    # crop_ratio (1, 1), randaug_mstd 0 and erase_mode const draw nothing extra: same output as a
    # spec that never heard of them.
    images, labels = _batch(8)
    spec = dataclasses.replace(PER_IMAGE, crop_ratio=(1.0, 1.0), randaug_mstd=0.0, erase_mode="const")
    a, _ = BatchAugmenter(PER_IMAGE, NUM_CLASSES, SIZE)(images, labels, step=4)
    b, _ = BatchAugmenter(spec, NUM_CLASSES, SIZE)(images, labels, step=4)
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_crop_ratio_gives_non_square_windows_within_the_range():
    augmenter = BatchAugmenter(AugmentSpec(crop_scale=0.08, crop_ratio=(0.75, 4 / 3)), NUM_CLASSES, SIZE)
    stream = augmenter._stream(0, 0)
    height, width, y0, x0 = (t.numpy() for t in augmenter._crop_boxes(4000, stream))
    ratio = width / height
    assert ratio.min() >= 0.75 - 1e-6 and ratio.max() <= 4 / 3 + 1e-6
    assert np.abs(np.log(ratio)).mean() > 0.1  # not square
    assert (y0 >= 0).all() and (y0 + height <= 1 + 1e-6).all() and (x0 + width <= 1 + 1e-6).all()


def test_randaug_magnitude_noise_varies_the_magnitude_per_image():
    images, _ = _batch(1)
    batch = tf.repeat(images, 64, 0)
    base = dataclasses.replace(AugmentSpec(), randaug_n=1, randaug_m=15, seed=3)
    op = tf.fill([64], RANDAUG_OPS.index("brightness"))
    sign = tf.ones([64])
    fixed = BatchAugmenter(base, NUM_CLASSES, SIZE).apply_randaug_ops(batch, op, sign).numpy()
    assert np.ptp(fixed.reshape(64, -1).mean(1)) < 1e-3   # one magnitude for every image
    noisy_spec = dataclasses.replace(base, randaug_mstd=3.0)
    augmenter = BatchAugmenter(noisy_spec, NUM_CLASSES, SIZE)
    levels = tf.clip_by_value(15 + 3.0 * tf.random.stateless_normal([64], [1, 2]), 0, 30) / 30
    noisy = augmenter.apply_randaug_ops(batch, op, sign, levels).numpy()
    factors = noisy.reshape(64, -1).mean(1) / images.numpy().mean()
    # brightness factor = 1 + 0.9 * level; the recovered magnitudes have the requested spread
    magnitudes = (factors - 1) / 0.9 * 30
    assert 2.0 < magnitudes.std() < 4.0 and abs(magnitudes.mean() - 15) < 1.5
    out, _ = augmenter(batch, tf.zeros([64], tf.int32), step=0)  # the full path draws levels
    assert out.shape == batch.shape


def test_pixel_erasing_fills_with_per_pixel_noise_and_const_with_the_mean():
    images = tf.fill([32, SIZE, SIZE, 3], 0.0)
    labels = tf.zeros([32], tf.int32)
    mean, std = (100.0, 110.0, 120.0), (50.0, 55.0, 60.0)
    outs = {}
    for mode in ("const", "pixel"):
        spec = AugmentSpec(erase_prob=1.0, erase_mode=mode, seed=5)
        outs[mode], _ = BatchAugmenter(spec, NUM_CLASSES, SIZE, fill_mean=mean, fill_std=std)(
            images, labels, step=0)
    const, pixel = outs["const"].numpy(), outs["pixel"].numpy()
    erased = const[..., 0] != 0
    assert erased.any()
    np.testing.assert_allclose(const[erased], np.broadcast_to(mean, const[erased].shape))
    values = pixel[pixel[..., 0] != 0]
    np.testing.assert_allclose(values.mean(0), mean, atol=3)
    np.testing.assert_allclose(values.std(0), std, rtol=0.05)


def test_pixel_erasing_regions_follow_timms_area_and_aspect_rule():
    images = tf.fill([400, 64, 64, 3], 0.0)
    spec = AugmentSpec(erase_prob=0.5, erase_mode="pixel", seed=2)
    augmenter = BatchAugmenter(spec, NUM_CLASSES, 64)
    mask = augmenter._timm_erase_mask(images, augmenter._stream(0, 0)).numpy()[..., 0]
    erased = mask.reshape(400, -1).any(1)
    assert 0.4 < erased.mean() < 0.6  # probability p
    for region in mask[erased]:
        rows, cols = np.nonzero(region)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert region.sum() == h * w and h < 64 and w < 64  # one rectangle, strictly inside
        assert 0.015 <= h * w / 64 ** 2 <= 0.35 and 0.25 <= h / w <= 4.0
