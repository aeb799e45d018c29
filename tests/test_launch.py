"""The launch scripts: usage, argument errors, quoting, kill-all-on-failure (with stub workers)."""
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from helpers import ROOT

SCRIPTS = ["launch/local.sh", "launch/ssh.sh", "launch/slurm.sbatch", "launch/k8s/worker.sh",
           "launch/testing/slurm_cluster.sh"]


def sh(*args, env=None, timeout=60):
    return subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax_and_usage(script):
    assert sh("-n", script).returncode == 0
    result = sh(script, "-h")
    assert result.returncode == 0 and result.stdout.startswith("usage:")


@pytest.mark.parametrize("args,named", [
    (["launch/local.sh", "1", "--model_dir=x"], "N='1'"),
    (["launch/local.sh", "two", "--model_dir=x"], "N='two'"),
    (["launch/local.sh", "2", "--epochs=1"], "--model_dir"),
    (["launch/ssh.sh", "/nonexistent/hosts"], "HOSTS_FILE"),
    (["launch/slurm.sbatch"], "sbatch"),
])
def test_bad_arguments_are_one_line_exit_2(args, named):
    result = sh(*args, env={"SLURM_JOB_ID": ""})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0]


def test_ssh_hosts_file_with_a_bad_line_names_it(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# cluster\nnode1\nnode2:99999\n")
    result = sh("launch/ssh.sh", str(hosts))
    assert result.returncode == 2 and f"{hosts}:3" in result.stderr and "node2:99999" in result.stderr


def _stub_python(tmp_path, body):
    """A fake interpreter that records its TF_CONFIG and arguments, then runs `body` (bash)."""
    stub = tmp_path / "fake_python"
    stub.write_text("#!/usr/bin/env bash\n"
                    f'echo "$TF_CONFIG" > "{tmp_path}/tf_config.$$"\n'
                    f'printf "%s\\n" "$@" > "{tmp_path}/args.$$"\n' + body)
    stub.chmod(0o755)
    return str(stub)


def _recorded(tmp_path, prefix):
    return [p.read_text() for p in sorted(tmp_path.glob(prefix + ".*"))]


def test_local_sh_gives_each_worker_its_tf_config_and_logs(tmp_path):
    stub = _stub_python(tmp_path, "echo worker done\n")
    model_dir = tmp_path / "run"
    result = sh("launch/local.sh", "3", f"--model_dir={model_dir}", "--note=a b's",
                env={"PYTHON": stub})
    assert result.returncode == 0, result.stderr
    configs = [json.loads(c) for c in _recorded(tmp_path, "tf_config")]
    assert sorted(c["task"]["index"] for c in configs) == [0, 1, 2]
    assert len({tuple(c["cluster"]["worker"]) for c in configs}) == 1
    assert len(set(configs[0]["cluster"]["worker"])) == 3  # distinct ports
    assert all("--note=a b's" in a.splitlines() for a in _recorded(tmp_path, "args"))  # quoting intact
    assert sorted(p.name for p in (model_dir / "logs").iterdir()) == [f"worker-{i}.log" for i in range(3)]
    assert "TF_CONFIG=" in result.stdout  # the exact command is echoed


def test_local_sh_waits_for_every_worker_when_the_chief_ends_first(tmp_path):
    # The launcher also runs `tail` on the chief's log, which ends with the chief: it must not count
    # as a worker, or the launcher returns while worker 1 still runs (its last lines not yet written).
    stub = _stub_python(tmp_path, 'case "$TF_CONFIG" in *\'"index": 1}\'*) sleep 3; echo late line;; esac\n'
                                  "echo worker done\n")
    model_dir = tmp_path / "run"
    result = sh("launch/local.sh", "2", f"--model_dir={model_dir}", env={"PYTHON": stub})
    assert result.returncode == 0, result.stderr
    assert "late line" in (model_dir / "logs" / "worker-1.log").read_text()
    assert "worker done" in result.stdout  # the chief's log, shown live


def test_local_sh_stops_all_workers_when_one_fails(tmp_path):
    # Worker processes sleep 60 s, except the one whose task index is 1: it fails at once.
    stub = _stub_python(tmp_path, 'case "$TF_CONFIG" in *\'"index": 1}\'*) exit 7;; esac\nsleep 60\n')
    started = time.time()
    result = sh("launch/local.sh", "3", f"--model_dir={tmp_path / 'run'}", env={"PYTHON": stub})
    assert result.returncode == 7
    assert time.time() - started < 20
    assert "worker 1" in result.stderr and "failed with exit code 7" in result.stderr


def test_ssh_sh_runs_the_quoted_command_on_each_host(tmp_path):
    # A fake ssh: drops the host and runs the remote command with bash, as sshd would.
    fake_ssh = tmp_path / "fake_ssh"
    fake_ssh.write_text(f'#!/usr/bin/env bash\necho "$1" >> "{tmp_path}/hosts_seen"\nshift\nexec bash -c "$1"\n')
    fake_ssh.chmod(0o755)
    stub = _stub_python(tmp_path, "exit 0\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("alpha:3000\n\n# comment\nbeta\n")
    result = sh("launch/ssh.sh", str(hosts), "--note=x y", env={
        "SSH": str(fake_ssh), "REMOTE_PYTHON": stub, "REMOTE_DIR": str(tmp_path),
        "LOG_DIR": str(tmp_path / "logs")})
    assert result.returncode == 0, result.stderr
    assert sorted((tmp_path / "hosts_seen").read_text().split()) == ["alpha", "beta"]
    configs = [json.loads(c) for c in _recorded(tmp_path, "tf_config")]
    assert configs[0]["cluster"]["worker"] == ["alpha:3000", "beta:2222"]
    assert sorted(c["task"]["index"] for c in configs) == [0, 1]
    assert all("--note=x y" in a.splitlines() for a in _recorded(tmp_path, "args"))


def test_slurm_script_requests_no_gpus_and_keeps_the_output_of_a_requeued_job():
    # (Its decisions are tested in test_slurm_script.py, the real thing in test_slurm.py.)
    directives = [line for line in open(os.path.join(ROOT, "launch/slurm.sbatch")) if line.startswith("#SBATCH")]
    assert not any("gpu" in d or "gres" in d or "ntasks" in d for d in directives)
    assert "#SBATCH --open-mode=append\n" in directives and "#SBATCH --requeue\n" in directives
    assert "#SBATCH --signal=B:USR1@120\n" in directives


def test_tfjob_manifest_has_worker_replicas_running_main():
    with open(os.path.join(ROOT, "launch/k8s/tfjob.yaml")) as f:
        job = yaml.safe_load(f)
    assert job["kind"] == "TFJob" and job["apiVersion"] == "kubeflow.org/v1"
    worker = job["spec"]["tfReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 2
    container = worker["template"]["spec"]["containers"][0]
    assert container["command"] == ["bash", "launch/k8s/worker.sh"]
    assert "--strategy=multi_worker" in container["args"]
    # Preempted (exit 75, mapped to 143 by worker.sh) restarts; 1-127 are permanent failures.
    assert worker["restartPolicy"] == "ExitCode"


@pytest.mark.parametrize("worker_code,pod_code", [(0, 0), (75, 143), (1, 1), (2, 2), (3, 3)])
def test_k8s_worker_makes_only_preemption_retryable(tmp_path, worker_code, pod_code):
    stub = _stub_python(tmp_path, f"exit {worker_code}\n")
    result = sh("launch/k8s/worker.sh", "--model_dir=x", env={"PYTHON": stub})
    assert result.returncode == pod_code
    assert _recorded(tmp_path, "args")[0].splitlines() == ["-m", "convmixer_dist.main", "--model_dir=x"]


def test_k8s_worker_passes_sigterm_on_to_the_run(tmp_path):
    stub = _stub_python(tmp_path, f"trap 'exit 75' TERM\necho up > {tmp_path}/up\nsleep 30 >/dev/null 2>&1 & wait\n")
    proc = subprocess.Popen(["bash", "launch/k8s/worker.sh"], cwd=ROOT, env=dict(os.environ, PYTHON=stub),
                            stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "up").exists():
        time.sleep(0.05)
    proc.terminate()  # only the entry point, as Kubernetes signals PID 1
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and "preempted" in err


def test_ssh_sh_stop_reaches_the_remote_workers(tmp_path):
    # Killing an ssh client does not signal the remote command; the remote side watches its stdin
    # (a pipe only ssh.sh writes to) and sends SIGTERM to its worker when that closes.
    fake_ssh = tmp_path / "fake_ssh"
    fake_ssh.write_text('#!/usr/bin/env bash\nshift\nexec bash -c "$1"\n')
    fake_ssh.chmod(0o755)
    stub = _stub_python(tmp_path, f"trap 'echo > {tmp_path}/stopped.$$; exit 75' TERM\n"
                                  f"echo > {tmp_path}/up.$$\nsleep 60 >/dev/null 2>&1 & wait\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("alpha\nbeta\n")
    proc = subprocess.Popen(["bash", "launch/ssh.sh", str(hosts)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(
                                os.environ, SSH=str(fake_ssh), REMOTE_PYTHON=stub,
                                REMOTE_DIR=str(tmp_path), LOG_DIR=str(tmp_path / "logs")))
    deadline = time.time() + 30
    while len(list(tmp_path.glob("up.*"))) < 2:
        assert time.time() < deadline
        time.sleep(0.05)
    proc.terminate()
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    while len(list(tmp_path.glob("stopped.*"))) < 2:
        assert time.time() < deadline + 10, "a remote worker was not stopped"
        time.sleep(0.05)


@pytest.mark.parametrize("count", ["08", "09", "010", "0", "-2", "+3", "2.0", "0x10", "257", "99999999999999999999",
                                   " 2", "2 ", "٣"])
def test_local_sh_count_is_checked_as_text_before_any_arithmetic(tmp_path, count):
    result = sh("launch/local.sh", count, f"--model_dir={tmp_path / 'run'}", env={"PYTHON": "false"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: launch/local.sh: N='{count}': expected a decimal number of workers in 2..256 (see -h)"]
    assert not (tmp_path / "run").exists() and result.stdout == ""


@pytest.mark.parametrize("line", ["node1 2222", "node1\t2222", "node1:2222 x", "node1:02222", "node1:0",
                                  "node1:65536", "node1:", ":2222", "-oProxyCommand=touch_x", "node1:22:22",
                                  "user@node1", "node1:99999999999999999999"])
def test_ssh_hosts_line_is_rejected_with_its_line_number_not_glued(tmp_path, line):
    hosts = tmp_path / "hosts"
    hosts.write_text(f"# cluster\n  node0  \n{line}\n")
    result = sh("launch/ssh.sh", str(hosts), env={"SSH": "false", "LOG_DIR": str(tmp_path / "logs")})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {hosts}:3: '{line.strip()}' is not a host or host:port (port 1..65535)"]
    assert not (tmp_path / "logs").exists()


def test_ssh_sh_with_a_directory_as_hosts_file_is_one_line_exit_2(tmp_path):
    result = sh("launch/ssh.sh", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: launch/ssh.sh: HOSTS_FILE='{tmp_path}' is not a readable file (see -h)"]
