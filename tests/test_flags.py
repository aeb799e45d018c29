"""Each setting is declared once (a `Config` field): every field is a flag with help text and the
field's default, flags.txt round-trips every field, and the declared bounds produce one-line errors."""
from __future__ import annotations

import dataclasses

import pytest
from absl import flags

from convmixer_dist import config as cfg
from convmixer_dist import flags as cli
from convmixer_dist.commands import saved_run
from convmixer_dist.errors import UsageError


def _fresh_flags() -> flags.FlagValues:
    """The training flags defined on their own FlagValues (the global FLAGS stay untouched)."""
    flag_values = flags.FlagValues()
    cli.define_flags(flag_values)
    return flag_values


def _other_value(field: dataclasses.Field):
    """A value of the field's type different from its default (not necessarily valid together)."""
    kind, default, choices = cfg.setting_type(field), field.default, field.metadata["choices"]
    if choices:
        return next(choice for choice in choices if choice != default)
    return {"bool": lambda: not default, "int": lambda: default + 3, "float": lambda: default + 0.25,
            "str": lambda: f"{default}x"}[kind]()


def test_every_config_field_is_a_flag_with_help_and_the_fields_default():
    flag_values = _fresh_flags()
    for field in cfg.settings():
        assert field.name in flag_values, field.name
        flag = flag_values[field.name]
        assert field.metadata["help"] and flag.help.endswith(field.metadata["help"]), field.name
        if field.metadata["unset"]:
            assert flag.default is None, field.name  # Resolved from the preset or the dataset.
        else:
            assert flag.default == field.default, field.name
        if field.metadata["choices"] is not None:
            assert isinstance(flag, flags.EnumFlag) and list(field.metadata["choices"]) == flag.parser.enum_values
    # The flags are exactly the fields, plus the former names of renamed ones (aliases).
    assert ({f.name for f in cfg.settings()} | set(cfg.RENAMED_SETTINGS)
            == set(_fresh_flags()) - set(flags.FlagValues()))


def test_flags_txt_round_trips_every_field(tmp_path):
    changed = cfg.Config(**{field.name: _other_value(field) for field in cfg.settings()})
    path = tmp_path / "flags.txt"
    path.write_text(changed.to_flagfile())
    written = cfg.read_flagfile(str(path))
    saved = {field.name for field in cfg.settings() if field.metadata["flagfile"]}
    assert set(written) == saved
    # Read back by the commands that reopen a run (saved_run) ...
    for name, text in written.items():
        assert cfg.value_from_text(name, text) == getattr(changed, name), name
    # ... and by absl, as `--flagfile=MODEL_DIR/flags.txt` of a rerun.
    flag_values = _fresh_flags()
    flag_values(["main", f"--flagfile={path}"])
    values = cli.values_from_flags(flag_values)
    for name in saved:
        assert values[name] == getattr(changed, name), name


def test_default_flags_resolve_to_the_default_config():
    flag_values = _fresh_flags()
    flag_values(["main"])
    assert cli.config_from_flags(flag_values) == cfg.Config()


def test_preset_overrides_resolve_and_a_written_run_reopens_identically(tmp_path):
    flag_values = _fresh_flags()
    flag_values(["main", "--model=convmixer_768_32", "--depth=4", "--image_size=224",
                 f"--model_dir={tmp_path}"])
    config = cli.config_from_flags(flag_values)
    assert (config.hidden_dim, config.depth, config.patch_size, config.activation) == (768, 4, 7, "relu")
    (tmp_path / "flags.txt").write_text(config.to_flagfile())
    assert saved_run.load_run_config(str(tmp_path)) == config


def test_a_renamed_setting_keeps_its_former_name_on_the_command_line_and_in_old_runs(tmp_path):
    # "eval" used to mean the test split: --synthetic_eval_size is now --synthetic_test_size.
    flag_values = _fresh_flags()
    flag_values(["main", "--synthetic_eval_size=7"])
    assert cli.config_from_flags(flag_values).synthetic_test_size == 7
    assert cli.overrides_from_flags(flag_values)["synthetic_test_size"] == "7"
    # flags.txt of a run written before the rename reopens with the new name.
    config = cfg.Config(model_dir=str(tmp_path), synthetic_test_size=9)
    (tmp_path / "flags.txt").write_text(config.to_flagfile().replace("--synthetic_test_size=",
                                                                     "--synthetic_eval_size="))
    assert "--synthetic_eval_size=9" in (tmp_path / "flags.txt").read_text()
    assert saved_run.load_run_config(str(tmp_path)) == config


@pytest.mark.parametrize("name, value, expected", [
    ("hidden_dim", 0, "--hidden_dim=0: expected an integer in [1, 65536]"),
    ("dropout_rate", 1.0, "--dropout_rate=1.0: expected a finite number in [0, 1)"),
    ("nan_lr_factor", 0.0, "--nan_lr_factor=0.0: expected a finite number in (0, 1)"),
    ("profile_python_tracer_level", 2, "--profile_python_tracer_level=2: expected an integer in [0, 1]"),
    ("strategy", "bogus", "--strategy=bogus: expected one of one_device, mirrored, multi_worker"),
])
def test_declared_bounds_and_choices_are_one_line_errors(name, value, expected):
    with pytest.raises(UsageError) as err:
        cli.validate(dataclasses.replace(cfg.Config(), **{name: value}))
    assert str(err.value) == expected
    cfg.check_setting(name, cfg.setting_field(name).default)  # The default passes.


def test_every_numeric_setting_declares_its_bounds():
    for field in cfg.settings():
        if cfg.setting_type(field) in ("int", "float"):
            assert field.metadata["bounds"], field.name
