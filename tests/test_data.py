"""The CIFAR python-format reader, synthetic data, and the distributed pipelines."""
import os
import pickle

import numpy as np
import pytest
import tensorflow as tf

from cifar_files import pickle_styles, tar_gz, write_cifar10, write_cifar100
from convmixer_dist.data import pipeline as data
from convmixer_dist.data.source import Loaded
from convmixer_dist.data.sources import cifar, synthetic
from convmixer_dist.config import derive
from convmixer_dist.errors import UsageError
from helpers import tiny_config


def _reference_images(folder, name):
    with open(os.path.join(folder, name), "rb") as f:
        blob = pickle.load(f, encoding="bytes")
    return blob[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def test_reads_folder_with_uneven_batch_files(tmp_path):
    folder = write_cifar10(str(tmp_path))
    for path in (str(tmp_path), folder):  # the parent and the folder itself both work
        splits = cifar.read_cifar(path, "cifar10")
        assert splits["train"][0].shape == (30 + 17 + 25 + 9 + 19, 32, 32, 3)
        assert splits["test"][0].shape == (23, 32, 32, 3) and splits["test"][1].dtype == np.int32
    # HWC layout: the first training image equals data_batch_1's first row, channel-planar -> HWC.
    np.testing.assert_array_equal(splits["train"][0][0], _reference_images(folder, "data_batch_1")[0])


def test_reads_tar_gz_directly_and_from_its_folder(tmp_path):
    folder = write_cifar10(str(tmp_path / "src"), train_sizes=(5, 8), test_size=3)
    archive = tar_gz(folder, str(tmp_path / "cifar-10-python.tar.gz"))
    for path in (archive, str(tmp_path)):
        splits = cifar.read_cifar(path, "cifar10")
        assert len(splits["train"][0]) == 13 and len(splits["test"][0]) == 3
    np.testing.assert_array_equal(splits["test"][0], cifar.read_cifar(folder, "cifar10")["test"][0])


def test_reads_cifar100_fine_labels(tmp_path):
    write_cifar100(str(tmp_path))
    splits = cifar.read_cifar(str(tmp_path), "cifar100")
    assert len(splits["train"][1]) == 40 and splits["train"][1].max() < 100


def test_corrupt_and_missing_files_name_the_file(tmp_path):
    folder = write_cifar10(str(tmp_path))
    with open(os.path.join(folder, "data_batch_2"), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(UsageError, match="data_batch_2"):
        cifar.read_cifar(str(tmp_path), "cifar10")
    with pytest.raises(UsageError, match="--data_dir"):
        cifar.read_cifar(str(tmp_path / "empty"), "cifar100")


def test_synthetic_data_is_deterministic_and_class_dependent():
    a = [synthetic.synthetic_example(i, 3, 16, 4) for i in range(64)]
    b = [synthetic.synthetic_example(i, 3, 16, 4) for i in range(64)]
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a, b))
    images = np.stack([x[0].numpy() for x in a]).astype(np.float32)
    labels = np.array([int(x[1]) for x in a])
    assert len(set(labels)) == 4 and images.dtype == np.float32
    # Nearest class mean on held-out examples beats chance by far: the data is learnable.
    means = np.stack([images[labels == c].mean(0) for c in range(4)])
    test = [synthetic.synthetic_example(i, 3, 16, 4) for i in range(1000, 1100)]
    hits = sum(int(np.argmin(((means - t[0].numpy()) ** 2).sum((1, 2, 3)))) == int(t[1]) for t in test)
    assert hits > 60


def test_basic_augment_keeps_shape_dtype_and_is_seeded():
    image = tf.cast(tf.reshape(tf.range(8 * 8 * 3) % 255, [8, 8, 3]), tf.uint8)
    out1 = data.basic_augment(image, tf.constant([1, 2], tf.int64), 8)
    out2 = data.basic_augment(image, tf.constant([1, 2], tf.int64), 8)
    assert out1.shape == (8, 8, 3) and out1.dtype == tf.uint8
    np.testing.assert_array_equal(out1, out2)
    outs = {data.basic_augment(image, tf.constant([s, 0], tf.int64), 8).numpy().tobytes()
            for s in range(10)}
    assert len(outs) > 3


