"""The gradient path: one bucketed all-reduce per optimizer step (whatever the flags), from the last
layer to the first, optionally in bfloat16/float16, then clipping and the update.

The collective counts are read from the traced train loop's graph: two replicas on two logical CPU
devices with TensorFlow's collective all-reduce, the ops MultiWorkerMirroredStrategy runs between
hosts (the default CPU mirrored path copies to one device instead and has no op to count)."""
import contextlib
import dataclasses
import io
import itertools
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.distribute import collective_util, cross_device_ops, cross_device_utils

from convmixer_dist import optimization, precision, strategy as strategy_lib
from convmixer_dist.data import pipeline as data
from convmixer_dist.config import derive
from convmixer_dist.model import create_model
from convmixer_dist.perf import collectives
from convmixer_dist.training.loop import train_and_evaluate
from convmixer_dist.training.steps import make_train_loop
from helpers import ROOT, free_ports, make_tf_config, tiny_config


def test_buckets_go_from_the_last_variable_to_the_first_and_close_at_the_cap():
    # sizes in bytes of variables 0..4; cap 100: [4]=60, +[3]=30 -> 90, [2]=50 would pass 100 -> new
    # bucket; [2]=50 +[1]=40 -> 90; [0]=120 alone (larger than the cap).
    assert optimization.gradient_buckets([120, 40, 50, 30, 60], 100) == [[4, 3], [2, 1], [0]]
    assert optimization.gradient_buckets([120, 40, 50, 30, 60], 0) == [[4, 3, 2, 1, 0]]
    assert optimization.gradient_buckets([10, 10], 1) == [[1], [0]]
    # The first bucket is capped at 1 MiB even with larger buckets (PyTorch DDP's first bucket):
    mib = 2 ** 20
    assert optimization.gradient_buckets([3 * mib, mib // 2, mib // 2, mib // 2], 25 * mib) == [
        [3, 2], [1, 0]]
    assert optimization.gradient_buckets([], 100) == []


_STRATEGIES = itertools.count()


def _collective_mirrored():
    """Two replicas reducing with collective ops; each strategy gets its own collective group keys
    (strategies of one process would otherwise share instance keys)."""
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    keys = cross_device_utils.CollectiveKeys(group_key_start=1 + 1000 * next(_STRATEGIES))
    return tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=cross_device_ops.CollectiveAllReduce(
        devices=devices, group_size=2, options=collective_util.Options(), collective_keys=keys))


def _train_loop(config, strategy):
    """The real train loop of a tiny ConvMixer (seeded) and an iterator over its training stream."""
    policy = precision.resolve_precision(config.precision, "cpu", hidden_dim=config.hidden_dim)
    keras.mixed_precision.set_dtype_policy(policy)  # the conftest fixture restores float32
    derived = derive(config, strategy.num_replicas_in_sync, *data.trained_sizes(config))
    with strategy.scope():
        keras.utils.set_random_seed(config.seed)
        model = create_model(config)
        optimizer = optimization.create_optimizer(config, derived.total_steps, policy)
        optimizer.build(model.trainable_variables)
    loop = make_train_loop(strategy, model, optimizer, config, xla=False)
    return loop, iter(data.train_dataset(strategy, config, derived)), model


def _traced_loop(config, strategy, steps=2):
    """Run `steps` steps of the real train loop; return (weights, collectives per step, variables)."""
    loop, iterator, model = _train_loop(config, strategy)
    args = (iterator, tf.constant(steps), tf.constant(0, tf.int64), tf.constant(0, tf.int64))
    loop(*args)
    counts = collectives.per_step(loop.get_concrete_function(*args), strategy.num_replicas_in_sync)
    return [v.numpy() for v in model.trainable_variables], counts, model.trainable_variables


@pytest.mark.parametrize("flags", [
    dict(), dict(clip_norm=1.0), dict(precision="mixed_float16", clip_norm=1.0),
    dict(grad_accum_steps=2, clip_norm=1.0)], ids=["plain", "clip", "float16-clip", "accum-clip"])
