"""`python -m convmixer_dist.main` end to end, as a user runs it (subprocesses, real files)."""
import glob
import json
import os

from cifar_files import write_cifar10
from helpers import run_cli

TINY = ["--hidden_dim=16", "--depth=2", "--kernel_size=3", "--patch_size=2", "--image_size=8",
        "--global_batch_size=32", "--steps_per_loop=4"]


def test_quickstart_trains_above_chance_writes_outputs_and_resumes(tmp_path):
    model_dir = str(tmp_path / "run")
    args = ["--strategy=mirrored", "--cpu_replicas=2", "--flagfile=configs/quickstart.flags",
            f"--model_dir={model_dir}", "--epochs=2"]
    result = run_cli("convmixer_dist.main", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.load(open(os.path.join(model_dir, "summary.json")))
    assert summary["eval_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert summary["num_replicas"] == 2 and summary["strategy"] == "mirrored"
    assert summary["steps"] == 64 and summary["parameters"] > 0 and summary["images_per_sec"] > 0
    for key in ("eval_loss", "train_loss", "epochs", "wall_seconds", "precision", "model"):
        assert key in summary
    assert glob.glob(os.path.join(model_dir, "train", "events.out.tfevents.*"))
    assert glob.glob(os.path.join(model_dir, "test", "events.out.tfevents.*"))
    assert os.path.exists(os.path.join(model_dir, "checkpoints", "ckpt-64.index"))
    assert "ETA" in result.stdout and "img/s" in result.stdout

    # flags.txt is a valid flagfile: rerunning from it (one more epoch) resumes at step 64.
    flagfile = os.path.join(model_dir, "flags.txt")
    assert "--strategy=mirrored" in open(flagfile).read()
    again = run_cli("convmixer_dist.main", f"--flagfile={flagfile}", "--epochs=3")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Resumed from" in again.stdout and "at step 64" in again.stdout
    assert json.load(open(os.path.join(model_dir, "summary.json")))["steps"] == 96


def test_trains_on_cifar_python_files(tmp_path):
    write_cifar10(str(tmp_path / "data"), train_sizes=(40, 31), test_size=27)
    model_dir = str(tmp_path / "run")
    result = run_cli("convmixer_dist.main", "--dataset=cifar10", f"--data_dir={tmp_path / 'data'}",
                     f"--model_dir={model_dir}", *TINY, "--image_size=32", "--epochs=1")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.load(open(os.path.join(model_dir, "summary.json")))
    assert summary["eval_examples"] == 27 and summary["steps"] == 71 // 32
