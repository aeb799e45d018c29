"""Every numeric flag's own range is checked, whatever else is set; NaN, infinities and absurd
magnitudes are refused for every float flag (in-process: validation runs before TensorFlow)."""
import dataclasses
import math

import pytest

from convmixer_dist import flags as cli
from convmixer_dist.config import Config
from convmixer_dist.errors import UsageError
from helpers import tiny_config

NUMERIC = [f.name for f in dataclasses.fields(Config) if f.type in ("int", "float", int, float)]
FLOATS = [f.name for f in dataclasses.fields(Config) if f.type in ("float", float)]


def test_every_numeric_flag_has_a_range():
    assert set(NUMERIC) == set(cli.RANGES)
    assert len(FLOATS) >= 10


def test_the_tiny_config_is_valid(tmp_path):
    cli.validate(tiny_config(str(tmp_path)))


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e308, -1e308])
def test_non_finite_and_absurd_floats_are_refused(tmp_path, name, value):
    config = dataclasses.replace(tiny_config(str(tmp_path)), **{name: value})
    with pytest.raises(UsageError, match=rf"^--{name}=\S+: expected a finite number in "):
        cli.validate(config)


@pytest.mark.parametrize("name", sorted(set(NUMERIC) - set(FLOATS)))
@pytest.mark.parametrize("value", [2 ** 31, -2 ** 31, 10 ** 400])
def test_out_of_range_integers_are_refused(tmp_path, name, value):
    config = dataclasses.replace(tiny_config(str(tmp_path)), **{name: value})
    with pytest.raises(UsageError, match=rf"^--{name}={value}: expected an integer in "):
        cli.validate(config)


@pytest.mark.parametrize("name", NUMERIC)
def test_each_range_is_checked_whatever_else_is_set(tmp_path, name):
    # Just outside the lower bound, with settings that used to make some checks conditional
    # (e.g. --epochs was only checked without --train_steps).
    low, _, bounds = cli.RANGES[name]
    outside = low - 1 if bounds[0] == "[" else low
    config = dataclasses.replace(tiny_config(str(tmp_path)), **{"train_steps": 5, name: outside})
    with pytest.raises(UsageError, match=rf"^--{name}="):
        cli.validate(config)


def test_negative_epochs_refused_with_train_steps(tmp_path):
    config = tiny_config(str(tmp_path), train_steps=5, epochs=-3)
    with pytest.raises(UsageError, match=r"--epochs=-3: expected an integer in \[1, "):
        cli.validate(config)
