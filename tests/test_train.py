"""The training loop under real strategies (2 logical CPU devices), in-process and small."""
import contextlib
import io

import keras
import numpy as np
import pytest
import tensorflow as tf

from convmixer_dist import optimization, strategy as strategy_lib
from convmixer_dist.model import create_model
from convmixer_dist.training.loop import train_and_evaluate
from convmixer_dist.training.report import Counters
from convmixer_dist.training.state import make_bn_statistics_sync, weights_fingerprint
from convmixer_dist.training.steps import make_train_loop
from helpers import tiny_config


def _train(config):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        summary = train_and_evaluate(config, strategy_lib.create_strategy(config))
    return summary, out.getvalue()


def _checkpoint_values(model_dir):
    reader = tf.train.load_checkpoint(f"{model_dir}/checkpoints")
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.startswith(("model/", "optimizer/")) and "save_counter" not in k}


def test_mirrored_two_replicas_equals_one_device_on_same_global_batch(tmp_path):
    # With synchronized BatchNorm both see the same global-batch statistics, so the only difference
    # is float summation order; tolerance 1e-5 absolute on every model and optimizer variable.
    one = tiny_config(str(tmp_path / "one"), strategy="one_device", sync_bn=True)
    two = tiny_config(str(tmp_path / "two"), strategy="mirrored", cpu_replicas=2, sync_bn=True)
    s1, _ = _train(one)
    s2, _ = _train(two)
    assert s2["num_replicas"] == 2 and s1["num_replicas"] == 1
    w1, w2 = _checkpoint_values(one.model_dir), _checkpoint_values(two.model_dir)
    assert w1.keys() == w2.keys() and len(w1) > 20
    for key in w1:
        np.testing.assert_allclose(w1[key], w2[key], atol=1e-5, rtol=0, err_msg=key)
    assert s1["eval_loss"] == pytest.approx(s2["eval_loss"], abs=1e-5)


def test_training_learns_and_reports_progress(tmp_path):
    config = tiny_config(str(tmp_path), strategy="mirrored", cpu_replicas=2, train_steps=40,
                         steps_per_loop=8, synthetic_train_size=640, learning_rate=0.02,
                         hidden_dim=32, image_size=16, patch_size=4)
    summary, out = _train(config)
    assert summary["eval_accuracy"] > 0.5  # 4 classes: chance is 0.25
    assert summary["steps"] == 40 and summary["epochs"] == 2 and summary["eval_examples"] == 100
    assert "img/s" in out and "ETA" in out and "test loss" in out


def test_rerun_resumes_from_checkpoint_and_continues_the_step_counter(tmp_path):
    first, _ = _train(tiny_config(str(tmp_path), train_steps=6))
    assert first["steps"] == 6 and first["resumed_from"] is None
    second, out = _train(tiny_config(str(tmp_path), train_steps=9))
    assert second["resumed_from"].endswith("ckpt-6")
    assert second["steps"] == 9 and "Resumed from" in out


def test_float16_with_loss_scaling_runs_on_two_replicas(tmp_path):
    summary, _ = _train(tiny_config(str(tmp_path), strategy="mirrored", cpu_replicas=2,
                                    precision="mixed_float16", clip_norm=1.0))
    assert summary["precision"] == "mixed_float16"
    assert np.isfinite(summary["train_loss"]) and np.isfinite(summary["weights_abs_sum"])


def _apply_with_grads(clip_norm, replica_grads, loss_scaled):
    """Apply per-replica gradients through the training step's update; return the variable afterwards."""
    strategy = strategy_lib.create_strategy(tiny_config("unused", strategy="mirrored", cpu_replicas=2))
    with strategy.scope():
        var = keras.Variable(np.zeros(2, np.float32))
        inner = keras.optimizers.SGD(learning_rate=1.0)
        opt = keras.optimizers.LossScaleOptimizer(inner, initial_scale=1.0) if loss_scaled else inner
        opt.build([var])
    apply = optimization.make_apply_gradients(opt, [var], clip_norm, bucket_mb=0, dtype="float32")

    def replica_fn():
        rid = tf.distribute.get_replica_context().replica_id_in_sync_group
        grad = tf.gather(tf.constant(replica_grads, tf.float32), rid)
        apply([grad])

    tf.function(lambda: strategy.run(replica_fn))()
    return [v.numpy() for v in strategy.experimental_local_results(var.value)]


