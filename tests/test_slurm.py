"""launch/slurm.sbatch on a real single-host Slurm cluster (launch/testing/slurm_cluster.sh): the
README's submission trains as multi_worker x2; USR1 mid-run checkpoints, requeues and resumes to the
same final weights as an uninterrupted run; a job whose second task dies fails fast and says so.

The cluster is started once per session (Debian packages installed when missing; in CI as root).
Where it cannot run (no apt-get to install Slurm, or not root) the tests are skipped with the
script's reason, except in CI (CI=true), where that is an error."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from helpers import ROOT

CLUSTER = os.path.join(ROOT, "launch", "testing", "slurm_cluster.sh")
# The quickstart recipe, shrunk to seconds of training (4 epochs of 8 steps); --deterministic makes
# weights comparable. One call per epoch and a save every epoch, so the preempted run stops on a step
# where the uninterrupted one saves too: every save averages the replicas' BatchNorm moving
# statistics, so a save the uninterrupted run does not make changes the last float32 bits.
FLAGS = ["--flagfile=configs/quickstart.flags", "--hidden_dim=32", "--depth=2",
         "--synthetic_train_size=1024", "--synthetic_test_size=256", "--train_steps=32",
         "--steps_per_loop=8", "--checkpoint_every_steps=8", "--deterministic",
         "--collective_timeout=30"]
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


@pytest.fixture(scope="session")
def slurm_env():
    """Environment for sbatch/scontrol against the test cluster; stops the cluster if it started it
    (a cluster already up, e.g. a developer's, is reused and left running)."""
    cluster_dir = os.environ.get("SLURM_CLUSTER_DIR", "/tmp/convmixer-slurm")
    env = dict(os.environ, SLURM_CLUSTER_DIR=cluster_dir, SLURM_CONF=os.path.join(cluster_dir, "slurm.conf"),
               PYTHON=sys.executable)
    up = subprocess.run(["bash", CLUSTER, "up"], env=env, capture_output=True, text=True, timeout=600)
    if up.returncode == 77 and os.environ.get("CI") != "true":
        pytest.skip(up.stderr.strip())
    assert up.returncode == 0, up.stdout + up.stderr
    yield env
    if "already up" not in up.stdout:
        subprocess.run(["bash", CLUSTER, "down"], env=env, capture_output=True, text=True, timeout=120)


def _sbatch(env, tmp_path, *args, extra_env=None):
    """Submit launch/slurm.sbatch as the README does (plus an output file in tmp_path); job id."""
    result = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks=2",
                             f"--output={tmp_path}/slurm-%j.out", "launch/slurm.sbatch", *args],
                            cwd=ROOT, env=dict(env, **(extra_env or {})), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def _job(env, job_id) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True,
                         text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait(env, job_id, timeout=400) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = _job(env, job_id)
        if job.get("JobState") in FINAL:
            return job
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=env)
    raise AssertionError(f"job {job_id} did not finish within {timeout} s: {_job(env, job_id)}")


def _output(tmp_path, job_id):
    return (tmp_path / f"slurm-{job_id}.out").read_text()


def _weights(text):
    return re.findall(r"weights_sha256 (\w+)", text)


@pytest.fixture(scope="module")
def uninterrupted(slurm_env, tmp_path_factory):
    """The README's submission run to the end: the reference for the preempted run."""
    tmp_path = tmp_path_factory.mktemp("slurm_uninterrupted")
    job_id = _sbatch(slurm_env, tmp_path, *FLAGS, f"--model_dir={tmp_path / 'run'}")
    job = _wait(slurm_env, job_id)
    return job, _output(tmp_path, job_id), tmp_path / "run"


