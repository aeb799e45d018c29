"""Every seed of the data comes from `seeds.derive_seed`, and a run started by a version before
that rule (its identity.json has no `data_order`) still resumes, or is refused in one line."""
import json
import os

import pytest

from convmixer_dist import rundir
from convmixer_dist.errors import UsageError
from convmixer_dist.seeds import DATA_ORDER, derive_seed
from helpers import run_cli, tiny_config

TINY = ["--hidden_dim=16", "--depth=2", "--kernel_size=3", "--patch_size=2", "--image_size=8",
        "--num_classes=4", "--synthetic_train_size=64", "--synthetic_test_size=16",
        "--global_batch_size=16", "--steps_per_loop=2", "--checkpoint_every_steps=2"]


def test_keys_are_stable_in_range_and_differ_by_seed_purpose_and_ids():
    assert derive_seed(0, "example order") == derive_seed(0, "example order")
    keys = {derive_seed(seed, purpose, *ids) for seed in (0, 1, 2 ** 31 - 1)
            for purpose in ("example order", "example augmentation", "validation split")
            for ids in ((), (0,), (1,), (0, 1))}
    assert len(keys) == 3 * 3 * 4 and all(0 <= k < 2 ** 31 for k in keys)
    # Fixed values: a key never changes between machines or Python versions; a new rule changes
    # every run's order, so it must come with a new DATA_ORDER (and these values).
    assert DATA_ORDER == 2
    assert derive_seed(0, "example order") == 2119201212
    assert derive_seed(7, "batch augmentation", 3) == 1808983479


def _as_an_older_version_wrote_it(model_dir: str) -> None:
    path = os.path.join(model_dir, rundir.IDENTITY_FILE)
    identity = json.load(open(path))
    assert identity.pop(rundir.DATA_ORDER_KEY) == str(DATA_ORDER)
    json.dump(identity, open(path, "w"))


def test_a_run_started_by_an_older_version_resumes_at_its_step(tmp_path):
    model_dir = str(tmp_path / "run")
    first = run_cli("convmixer_dist.main", f"--model_dir={model_dir}", *TINY, "--train_steps=4")
    assert first.returncode == 0, first.stderr[-2000:]
    _as_an_older_version_wrote_it(model_dir)
    again = run_cli("convmixer_dist.main", f"--model_dir={model_dir}", *TINY, "--train_steps=6")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "was started by an older version" in again.stdout and "at step 4" in again.stdout
    assert json.load(open(os.path.join(model_dir, "summary.json")))["steps"] == 6
    # identity.json is written once: the run stays marked as an older version's.
    assert rundir.DATA_ORDER_KEY not in json.load(open(os.path.join(model_dir, rundir.IDENTITY_FILE)))


def test_an_older_run_with_a_validation_split_is_refused_in_one_line(tmp_path):
    model_dir = tmp_path / "run"
    config = tiny_config(str(model_dir), validation_fraction=0.25)
    rundir.prepare_model_dir(config, chief=True)
    rundir.release_run_lock(config.model_dir)
    (model_dir / "checkpoints" / "ckpt-2.index").write_bytes(b"x")  # as a save would
    rundir.prepare_model_dir(config, chief=True)  # this version's run resumes
    rundir.release_run_lock(config.model_dir)
    _as_an_older_version_wrote_it(str(model_dir))
    with pytest.raises(UsageError, match="started by an older version whose --validation_fraction=0.25 "
                                         "hold-out differs"):
        rundir.prepare_model_dir(config, chief=True)
    rundir.release_run_lock(config.model_dir)
