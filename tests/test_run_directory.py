"""The run directory is the run: flags.txt never says where a run lives, so a copied run resumes in
the copy (the original's files stay byte-identical), a moved run resumes at its new place, and a
--model_dir on the command line wins over every flagfile (subprocesses, as a user runs them)."""
import json
import os
import shutil

import pytest

from convmixer_dist import flags as cli
from helpers import file_contents, run_cli

TINY = ["--dataset=synthetic", "--num_classes=4", "--synthetic_train_size=128", "--synthetic_test_size=32",
        "--image_size=8", "--hidden_dim=8", "--depth=1", "--kernel_size=3", "--patch_size=2",
        "--global_batch_size=32", "--steps_per_loop=2", "--checkpoint_every_steps=2",
        "--keep_checkpoints=2", "--seed=1"]


@pytest.fixture(scope="module")
def four_step_run(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("base") / "run"
    result = run_cli("convmixer_dist.main", *TINY, "--train_steps=4", f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(model_dir / "checkpoints")) == [
        "checkpoint", "ckpt-2.data-00000-of-00001", "ckpt-2.index", "ckpt-4.data-00000-of-00001",
        "ckpt-4.index", "identity.json"]
    assert "--model_dir" not in (model_dir / "flags.txt").read_text()  # flags.txt does not pin the place
    return model_dir


def test_a_copied_run_resumes_in_the_copy_and_never_touches_the_original(four_step_run, tmp_path):
    original = tmp_path / "run"
    shutil.copytree(four_step_run, original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)  # cp -r RUN COPY
    before = file_contents(original)
    result = run_cli("convmixer_dist.main", f"--flagfile={copy}/flags.txt", "--train_steps=8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Resumed from {copy}/checkpoints/ckpt-4 at step 4/8" in result.stdout
    assert file_contents(original) == before  # rotation, flags.txt and summary.json happened in the copy
    assert json.loads((copy / "summary.json").read_text())["steps"] == 8
    assert sorted(p for p in os.listdir(copy / "checkpoints") if p.endswith(".index")) == [
        "ckpt-6.index", "ckpt-8.index"]


def test_a_moved_run_of_an_older_version_resumes_at_its_new_place(four_step_run, tmp_path):
    old_place = tmp_path / "run"
    shutil.copytree(four_step_run, old_place)
    # Older versions wrote --model_dir into flags.txt (the place the run was written) ...
    flags_txt = old_place / "flags.txt"
    flags_txt.write_text(flags_txt.read_text() + f"--model_dir={old_place}\n")
    # ... and an index rebuilt from disk lists absolute paths.
    index = old_place / "checkpoints" / "checkpoint"
    index.write_text(index.read_text().replace('"ckpt-', f'"{old_place}/checkpoints/ckpt-'))
    new_place = tmp_path / "moved"
    os.rename(old_place, new_place)  # mv RUN NEW
    result = run_cli("convmixer_dist.main", f"--flagfile={new_place}/flags.txt", "--train_steps=6")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Resumed from {new_place}/checkpoints/ckpt-4 at step 4/6" in result.stdout
    assert not old_place.exists()  # nothing started over at the old path
    assert json.loads((new_place / "summary.json").read_text())["steps"] == 6
    assert '"ckpt-6"' in (new_place / "checkpoints" / "checkpoint").read_text()


def test_model_dir_on_the_command_line_wins_over_every_flagfile(tmp_path):
    # launch/local.sh, launch/ssh.sh and the README put --model_dir before the recipe's --flagfile.
    target = tmp_path / "x"
    result = run_cli("convmixer_dist.main", f"--model_dir={target}", "--flagfile=configs/quickstart.flags",
                     *TINY, "--train_steps=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (target / "summary.json").is_file() and (target / "flags.txt").is_file()
    # The rule itself, for every spelling (and a run's flags.txt names its own directory).
    run = tmp_path / "run"
    run.mkdir()
    (run / "flags.txt").write_text((target / "flags.txt").read_text() + "--model_dir=/elsewhere\n")
    assert cli.run_directory(["--model_dir", "A", "--flagfile=configs/quickstart.flags"]) == "A"
    assert cli.run_directory([f"--flagfile={run}/flags.txt"]) == str(run)
    assert cli.run_directory([f"--flagfile={run}/flags.txt", "--model_dir=B"]) == "B"
    assert cli.run_directory(["--flagfile=configs/quickstart.flags"]) is None  # the recipe's own
    assert cli.run_directory(["--", "--model_dir=C"]) is None