def test_one_gradient_all_reduce_per_step_whatever_the_flags(tmp_path, flags):
    config = tiny_config(str(tmp_path), strategy="mirrored", cpu_replicas=2, allreduce_bucket_mb=0,
                         **flags)
    _, counts, variables = _traced_loop(config, _collective_mirrored())
    params = sum(int(np.prod(v.shape)) for v in variables)
    # In one process the step's bookkeeping is a copy to the host, not a collective (counted under
    # multi_worker below); the gradient is one collective of every parameter.
    assert counts["gradient_collectives"] == counts["collectives"] == 1
    assert counts["gradient_bytes"] == counts["bytes"] == 4 * params and counts["dtypes"] == ["float32"]


def test_buckets_are_separate_collectives_and_reduced_dtype_halves_the_bytes(tmp_path):
    # A cap of 1 byte: every variable is a bucket of its own.
    config = tiny_config(str(tmp_path), strategy="mirrored", cpu_replicas=2, clip_norm=1.0,
                         allreduce_bucket_mb=1 / 2 ** 20, allreduce_dtype="bfloat16")
    _, counts, variables = _traced_loop(config, _collective_mirrored())
    params = sum(int(np.prod(v.shape)) for v in variables)
    assert counts["gradient_collectives"] == len(variables) > 10
    assert counts["dtypes"] == ["bfloat16"] and counts["gradient_bytes"] == 2 * params


def test_bucketed_collective_path_trains_like_one_device(tmp_path):
    # Several buckets, clipping, two replicas over collective ops == one device on the same global
    # batches (float32 summation order only).
    common = dict(clip_norm=0.05, sync_bn=True, augment="none")
    one = tiny_config(str(tmp_path / "one"), **common)
    two = tiny_config(str(tmp_path / "two"), strategy="mirrored", cpu_replicas=2,
                      allreduce_bucket_mb=0.001, **common)
    w1, _, _ = _traced_loop(one, strategy_lib.create_strategy(one), steps=3)
    w2, counts, _ = _traced_loop(two, _collective_mirrored(), steps=3)
    assert counts["gradient_collectives"] > 1
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype,eps", [("bfloat16", 2.0 ** -8), ("float16", 2.0 ** -11)])
def test_reduced_precision_sum_is_the_float32_sum_rounded(dtype, eps):
    strategy = _collective_mirrored()
    rng = np.random.default_rng(0)
    values = rng.normal(size=(2, 3, 50)).astype(np.float32)  # replica, variable, elements

    def replica_fn():
        rid = tf.distribute.get_replica_context().replica_id_in_sync_group
        grads = [tf.gather(tf.constant(values[:, k]), rid) for k in range(3)]
        return optimization.reduce_gradients(grads, bucket_bytes=120, dtype=dtype)

    reduced = tf.function(lambda: strategy.run(replica_fn))()
    exact = values.sum(axis=0)
    for k in range(3):
        got = strategy.experimental_local_results(reduced[k])[0].numpy()
        assert got.dtype == np.float32
        # Each operand rounded once and the sum rounded once: within 2 ulps of the larger operand.
        bound = 2 * eps * np.abs(values[:, k]).max(axis=0) + eps * np.abs(exact[k])
        assert np.all(np.abs(got - exact[k]) <= bound)
        assert not np.array_equal(got, exact[k])  # it really went through the narrow dtype


def _held_out_accuracy(config):
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train_and_evaluate(config, strategy_lib.create_strategy(config))
    return summary["eval_accuracy"]


def test_bfloat16_reduced_training_reaches_the_float32_held_out_accuracy(tmp_path):
    # Stated tolerance: within 0.05 of float32's held-out accuracy (100 test examples, 4 classes).
    config = tiny_config(str(tmp_path / "f32"), strategy="mirrored", cpu_replicas=2, train_steps=40,
                         steps_per_loop=8, synthetic_train_size=640, learning_rate=0.02,
                         hidden_dim=32, image_size=16, patch_size=4, clip_norm=1.0)
    reference = _held_out_accuracy(config)
    bf16 = _held_out_accuracy(dataclasses.replace(config, model_dir=str(tmp_path / "bf16"),
                                                  allreduce_dtype="bfloat16"))
    assert reference > 0.5  # it learned (chance 0.25)
    assert abs(bf16 - reference) <= 0.05


