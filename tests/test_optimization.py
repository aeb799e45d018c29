"""optimization: --wd_exclude_bias_bn keeps biases and BatchNorm parameters out of weight decay."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from convmixer_dist import optimization
from convmixer_dist.model import create_model
from helpers import tiny_config


@pytest.mark.parametrize("exclude", [True, False])
def test_weight_decay_exclusion_leaves_bias_and_batchnorm_untouched(tmp_path, exclude):
    config = tiny_config(str(tmp_path), lr_schedule="constant", learning_rate=0.1, weight_decay=0.5,
                         wd_exclude_bias_bn=exclude)
    model = create_model(config)
    optimizer = optimization.create_optimizer(config, 10, "float32", variables=model.trainable_variables)
    optimizer.build(model.trainable_variables)
    before = [v.numpy().copy() for v in model.trainable_variables]
    # Zero gradients: Adam's step is 0, so any change is the decoupled decay w -= lr * wd * w.
    optimizer.apply_gradients([(tf.zeros_like(v), v) for v in model.trainable_variables])
    one_d = [v.path for v in model.trainable_variables if len(v.shape) <= 1]
    assert any("bn" in p for p in one_d) and any("bias" in p for p in one_d)
    for variable, old in zip(model.trainable_variables, before):
        if len(variable.shape) <= 1 and exclude:
            np.testing.assert_array_equal(variable.numpy(), old, err_msg=variable.path)
        else:
            np.testing.assert_allclose(variable.numpy(), old * (1 - 0.1 * 0.5), rtol=1e-6,
                                       err_msg=variable.path)