def test_one_replicas_inf_makes_every_replica_skip_the_float16_step():
    values = _apply_with_grads(0.0, [[1.0, 1.0], [np.inf, 1.0]], loss_scaled=True)
    for value in values:  # Without the agreement replica 0 would apply its finite gradient.
        np.testing.assert_array_equal(value, [0.0, 0.0])


def test_clipping_uses_the_global_norm_of_the_summed_gradient():
    # Sum over replicas = [6, 8] (norm 10) -> clipped to norm 1 -> [0.6, 0.8]; SGD lr 1 subtracts it.
    # Per-replica clipping would give a different result ([3,4] and [3,4] each clipped to [.6,.8]).
    values = _apply_with_grads(1.0, [[3.0, 4.0], [3.0, 4.0]], loss_scaled=False)
    for value in values:
        np.testing.assert_allclose(value, [-0.6, -0.8], rtol=1e-6)


def test_batchnorm_moving_statistics_are_averaged_across_replicas(tmp_path):
    # Without --sync_bn each replica updates its own moving statistics from its own batches; the
    # sync averages them (before every evaluation and save) so every replica holds the mean.
    from convmixer_dist.data import pipeline as data
    from convmixer_dist.config import derive

    config = tiny_config(str(tmp_path), strategy="mirrored", cpu_replicas=2)
    strategy = strategy_lib.create_strategy(config)
    derived = derive(config, 2, *data.trained_sizes(config))
    with strategy.scope():
        model = create_model(config)
        optimizer = optimization.create_optimizer(config, derived.total_steps, "float32")
        optimizer.build(model.trainable_variables)
    loop = make_train_loop(strategy, model, optimizer, config, xla=False)
    iterator = iter(data.train_dataset(strategy, config, derived))
    loop(iterator, tf.constant(3), tf.constant(0, tf.int64), tf.constant(0, tf.int64))
    weight = model.get_layer("stem_bn").moving_mean
    before = [v.numpy() for v in strategy.experimental_local_results(weight.value)]
    assert not np.array_equal(before[0], before[1])  # the replicas drifted apart
    make_bn_statistics_sync(strategy, model)()
    after = [v.numpy() for v in strategy.experimental_local_results(weight.value)]
    np.testing.assert_allclose(after[0], (before[0] + before[1]) / 2, rtol=1e-6)
    np.testing.assert_array_equal(after[0], after[1])


def test_early_stopping_on_validation_restores_the_best_weights(tmp_path):
    # Seeded run whose validation loss first rises at epoch 6 (1.1168 -> 1.1203): patience 1 stops there.
    config = tiny_config(str(tmp_path), train_steps=0, epochs=12, validation_fraction=0.25,
                         early_stopping_patience=1, learning_rate=0.05, synthetic_train_size=128)
    summary, out = _train(config)
    assert summary["stopped_early"] and summary["steps"] < 36
    assert summary["best_step"] < summary["steps"]
    assert "early stopping" in out and "validation loss" in out
    # The reported (test-split) weights are the best checkpoint's, not the last step's.
    model = create_model(config)
    tf.train.Checkpoint(model=model).read(summary["best_checkpoint"]).expect_partial()
    assert weights_fingerprint(model)["weights_sha256"] == summary["weights_sha256"]
    assert summary["eval_examples"] == 100  # the test split, untouched by the validation split


def test_memorising_noise_stays_at_chance_on_the_validation_split(tmp_path):
    # Random images with random labels: the only way to score on validation is to have trained on it.
    import re

    from cifar_files import write_cifar10

    write_cifar10(str(tmp_path / "data"), train_sizes=(200, 200), test_size=20)
    config = tiny_config(str(tmp_path / "run"), dataset="cifar10", data_dir=str(tmp_path / "data"),
                         num_classes=10, image_size=8, hidden_dim=64, depth=2, augment="none",
                         validation_fraction=0.5, train_steps=0, epochs=25, global_batch_size=20,
                         steps_per_loop=10, checkpoint_every_steps=100000, weight_decay=0.0,
                         lr_schedule="constant")
    _, out = _train(config)
    train_acc = [float(a) for a in re.findall(r"step \d+/\d+ loss \S+ acc (\S+)", out)]
    val_acc = [float(a) for a in re.findall(r"validation loss \S+ acc (\S+)", out)]
    assert len(val_acc) == 25 and train_acc[-1] > 0.95  # memorised the training half
    assert max(val_acc[-5:]) < 0.2  # chance is 0.1; the leak gave 0.55