def test_two_tasks_train_as_two_workers(uninterrupted):
    job, output, model_dir = uninterrupted
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", output[-3000:]
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["strategy"] == "multi_worker" and summary["num_replicas"] == 2
    assert summary["steps"] == 32
    assert len(set(_weights(output))) == 1 and len(_weights(output)) == 2  # both tasks agree


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_weights(slurm_env, tmp_path, uninterrupted):
    model_dir = tmp_path / "run"
    job_id = _sbatch(slurm_env, tmp_path, *FLAGS, f"--model_dir={model_dir}")
    deadline = time.time() + 300
    while not (model_dir / "checkpoints" / "ckpt-8.index").exists():
        assert time.time() < deadline and _job(slurm_env, job_id)["JobState"] in ("PENDING", "RUNNING")
        time.sleep(0.2)
    # What `#SBATCH --signal=B:USR1@120` does before the time limit: USR1 to the batch script only,
    # which passes it on to the workers.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=slurm_env, check=True, timeout=30)
    job = _wait(slurm_env, job_id)
    output = _output(tmp_path, job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", output[-4000:]
    assert output.count("preempted: stopped by signal at step") == 2  # both workers, same step
    assert "launch: USR1 (time limit near): asking the workers to save and stop" in output
    assert "exited 75 (preempted); requeueing job" in output
    assert "attempt 1 on" in output and "attempt 2 on" in output  # --open-mode=append kept both
    # The workers stop within a step of the signal, wherever it lands (not at a call boundary).
    resumed = re.search(r"Resumed from .*ckpt-(\d+) at step (\d+)/32", output)
    assert resumed and resumed.group(1) == resumed.group(2) and 8 < int(resumed.group(1)) < 32, output[-4000:]
    summary = json.loads((model_dir / "summary.json").read_text())
    reference = json.loads((uninterrupted[2] / "summary.json").read_text())
    assert summary["steps"] == 32
    # What training computes is bit for bit the uninterrupted run's; the BatchNorm moving statistics
    # (averaged across replicas at every save, here once more at the preemption step) agree to
    # float32 rounding.
    assert summary["trainable_weights_sha256"] == reference["trainable_weights_sha256"]
    assert summary["weights_abs_sum"] == pytest.approx(reference["weights_abs_sum"], rel=1e-7)


def test_a_job_whose_second_task_dies_fails_fast_and_says_so(slurm_env, tmp_path):
    # Task 1 is killed (SIGKILL) once the first checkpoint (step 8) exists, as an out-of-memory kill would.
    model_dir = tmp_path / "run"
    stub = tmp_path / "python_dies_on_task_1"
    stub.write_text(f"""#!/usr/bin/env bash
if [[ $SLURM_PROCID != 1 ]]; then exec {sys.executable} "$@"; fi
{sys.executable} "$@" &
until [[ -e {model_dir}/checkpoints/ckpt-8.index ]]; do sleep 0.2; done
kill -KILL $!
wait $!
""")
    stub.chmod(0o755)
    job_id = _sbatch(slurm_env, tmp_path, *FLAGS, f"--model_dir={model_dir}",
                     extra_env={"PYTHON": str(stub)})
    deadline = time.time() + 300
    while not (model_dir / "checkpoints" / "ckpt-8.index").exists():
        assert time.time() < deadline, "training did not reach step 4"
        time.sleep(0.2)
    died = time.time()
    job = _wait(slurm_env, job_id)
    took = time.time() - died
    output = _output(tmp_path, job_id)
    assert job["JobState"] == "FAILED" and job["Restarts"] == "0", output[-3000:]
    assert took < 45, f"the job needed {took:.0f} s to fail"  # Slurm's KillWait here is 30 s
    assert re.search(r"launch: task 1 on \S+ exited with code 137", output)
    code = re.search(rf"error: job {job_id} failed: a worker exited with code (\d+) .*; not requeued",
                     output)
    assert code and job["ExitCode"] == f"{code.group(1)}:0" and code.group(1) not in ("0", "75")


def test_cluster_script_is_idempotent(slurm_env, tmp_path):
    again = subprocess.run(["bash", CLUSTER, "up"], env=slurm_env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already up" in again.stdout
    absent = dict(slurm_env, SLURM_CLUSTER_DIR=str(tmp_path / "none"))
    down = subprocess.run(["bash", CLUSTER, "down"], env=absent, capture_output=True, text=True, timeout=60)
    assert down.returncode == 0 and "not running" in down.stdout
