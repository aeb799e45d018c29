"""The model builder: exact reference parameter counts, logits shape/dtype under every precision."""
import keras
import numpy as np
import pytest

from convmixer_dist.model import PRESETS, build_convmixer, count_params


def reference_param_count(hidden_dim, depth, kernel_size, patch_size, num_classes, channels=3, **_):
    """Parameters of the PyTorch reference ConvMixer, BN running mean/var included."""
    bn = 4 * hidden_dim  # gamma, beta, running mean, running var
    stem = channels * hidden_dim * patch_size ** 2 + hidden_dim + bn
    block = (hidden_dim * kernel_size ** 2 + hidden_dim + bn) + (hidden_dim * hidden_dim + hidden_dim + bn)
    head = hidden_dim * num_classes + num_classes
    return stem + depth * block + head


def test_convmixer_256_8_matches_reference_count():
    model = build_convmixer(**PRESETS["convmixer_256_8"])
    assert count_params(model) == 602_890


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_matches_reference_formula(name):
    model = build_convmixer(**PRESETS[name])
    assert count_params(model) == reference_param_count(**PRESETS[name])


def test_layer_names_are_hierarchical_and_stable():
    model = build_convmixer(hidden_dim=8, depth=2, kernel_size=3, patch_size=2, num_classes=3,
                            image_size=8)
    names = [layer.name for layer in model.layers]
    for expected in ("stem_conv", "stem_bn", "block00_depthwise_conv", "block01_pointwise_bn",
                     "block01_residual", "head_dense"):
        assert expected in names
    bn = model.get_layer("block00_depthwise_bn")
    assert bn.momentum == 0.9 and bn.epsilon == 1e-5  # PyTorch reference values


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_logits_are_float32_under_every_precision(policy):
    keras.mixed_precision.set_dtype_policy(policy)
    model = build_convmixer(hidden_dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=5,
                            image_size=8, dropout_rate=0.1)
    assert model.get_layer("block00_depthwise_conv").compute_dtype == policy.split("_")[-1]
    logits = model(np.zeros((3, 8, 8, 3), np.float32), training=False)
    assert tuple(logits.shape) == (3, 5)
    assert logits.dtype == "float32"
