"""The run plan resolves once what a run derives from its config and strategy (in-process, no training)."""
import numpy as np
import pytest
import tensorflow as tf

from convmixer_dist.errors import UsageError
from convmixer_dist.plan import plan
from helpers import tiny_config


def test_the_plan_of_a_mirrored_run(tmp_path, capsys):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    config = tiny_config(str(tmp_path), strategy="mirrored", cpu_replicas=2, validation_fraction=0.25,
                         randaug_n=1, randaug_m=9, augment_on_device=True, profile_steps="2,9")
    run = plan(config, strategy)
    assert (run.derived.num_replicas, run.derived.per_replica_batch_size) == (2, 16)
    assert run.derived.train_size == len(run.train_ids) == 192 and len(run.val_ids) == 64
    assert not set(run.train_ids) & set(run.val_ids)
    assert sorted(np.concatenate([run.train_ids, run.val_ids])) == list(range(256))
    assert (run.device_kind, run.policy, run.xla) == ("cpu", "float32", False)
    assert run.profile_window == (2, 9) and "ends after the run's 6 steps" in capsys.readouterr().out
    assert (run.periods.total, run.periods.epoch, run.periods.steps_per_loop) == (6, 6, 3)
    assert run.periods.steps_in_next_call(0) == 2  # cut where the profile window starts
    assert run.augmentation == "device" and not run.crops_per_example
    assert run.crop_ratio == (1.0, 1.0) and run.description.mean == (127.5, 127.5, 127.5)
    assert run.loaded.train_size == 256 and run.loaded.eval_size == 100


def test_the_plan_places_augmentation_and_checks_the_profile_window(tmp_path):
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    assert plan(tiny_config(str(tmp_path)), strategy).augmentation == "none"  # --augment=basic only
    rrc = plan(tiny_config(str(tmp_path), augment="rrc", crop_scale=0.5, crop_ratio="0.75,1.25"), strategy)
    assert rrc.augmentation == "host" and rrc.crop_ratio == (0.75, 1.25) and rrc.derived.num_replicas == 1
    with pytest.raises(UsageError, match="--profile_steps=6,8: the run has 6 steps"):
        plan(tiny_config(str(tmp_path), profile_steps="6,8"), strategy)
    with pytest.raises(UsageError, match="--randaug_m=31"):
        plan(tiny_config(str(tmp_path), randaug_n=1, randaug_m=31), strategy)
