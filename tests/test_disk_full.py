"""A disk that fills up under the model directory: on a small tmpfs (its own mount namespace, so
nothing outlives the test), every stage at which TensorFlow's save can run out of space leaves no
half-written checkpoint, the last complete one restores, and a training run exits 74 naming it,
then resumes from it once there is space again."""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

TINY_RUN = ["--dataset=synthetic", "--synthetic_train_size=64", "--synthetic_test_size=32",
            "--hidden_dim=64", "--depth=2", "--kernel_size=3", "--patch_size=2", "--image_size=8",
            "--num_classes=4", "--global_batch_size=16", "--steps_per_loop=2",
            "--checkpoint_every_steps=2"]


def in_tmpfs(size: str, command: list[str], stdin: str = "", timeout: float = 600
             ) -> subprocess.CompletedProcess:
    """Run `command` with a fresh tmpfs of `size` mounted at $MNT (a private mount namespace)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = "/tmp/convmixer_disk_full_test"
    os.makedirs(mount, exist_ok=True)
    script = f'mount -t tmpfs -o size={size} tmpfs {mount} && MNT={mount} exec "$@"'
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = ROOT
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *command], input=stdin, env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_every_stage_of_a_save_that_runs_out_of_space_leaves_no_half_checkpoint():
    proc = in_tmpfs("1m", [sys.executable, "tests/disk_full_saves.py", "/tmp/convmixer_disk_full_test",
                           "0", "36"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = [json.loads(line) for line in proc.stdout.splitlines()]
    failed = [o for o in outcomes if "disk_full" in o]
    for o in failed:
        assert o["left"] == [], o  # nothing of ckpt-2 is left to be mistaken for a good checkpoint
        assert o["restored"] == "ckpt-1" and o["restored_first"] == 1.0, o  # the last complete one
        assert "the last complete checkpoint is /tmp/convmixer_disk_full_test/checkpoints/ckpt-1" in o["disk_full"]
    for o in outcomes:
        if "saved" in o:
            assert o["restored"] == "ckpt-2" and o["restored_first"] > 1.0, o
    # The three places TensorFlow runs out of space were all met: writing the data into ckpt-2_temp,
    # its index there, and merging into ckpt-2.index (a zero-byte index beside a complete data file).
    stages = {o["stage"].split(".tempstate")[0] for o in failed}
    assert {"part-00000-of-00001.data-00000-of-00001", "part-00000-of-00001.index", "ckpt-2.index"} <= stages, stages
    assert outcomes[-1].get("saved") == "ckpt-2", outcomes[-1]  # with enough space the save works


def test_a_training_run_on_a_full_disk_exits_74_naming_the_last_checkpoint_and_resumes():
    run = "/tmp/convmixer_disk_full_test/run"
    data = f"{run}/checkpoints/ckpt-2.data-00000-of-00001"
    fill = ("python3 -c \"import os; d='/tmp/convmixer_disk_full_test'; st=os.statvfs(d); "
            f"keep=os.path.getsize('{data}') // st.f_frsize // 2; "
            "open(d + '/filler', 'wb').write(b'0' * st.f_frsize * max(0, st.f_bavail - keep))\"")
    cases = [{"module": "convmixer_dist.main", "argv": [*TINY_RUN, "--train_steps=2", f"--model_dir={run}"]},
             {"shell": fill},  # room for half a checkpoint
             {"module": "convmixer_dist.main", "argv": [*TINY_RUN, "--train_steps=4", f"--model_dir={run}"]},
             {"shell": f"ls {run}/checkpoints; rm /tmp/convmixer_disk_full_test/filler"},
             {"module": "convmixer_dist.main", "argv": [*TINY_RUN, "--train_steps=4", f"--model_dir={run}"]}]
    proc = in_tmpfs("4m", [sys.executable, "tests/command_driver.py"], stdin=json.dumps(cases))
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, filled, full, listing, resumed = json.loads(proc.stdout)
    assert first["code"] == 0 and filled["code"] == 0, (first, filled)
    lines = full["stderr"].splitlines()
    assert full["code"] == 74 and len(lines) == 1 and "Traceback" not in full["stderr"], full
    assert lines[0].startswith("error: no space left on device saving checkpoint 4"), lines
    assert f"the last complete checkpoint is {run}/checkpoints/ckpt-2;" in lines[0], lines
    assert "ckpt-4" not in listing["stdout"], listing  # no half-written checkpoint
    assert resumed["code"] == 0, resumed
    assert "Done: test accuracy" in resumed["stdout"] and ", 4 steps;" in resumed["stdout"], resumed
    assert "warning" not in resumed["stderr"], resumed  # nothing unusable had to be skipped