def test_mirrored_eval_covers_every_example_exactly_once(tmp_path):
    config = tiny_config(str(tmp_path), strategy="mirrored", cpu_replicas=2, synthetic_test_size=37,
                         global_batch_size=8)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    derived = derive(config, 2, *data.trained_sizes(config))
    eval_ds = data.eval_dataset(strategy, config, derived)
    seen = []
    for images, labels in eval_ds:
        for part in strategy.experimental_local_results(labels):
            seen.extend(part.numpy().tolist())
        assert images.values[0].shape[1:] == (8, 8, 3)
    assert len(seen) == 37
    expected = [int(synthetic.synthetic_example(i + (1 << 30), config.seed, 8, 4)[1]) for i in range(37)]
    assert sorted(seen) == sorted(expected)


def test_train_batches_are_normalized_per_replica_batches(tmp_path):
    config = tiny_config(str(tmp_path), strategy="mirrored", cpu_replicas=2, global_batch_size=8)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    train_ds = data.train_dataset(strategy, config, derive(config, 2, *data.trained_sizes(config)))
    images, labels = next(iter(train_ds))
    parts = strategy.experimental_local_results(images)
    assert len(parts) == 2 and parts[0].shape == (4, 8, 8, 3) and parts[0].dtype == tf.float32
    assert -4 < float(tf.reduce_min(parts[0])) < 0 < float(tf.reduce_max(parts[0])) < 4


def test_batch_not_divisible_by_replicas_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="--global_batch_size=30 is not divisible by the 4"):
        derive(tiny_config(str(tmp_path), global_batch_size=30), 4, 10000, 1000)