def test_keras_own_gradient_sum_is_switched_off_on_the_optimizer_and_its_inner_one():
    inner = keras.optimizers.AdamW()
    wrapped = keras.optimizers.LossScaleOptimizer(inner)
    optimization.skip_gradient_aggregation(wrapped)
    pairs = [(tf.ones([2]), "v")]
    assert wrapped._all_reduce_sum_gradients(pairs) == pairs
    assert inner._all_reduce_sum_gradients(pairs) == pairs
    # Another optimizer instance keeps Keras' behaviour (model.fit in perf.benchmark uses its own).
    assert keras.optimizers.AdamW()._all_reduce_sum_gradients.__self__ is not None


WORKER = """
import json, sys
from convmixer_dist import optimization, strategy as strategy_lib
from convmixer_dist.data import pipeline as data
from convmixer_dist.config import derive
from convmixer_dist.model import create_model
from convmixer_dist.perf import collectives
from convmixer_dist.training.steps import make_train_loop
from helpers import ROOT, make_tf_config, tiny_config
config = tiny_config(sys.argv[1], strategy="multi_worker", clip_norm=1.0, collective_timeout=30,
                     global_batch_size=16, allreduce_bucket_mb=float(sys.argv[2]))
strategy = strategy_lib.create_strategy(config)  # before any other op
import tensorflow as tf
derived = derive(config, strategy.num_replicas_in_sync, *data.trained_sizes(config))
with strategy.scope():
    model = create_model(config)
    optimizer = optimization.create_optimizer(config, derived.total_steps, "float32")
    optimizer.build(model.trainable_variables)
loop = make_train_loop(strategy, model, optimizer, config, xla=False)
args = (iter(data.train_dataset(strategy, config, derived)), tf.constant(2),
        tf.constant(0, tf.int64), tf.constant(0, tf.int64))
loop(*args)
print(json.dumps(collectives.per_step(loop.get_concrete_function(*args))))
"""


def test_two_workers_send_one_gradient_and_one_bookkeeping_collective_per_step(tmp_path):
    # MultiWorkerMirroredStrategy, 2 processes, clipping on: 1 gradient collective of every
    # parameter + 1 four-element bookkeeping collective (loss, correct, count, stop flag) per step;
    # with 1-byte buckets one gradient collective per variable.
    for bucket_mb, expect_buckets in ((25, 1), (1 / 2 ** 20, "variables")):
        hosts = [f"localhost:{p}" for p in free_ports(2)]
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / f"w{i}"), str(bucket_mb)],
                                  cwd=ROOT, env={**os.environ, "TF_CONFIG": make_tf_config(hosts, i),
                                                 "PYTHONPATH": f"{ROOT}:{ROOT}/tests"},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
        outputs = [p.communicate(timeout=240) for p in procs]
        for proc, (out, err) in zip(procs, outputs):
            assert proc.returncode == 0, err[-3000:]
        counts = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
        assert counts[0] == counts[1]
        # stem conv (kernel, bias) + stem BN (gamma, beta) + 2 blocks x (depthwise, BN, 1x1, BN) + head
        variables = 2 + 2 + 2 * 8 + 2
        expected = 1 if expect_buckets == 1 else variables
        assert counts[0]["gradient_collectives"] == expected
        assert counts[0]["collectives"] == expected + 1
        assert counts[0]["bytes"] - counts[0]["gradient_bytes"] == 4 * 4


def test_late_layers_are_reduced_while_the_backward_pass_still_runs(tmp_path):
    # A profile of one step with small buckets: the first gradient collective (the head and the last
    # block) starts before the last backward op (the stem's filter gradient) ends.
    from convmixer_dist.perf import profile_report

    config = tiny_config(str(tmp_path), strategy="mirrored", cpu_replicas=2, hidden_dim=64, depth=4,
                         image_size=32, global_batch_size=32, allreduce_bucket_mb=0.01, clip_norm=1.0)
    loop, iterator, _ = _train_loop(config, _collective_mirrored())
    args = (iterator, tf.constant(1), tf.constant(0, tf.int64), tf.constant(0, tf.int64))
    loop(*args)  # traced and warm
    tf.profiler.experimental.start(str(tmp_path / "profile"))
    loop(*args)
    tf.profiler.experimental.stop()
    paths = [str(p) for p in (tmp_path / "profile").rglob("*.xplane.pb")]
    result = collectives.overlap(profile_report.load_trace(paths))
    assert result["collectives"] > 2 * 2 and result["backward_ops"] > 50  # 2 replicas' ops
    assert result["lead_ms"] > 0, result