def _no_bn_model(config):
    """A model without BatchNorm (its statistics depend on the micro-batch), with biases."""
    return keras.Sequential([keras.Input((config.image_size, config.image_size, 3)),
                             keras.layers.Conv2D(6, 3, activation="gelu"), keras.layers.Flatten(),
                             keras.layers.Dense(config.num_classes)])


def _weights_after_steps(config, strategy, steps=3):
    from convmixer_dist.data import pipeline as data
    from convmixer_dist.config import derive

    derived = derive(config, strategy.num_replicas_in_sync, *data.trained_sizes(config))
    with strategy.scope():
        keras.utils.set_random_seed(3)
        model = _no_bn_model(config)
        optimizer = optimization.create_optimizer(config, derived.total_steps, "float32",
                                                  variables=model.trainable_variables)
        optimizer.build(model.trainable_variables)
    loop = make_train_loop(strategy, model, optimizer, config, xla=False)
    iterator = iter(data.train_dataset(strategy, config, derived))
    totals = loop(iterator, tf.constant(steps), tf.constant(0, tf.int64), tf.constant(0, tf.int64))
    return [v.numpy() for v in model.trainable_variables], [float(t) for t in totals], optimizer


@pytest.mark.parametrize("replicas,accum", [(1, 4), (2, 2)])
def test_accumulated_micro_batches_give_the_update_of_one_large_batch(tmp_path, replicas, accum):
    # K micro-batches of B == one batch of K*B: same examples per optimizer step (the stream is
    # one global order), loss averaged over all of them, clipping on the accumulated gradient.
    common = dict(global_batch_size=16, lr_schedule="constant", clip_norm=0.05, adam_epsilon=1e-3,
                  augment="none", weight_decay=0.1, wd_exclude_bias_bn=True)
    one = tiny_config(str(tmp_path / "one"), **common)
    accumulated = tiny_config(str(tmp_path / "acc"), grad_accum_steps=accum, **common,
                              **({"strategy": "mirrored", "cpu_replicas": 2} if replicas == 2 else {}))
    w1, t1, opt1 = _weights_after_steps(one, strategy_lib.create_strategy(one))
    w2, t2, opt2 = _weights_after_steps(accumulated, strategy_lib.create_strategy(accumulated))
    assert int(opt1.iterations.numpy()) == int(opt2.iterations.numpy()) == 3  # optimizer steps
    np.testing.assert_allclose(t2, t1, rtol=1e-5)  # loss sum, correct, count (48 examples)
    assert t2[2] == 48
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
    assert not np.allclose(w1[0], _weights_after_steps(one, strategy_lib.create_strategy(one), 2)[0][0])


def test_accumulated_run_resumes_to_the_same_weights(tmp_path):
    # Steps, checkpoints and the input stream count optimizer steps: 3 + 3 resumed == 6 straight.
    # (A constant schedule: the one-cycle schedule would depend on the shorter first run's length.)
    common = dict(grad_accum_steps=2, train_steps=6, checkpoint_every_steps=3, augment="rrc",
                  crop_scale=0.5, randaug_n=1, randaug_m=9, augment_on_device=True, deterministic=True,
                  lr_schedule="constant")
    straight, _ = _train(tiny_config(str(tmp_path / "straight"), **common))
    _train(tiny_config(str(tmp_path / "resumed"), **{**common, "train_steps": 3}))
    resumed, _ = _train(tiny_config(str(tmp_path / "resumed"), **common))
    assert resumed["resumed_from"].endswith("ckpt-3") and resumed["steps"] == straight["steps"] == 6
    assert resumed["weights_sha256"] == straight["weights_sha256"]


def test_throughput_logs_each_window_and_keeps_the_run_average():
    counters = Counters()
    assert counters.window_rate(fallback=10.0) == 10.0  # only the untimed (compiling) call so far
    counters.add_timed(100, 0.1)
    counters.add_timed(100, 0.1)
    assert counters.window_rate(fallback=0.0) == pytest.approx(1000.0)
    counters.add_timed(100, 1.0)  # a slowdown: the window (TensorBoard) shows it at once ...
    assert counters.window_rate(fallback=0.0) == pytest.approx(100.0)
    assert counters.images_per_sec == pytest.approx(300 / 1.2)  # ... the run average lags
