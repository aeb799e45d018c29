"""launch/slurm.sbatch's decisions without Slurm: GPUs and task layout, how task exit codes combine
into the job's outcome (done / requeue / fail, independent of which worker exits first), the task
wrapper, and the batch script itself with srun/scontrol/scancel replaced by recording stubs."""
import os
import signal
import subprocess
import time

import pytest

from helpers import ROOT

LIB = os.path.join(ROOT, "launch", "_slurm.sh")


def lib(call, env=None):
    """Run `call` (bash) with launch/_slurm.sh sourced; (exit code, stdout, stderr)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GPUS_PER_NODE"))}
    result = subprocess.run(["bash", "-c", f'source "{LIB}"; {call}'], capture_output=True, text=True,
                            env=dict(clean, **(env or {})), timeout=30)
    return result.returncode, result.stdout.strip(), result.stderr.strip()


@pytest.mark.parametrize("env,gpus", [
    ({}, "0"),                                            # CPU-only: no GPU request anywhere
    ({"SLURM_GPUS_PER_NODE": "4"}, "4"),                  # sbatch --gpus-per-node=4
    ({"SLURM_GPUS_PER_NODE": "a100:8"}, "8"),             # sbatch --gpus-per-node=a100:8
    ({"SLURM_GPUS_ON_NODE": "2"}, "2"),                   # sbatch --gres=gpu:2
    ({"GPUS_PER_NODE": "8", "SLURM_GPUS_PER_NODE": "4"}, "8"),  # the environment variable wins
])
def test_gpus_per_node(env, gpus):
    assert lib("gpus_per_node", env) == (0, gpus, "")


def test_gpus_per_node_that_is_not_a_number_is_one_line_exit_2():
    code, _, err = lib("gpus_per_node", {"GPUS_PER_NODE": "eight"})
    assert code == 2 and err.startswith("error:") and "'eight'" in err and len(err.splitlines()) == 1


def test_one_task_per_gpu_on_gpu_nodes_and_the_allocation_on_cpu_nodes():
    assert lib("srun_geometry 4 2")[1] == "--ntasks-per-node=4 --ntasks=8"
    assert lib("srun_geometry 0 2")[1] == ""


@pytest.mark.parametrize("worker_codes,action", [
    ([0, 0], "done"),
    ([75, 75], "requeue"),          # preempted: all saved
    ([75, 0], "requeue"),           # one worker had finished its exit before the signal
    ([0, 75], "requeue"),
    ([1, 75], "fail 1"),            # a crash outranks the other's preemption exit
    ([75, 1], "fail 1"),
    ([3, 3], "fail 3"),             # diverged
    ([2, 2], "fail 2"),             # usage error
    ([137, 75], "fail 137"),        # killed (e.g. out of memory): not requeued
    ([75, 137], "fail 137"),
])
def test_job_outcome_does_not_depend_on_which_worker_exits_first(worker_codes, action):
    # srun returns the highest task exit code; each task reports task_exit_code of its worker's code.
    mapped = [int(lib(f"task_exit_code {c}")[1]) for c in worker_codes]
    assert lib(f"job_action {max(mapped)}")[1] == action


def test_task_wrapper_outlives_the_signal_and_reports_the_workers_code(tmp_path):
    # Slurm signals every process of a task; the wrapper must wait for the worker's own exit code.
    worker = tmp_path / "worker"
    worker.write_text("#!/usr/bin/env bash\ntrap 'sleep 0.5; exit 75' TERM\n"
                      f"echo ready > {tmp_path}/ready\nsleep 30 & wait\n")
    worker.chmod(0o755)
    proc = subprocess.Popen(["bash", LIB, "run_task", str(worker)], start_new_session=True,
                            stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "ready").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole task, as slurmstepd does
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75 and err == ""


def test_task_wrapper_names_a_failing_task(tmp_path):
    code, _, err = lib(f'SLURM_PROCID=1 bash "{LIB}" run_task bash -c "exit 3"')
    assert code == 203  # ranks above 75; job_action decodes it back to 3
    assert err.startswith("launch: task 1 on ") and err.endswith("exited with code 3")


def _fake_slurm(tmp_path, srun_body):
    """PATH with stub srun/scontrol/scancel that record their arguments in tmp_path/calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", srun_body), ("scontrol", "exit 0"), ("scancel", "exit 0")):
        stub = bin_dir / name
        stub.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> {tmp_path}/calls\n{body}\n')
        stub.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": ROOT,
            "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node1"}


def _batch(tmp_path, srun_body, wait=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GPUS_PER_NODE"))}
    env.update(_fake_slurm(tmp_path, srun_body))
    proc = subprocess.Popen(["bash", "launch/slurm.sbatch", "--model_dir=x"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        proc.communicate(timeout=60)
    return proc


def _calls(tmp_path):
    return (tmp_path / "calls").read_text().splitlines()


def test_batch_script_requeues_when_the_workers_were_preempted(tmp_path):
    proc = _batch(tmp_path, "exit 75")
    assert proc.returncode == 75
    calls = _calls(tmp_path)
    assert calls[0].startswith("srun --kill-on-bad-exit=1 bash launch/_slurm.sh run_task")
    assert "--strategy=multi_worker --cluster=slurm --model_dir=x" in calls[0]
    assert "--gpus" not in calls[0] and "--ntasks" not in calls[0]  # CPU-only: the allocation's tasks
    assert calls[1] == "scontrol requeue 42"


@pytest.mark.parametrize("srun_code,job_code", [(0, 0), (202, 2), (137, 137)])
def test_batch_script_does_not_requeue_success_or_failure(tmp_path, srun_code, job_code):
    proc = _batch(tmp_path, f"exit {srun_code}")
    assert proc.returncode == job_code
    assert not any(c.startswith("scontrol") for c in _calls(tmp_path))


def test_batch_script_passes_usr1_from_slurm_to_the_workers(tmp_path):
    # --signal=B:USR1@120 reaches only the batch shell; it asks Slurm to signal the job's steps.
    proc = _batch(tmp_path, "sleep 2; exit 75", wait=False)
    while not (tmp_path / "calls").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert "scancel --signal=USR1 42" in _calls(tmp_path)
    assert proc.returncode == 75 and "scontrol requeue 42" in _calls(tmp_path)


@pytest.mark.parametrize("gpus", ["08", "09", "-1", "65", "99999999999999999999", "4 ", "0x8", "1e3", ""])
def test_gpus_per_node_is_checked_as_text_before_any_arithmetic(gpus):
    code, out, err = lib("gpus_per_node", {"GPUS_PER_NODE": gpus} if gpus else {"SLURM_GPUS_ON_NODE": "x"})
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("error:") and "decimal number in 0..64" in err


@pytest.mark.parametrize("env", [{"GPUS_PER_NODE": "08"}, {"SLURM_JOB_NUM_NODES": "02"}])
def test_batch_script_with_a_bad_number_starts_no_srun(tmp_path, env):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GPUS_PER_NODE"))}
    base.update(_fake_slurm(tmp_path, "exit 0"), **env)
    result = subprocess.run(["bash", "launch/slurm.sbatch", "--model_dir=x"], cwd=ROOT, env=base,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: launch/slurm.sbatch: ")
    assert not (tmp_path / "calls").exists()  # srun never ran
