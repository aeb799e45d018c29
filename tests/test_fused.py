"""The fused layers compute what the Keras layers they replace compute: forward, gradients, moving
statistics, under one device and two mirrored replicas, with and without --sync_bn; checkpoints and
.keras files move between --kernels=keras and --kernels=fused."""
import contextlib
import dataclasses
import io

import keras
import numpy as np
import pytest
import tensorflow as tf

from convmixer_dist import fused
from convmixer_dist.model import create_model
from convmixer_dist.training.loop import train_and_evaluate
from convmixer_dist.config import Config
from convmixer_dist.model import build_convmixer
from convmixer_dist.strategy import create_strategy
from helpers import tiny_config

FUSED = fused.resolve_kernels("fused", "cpu")
TINY = dict(hidden_dim=8, depth=2, kernel_size=5, patch_size=2, num_classes=3, image_size=8)


def _close(a, b, tol=1e-5):
    """Max difference relative to the magnitude of `a` (gradients of a sum can be large)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    np.testing.assert_array_less(np.abs(a - b).max(), tol * max(1.0, np.abs(a).max()))


def _value_and_grads(layer, x, training=True):
    """Output and gradients of sum(output * weights) w.r.t. the input and the trainable variables."""
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
        loss = tf.reduce_sum(y * tf.cast(tf.reshape(tf.range(tf.size(y)) % 7, y.shape), y.dtype))
    return y, tape.gradient(loss, [x] + layer.trainable_variables)


def test_resolve_kernels_per_device():
    assert fused.resolve_kernels("keras", "cpu") == fused.KernelChoice()
    assert fused.resolve_kernels("auto", "cpu") == fused.KernelChoice(True, True, True)
    assert fused.resolve_kernels("fused", "cpu") == fused.KernelChoice(True, True, True)
    assert fused.resolve_kernels("auto", "gpu") == fused.KernelChoice(fused_bn=True)
    assert not fused.resolve_kernels("fused", "gpu").folded_depthwise  # CPU-only trick
    with pytest.raises(ValueError):
        fused.resolve_kernels("xla", "cpu")


def test_exact_gelu_matches_keras_gelu_and_its_gradient():
    x = np.random.default_rng(0).normal(scale=3.0, size=(4, 5, 5, 6)).astype(np.float32)
    y_ref, g_ref = _value_and_grads(keras.layers.Activation("gelu"), x)
    y, g = _value_and_grads(fused.ExactGelu(), x)
    _close(y_ref, y, 1e-6)
    _close(g_ref[0], g[0], 1e-6)


@pytest.mark.parametrize("kernel_size,padding", [(3, "same"), (4, "same"), (5, "same"), (3, "valid")])
def test_folded_depthwise_matches_keras_forward_and_gradients(kernel_size, padding):
    x = np.random.default_rng(1).normal(size=(3, 9, 7, 4)).astype(np.float32)
    ref = keras.layers.DepthwiseConv2D(kernel_size, padding=padding)
    new = fused.FoldedDepthwiseConv2D(kernel_size, padding=padding)
    ref.build(x.shape), new.build(x.shape)
    ref.bias.assign(np.arange(4, dtype=np.float32))
    new.set_weights(ref.get_weights())
    (y_ref, g_ref), (y, g) = _value_and_grads(ref, x), _value_and_grads(new, x)
    _close(y_ref, y)
    for a, b in zip(g_ref, g):
        _close(a, b)


@pytest.mark.parametrize("training", [True, False])
def test_fused_batch_norm_matches_keras_outputs_gradients_and_moving_statistics(training):
    rng = np.random.default_rng(2)
    ref = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    new = fused.FusedBatchNormalization(momentum=0.9, epsilon=1e-5)
    ref.build((6, 4, 4, 5)), new.build((6, 4, 4, 5))
    ref.set_weights([rng.normal(size=5).astype(np.float32) for _ in range(3)]
                    + [rng.uniform(0.5, 2.0, size=5).astype(np.float32)])
    new.set_weights(ref.get_weights())
    for _ in range(3):  # Moving statistics accumulate over steps.
        x = rng.normal(loc=2.0, scale=3.0, size=(6, 4, 4, 5)).astype(np.float32)
        (y_ref, g_ref), (y, g) = _value_and_grads(ref, x, training), _value_and_grads(new, x, training)
        _close(y_ref, y)
        for a, b in zip(g_ref, g):
            _close(a, b)
    for a, b in zip(ref.get_weights(), new.get_weights()):
        _close(a, b)
    assert [w.path for w in new.weights] == [w.path.replace("batch_normalization", "fused_batch_normalization")
                                             for w in ref.weights]


def test_bfloat16_batch_norm_and_gelu_stay_in_bfloat16_and_match_keras():
    # Under mixed_bfloat16 the fused BatchNorm normalizes the bfloat16 tensor itself (float32
    # statistics) and the GELU computes in float32 between a bfloat16 load and store: outputs and
    # input gradients are bfloat16, within bfloat16 rounding (2^-8 relative, a few roundings) of
    # Keras' layers under the same policy; the moving statistics are float32 and agree to 1e-3.
    rng = np.random.default_rng(4)
    x = tf.cast(rng.normal(loc=1.0, scale=2.0, size=(6, 4, 4, 5)), tf.bfloat16)
    ref = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, dtype="mixed_bfloat16")
    new = fused.FusedBatchNormalization(momentum=0.9, epsilon=1e-5, dtype="mixed_bfloat16")
    ref.build((6, 4, 4, 5)), new.build((6, 4, 4, 5))
    ref.set_weights([rng.normal(size=5).astype(np.float32) for _ in range(3)]
                    + [rng.uniform(0.5, 2.0, size=5).astype(np.float32)])
    new.set_weights(ref.get_weights())
    for layer_ref, layer_new in ((ref, new), (keras.layers.Activation("gelu", dtype="mixed_bfloat16"),
                                              fused.ExactGelu(dtype="mixed_bfloat16"))):
        (y_ref, g_ref), (y, g) = _value_and_grads(layer_ref, x), _value_and_grads(layer_new, x)
        assert y.dtype == g[0].dtype == tf.bfloat16, layer_new.name
        _close(tf.cast(y_ref, tf.float32), tf.cast(y, tf.float32), 3e-2)
        for a, b in zip(g_ref, g):
            _close(tf.cast(a, tf.float32), tf.cast(b, tf.float32), 3e-2)
    assert all(w.dtype == "float32" for w in new.weights)
    for a, b in zip(ref.get_weights(), new.get_weights()):
        _close(a, b, 1e-3)


def _train_steps(strategy, kernels: fused.KernelChoice, sync_bn: bool, weights) -> list[np.ndarray]:
    """Three SGD steps of the tiny model on fixed data; returns all weights (moving statistics too)."""
    images = np.random.default_rng(3).normal(size=(8, 8, 8, 3)).astype(np.float32)
    labels = np.arange(8) % 3
    with strategy.scope():
        model = build_convmixer(**TINY, sync_bn=sync_bn, kernels=kernels)
        model.set_weights(weights)
        optimizer = keras.optimizers.SGD(0.1)
        optimizer.build(model.trainable_variables)
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors((images, labels)).repeat(3))

    @tf.function
    def step(x, y):
        def replica(x, y):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                per_example = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=8)
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                          model.trainable_variables))
        strategy.run(replica, (x, y))

    for x, y in dataset:
        step(x, y)
    return [np.asarray(w) for w in model.get_weights()]


@pytest.mark.parametrize("replicas,sync_bn", [(1, False), (2, False), (2, True)])
def test_training_steps_match_keras_layers(replicas, sync_bn):
    keras.utils.set_random_seed(0)
    weights = build_convmixer(**TINY).get_weights()
    strategy = create_strategy(Config(strategy="one_device") if replicas == 1
                               else Config(strategy="mirrored", cpu_replicas=2))
    ref = _train_steps(strategy, fused.KernelChoice(), sync_bn, weights)
    new = _train_steps(strategy, FUSED, sync_bn, weights)
    assert any(np.abs(a - w).max() > 1e-3 for a, w in zip(ref, weights))  # The steps changed weights.
    for a, b in zip(ref, new):
        _close(a, b, 1e-4)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_fused_kernels_train_under_mixed_precision_with_float32_logits(tmp_path, policy):
    config = tiny_config(str(tmp_path), precision=policy, kernels="fused", kernel_size=5)
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train_and_evaluate(config, create_strategy(config))
    assert summary["precision"] == policy and np.isfinite(summary["train_loss"])
    keras.mixed_precision.set_dtype_policy(policy)
    model = create_model(config, "cpu")
    assert type(model.get_layer("block00_depthwise_bn")) is fused.FusedBatchNormalization
    x = np.zeros((2, 8, 8, 3), np.float32)
    assert model(x, training=True).dtype == tf.float32 and model(x, training=False).dtype == tf.float32


@pytest.mark.parametrize("write,read", [("keras", "fused"), ("fused", "keras")])
def test_checkpoints_restore_across_kernels_with_equal_logits(tmp_path, write, read):
    config = Config(**{k: v for k, v in TINY.items()}, kernels=write)
    source = create_model(config, "cpu")
    x = np.random.default_rng(5).normal(size=(4, 8, 8, 3)).astype(np.float32)
    source(x, training=True)  # Moving statistics away from their initial values.
    prefix = tf.train.Checkpoint(model=source).write(str(tmp_path / "ckpt"))
    target = create_model(dataclasses.replace(config, kernels=read), "cpu")
    tf.train.Checkpoint(model=target).read(prefix).assert_existing_objects_matched()
    assert np.abs(np.asarray(source(x, training=False)) - np.asarray(target(x, training=False))).max() < 1e-5


def test_keras_file_round_trip_keeps_fused_layers(tmp_path):
    model = build_convmixer(**TINY, kernels=FUSED)
    x = np.random.default_rng(6).normal(size=(2, 8, 8, 3)).astype(np.float32)
    model(x, training=True)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded.get_layer("block00_depthwise_conv")) is fused.FoldedDepthwiseConv2D
    assert type(loaded.get_layer("block00_pointwise_bn")) is fused.FusedBatchNormalization
    assert type(loaded.get_layer("stem_act")) is fused.ExactGelu
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), atol=1e-6)


def test_keras_kernels_build_plain_keras_layers():
    model = create_model(Config(**TINY, kernels="keras"), "cpu")
    assert type(model.get_layer("block00_depthwise_conv")) is keras.layers.DepthwiseConv2D
    assert type(model.get_layer("block00_depthwise_bn")) is keras.layers.BatchNormalization
    assert type(model.get_layer("block00_depthwise_act")) is keras.layers.Activation
    relu = create_model(Config(**TINY, activation="relu", kernels="fused"), "cpu")
    assert type(relu.get_layer("stem_act")) is keras.layers.Activation  # Only GELU has a fused form.


def test_folded_gradient_ops_carry_the_layer_name_for_profile_report():
    from convmixer_dist.perf.profile_report import classify

    layer = fused.FoldedDepthwiseConv2D(3, padding="same", name="block00_depthwise_conv")
    layer.build((2, 6, 6, 4))

    @tf.function
    def grads(x):
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
        return tape.gradient(y, layer.trainable_variables)

    graph = grads.get_concrete_function(tf.TensorSpec((2, 6, 6, 4))).graph
    ops = [op for op in graph.get_operations() if op.type in ("Transpose", "Pad", "DepthwiseConv2dNative")]
    assert len(ops) == 5 and all(classify(op.name, op.type) == "depthwise_conv" for op in ops), \
        [(op.name, op.type) for op in ops]