def test_training_stream_resumes_at_any_step_identically(tmp_path):
    # 50 examples, 8 per step: epochs end mid-batch, so resuming crosses epoch boundaries.
    config = tiny_config(str(tmp_path), synthetic_train_size=50, global_batch_size=8,
                         strategy="mirrored", cpu_replicas=2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    derived = derive(config, 2, *data.trained_sizes(config))

    def batches(start, count):
        iterator = iter(data.train_dataset(strategy, config, derived, None, start))
        out = []
        for _ in range(count):
            images, labels = next(iterator)
            out.append(np.concatenate([v.numpy().ravel() for v in strategy.experimental_local_results(images)]))
        return out

    full = batches(0, 16)
    assert not np.array_equal(full[0], full[6])  # a new epoch is a new permutation
    for start in (3, 6, 13):
        for a, b in zip(full[start:], batches(start, 16 - start)):
            np.testing.assert_array_equal(a, b)


def _indexed_arrays(n: int, eval_n: int = 5) -> Loaded:
    """CIFAR data whose label is the example's index, so a pipeline's labels are the indices it read."""
    return Loaded(n, eval_n, None, {
        "train": (np.zeros((n, 8, 8, 3), np.uint8), np.arange(n, dtype=np.int32)),
        "test": (np.zeros((eval_n, 8, 8, 3), np.uint8), np.arange(eval_n, dtype=np.int32))})


def _labels(strategy, batch) -> list[int]:
    return [int(v) for part in strategy.experimental_local_results(batch[1]) for v in part.numpy()]


@pytest.mark.parametrize("n,fraction,seed", [(50, 0.2, 0), (37, 0.5, 3), (64, 0.1, 11), (29, 0.3, 5)])
def test_training_and_validation_index_streams_are_disjoint_and_cover_the_split(tmp_path, n, fraction, seed):
    # The indices the distributed pipelines actually yield, as training/loop.py builds them.
    config = tiny_config(str(tmp_path), dataset="cifar10", augment="none", image_size=8,
                         validation_fraction=fraction, seed=seed, global_batch_size=4,
                         strategy="mirrored", cpu_replicas=2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    arrays = _indexed_arrays(n)
    derived = derive(config, 2, *data.trained_sizes(config, arrays))
    validation = [i for batch in data.eval_dataset(strategy, config, derived, arrays, split="val")
                  for i in _labels(strategy, batch)]
    assert len(validation) == len(set(validation)) == max(1, round(n * fraction))
    train_size = derived.train_size
    assert train_size == n - len(validation)
    # Two passes over the training ids (the stream crosses epoch boundaries mid-batch).
    iterator = iter(data.train_dataset(strategy, config, derived, arrays))
    stream: list[int] = []
    while len(stream) < 2 * train_size:
        stream.extend(_labels(strategy, next(iterator)))
    first, second = stream[:train_size], stream[train_size:2 * train_size]
    assert sorted(first) == sorted(second) and len(set(first)) == train_size  # each pass a permutation
    assert first != second  # ... a fresh one each epoch
    assert not set(first) & set(validation)  # disjoint
    assert sorted(first + validation) == list(range(n))  # together the whole training split
    # The explicit ids training/loop.py passes give the same stream.
    train_ids, val_ids = data.validation_split(config, n)
    again = iter(data.train_dataset(strategy, config, derived, arrays, ids=train_ids))
    assert _labels(strategy, next(again)) == stream[:config.global_batch_size]
    assert sorted(val_ids.tolist()) == sorted(validation)


def test_training_ids_must_match_the_derived_size(tmp_path):
    config = tiny_config(str(tmp_path), dataset="cifar10", augment="none", image_size=8,
                         validation_fraction=0.5, global_batch_size=4)
    arrays = _indexed_arrays(40)
    full = derive(config, 1, *data.split_sizes(config, arrays))  # counts the held-out examples too
    with pytest.raises(ValueError, match="training ids"):
        data.make_dataset_fn(config, full, "train", arrays)


class _Payload:
    """What a crafted CIFAR file can do with plain pickle: run a command while loading."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _ExecPayload(_Payload):
    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload", [_Payload, _ExecPayload])
def test_a_crafted_cifar_file_is_refused_without_running_its_payload(tmp_path, payload):
    folder = write_cifar10(str(tmp_path / "data"), train_sizes=(8,), test_size=4)
    marker = tmp_path / "payload_ran"
    blob = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": payload(marker)}
    for path in (os.path.join(folder, "data_batch_1"), os.path.join(folder, "test_batch")):
        with open(path, "wb") as f:
            pickle.dump(blob, f)
    archive = tar_gz(folder, str(tmp_path / "cifar-10-python.tar.gz"))
    for data_dir in (folder, archive):
        with pytest.raises(UsageError, match=r"data_batch_1 is not a CIFAR python-format file: it asks "
                                             r"to call (posix\.system|builtins\.exec).*refused"):
            cifar.read_cifar(data_dir, "cifar10")
    assert not marker.exists()
    # With the plain pickle module the same file does run the payload (the test's premise).
    with open(os.path.join(folder, "data_batch_1"), "rb") as f:
        pickle.load(f, encoding="bytes")
    assert marker.exists()


def test_cifar_files_from_numpy_1_and_2_pickles_all_load(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(300, 3072), dtype=np.uint8)  # > 255 bytes: BINSTRING too
    labels = rng.integers(0, 10, size=300).tolist()
    expected_test = rng.integers(0, 256, size=(5, 3072), dtype=np.uint8)
    blob = {b"batch_label": b"training batch 1 of 1", b"labels": labels, b"data": images,
            b"filenames": [b"img_%d.png" % i for i in range(300)]}
    test_blob = {b"batch_label": b"testing batch", b"labels": [1, 2, 3, 4, 5], b"data": expected_test}
    styles = pickle_styles(blob)
    assert set(styles) == {"python2_numpy1", "python3_numpy1", "numpy2_protocol2", "numpy2_protocol4",
                           "numpy2_protocol5"}
    assert b"numpy.core.multiarray" in styles["python2_numpy1"]
    assert b"numpy._core.multiarray" in styles["numpy2_protocol2"]
    assert b"_frombuffer" in styles["numpy2_protocol5"]
    for style, payload in styles.items():
        folder = tmp_path / style / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        (folder / "data_batch_1").write_bytes(payload)
        (folder / "test_batch").write_bytes(pickle_styles(test_blob)[style])
        splits = cifar.read_cifar(str(folder), "cifar10")
        np.testing.assert_array_equal(splits["train"][0], images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(splits["train"][1], labels)
        np.testing.assert_array_equal(splits["test"][1], [1, 2, 3, 4, 5])
