"""Bounded, interruptible multi-worker start-up (`--startup_timeout`).

Creating MultiWorkerMirroredStrategy blocks inside TensorFlow's C++ runtime, holding Python's global
interpreter lock, until every task has joined; the chief waits forever for a missing peer, and
TensorFlow installs its own SIGTERM handler meanwhile (it only records the signal). No Python code
runs in that process until creation returns, so a worker whose peer never comes would ignore
`timeout`, Slurm's and Kubernetes' SIGTERM, and the launchers' stop. Hence three steps:

1. `block_stop_signals` (main, before TensorFlow is imported): SIGTERM/SIGUSR1/SIGINT stay pending
   instead of reaching any thread, so TensorFlow's handler never sees them.
2. `rendezvous`: pure Python. Each task listens on its own port (TensorFlow's, not yet bound),
   says hello to every peer and waits for every peer's hello, polling for pending signals. A
   missing peer ends it after the timeout with one line naming the task; a signal ends it at once
   (exit 75: nothing was trained yet, rerun to resume).
3. `watch_creation`: while TensorFlow creates the strategy (normally seconds once all peers are
   known to be up), a tiny watchdog process (this file run as a script; standard library only)
   watches the worker's pending signals and the deadline, and kills the worker with one line
   when either fires. Then `after_creation` puts Python's handlers back over TensorFlow's and
   unblocks the signals, so a signal that arrived meanwhile is handled as a normal preemption.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import select
import signal
import socket
import subprocess
import sys
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_STARTUP_FAILED = 1  # A peer never answered within --startup_timeout.
EXIT_PREEMPTED = 75  # Same as main.EXIT_PREEMPTED: stopped by a signal, rerun to resume.
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C).
_POLL_SECONDS = 0.1


def block_stop_signals() -> None:
    """Keep SIGTERM/SIGUSR1/SIGINT pending in this thread and in every thread created later.

    Must run before TensorFlow is imported (its import starts a thread that would otherwise take
    the signal into TensorFlow's own SIGTERM handler)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _stopped_by(signum: int, phase: str) -> None:
    """Exit for a signal during start-up: nothing was trained, so 75 (rerun resumes) or 130."""
    name = signal.Signals(signum).name
    if signum == signal.SIGINT:
        print(f"interrupted: {name} during multi-worker start-up ({phase})", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    print(f"preempted: {name} during multi-worker start-up ({phase}); nothing to save, rerun the "
          f"same command to resume", file=sys.stderr, flush=True)
    sys.exit(EXIT_PREEMPTED)


def _pending_stop_signal(wait: float) -> int | None:
    """A pending stop signal (consumed), waiting up to `wait` seconds; None if there is none."""
    info = signal.sigtimedwait(STOP_SIGNALS, wait)
    return info.si_signo if info is not None else None


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def describe(names: list[str], addresses: list[str]) -> str:
    """'worker 1 (host:port), ...' for the task names and addresses given."""
    return ", ".join(f"{name} ({address})" for name, address in zip(names, addresses))


def _token(addresses: list[str]) -> str:
    """Identifies this cluster, so a stray process of another run is not taken for a peer."""
    return hashlib.sha256(" ".join(addresses).encode()).hexdigest()[:16]


def hello(address: str, token: str, index: int, timeout: float = 1.0) -> bool:
    """Tell the task listening at `address` that task `index` is up; False if it is not listening."""
    try:
        with socket.create_connection(_split(address), timeout=timeout) as conn:
            conn.sendall(f"convmixer-startup {token} {index}\n".encode())
        return True
    except OSError:
        return False


def _read_hello(listener: socket.socket, token: str) -> int | None:
    """Accept one connection if any is waiting; the sender's task index if it said a valid hello."""
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, OSError):
        return None
    with conn:
        conn.settimeout(1.0)
        data = b""
        try:
            while not data.endswith(b"\n") and len(data) < 200:
                chunk = conn.recv(200)
                if not chunk:
                    break
                data += chunk
        except OSError:
            return None
    parts = data.decode(errors="replace").split()
    if len(parts) == 3 and parts[0] == "convmixer-startup" and parts[1] == token and parts[2].isdigit():
        return int(parts[2])
    return None


def listen(address: str) -> socket.socket:
    """A non-blocking listener on this task's port (all interfaces), before TensorFlow binds it."""
    _, port = _split(address)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", port))
    except OSError as err:
        listener.close()
        print(f"error: multi_worker start-up: cannot listen on this task's port {port} ({err.strerror}); "
              f"another process holds it — pick other ports in the cluster spec", file=sys.stderr, flush=True)
        sys.exit(EXIT_STARTUP_FAILED)
    listener.listen(64)
    listener.setblocking(False)
    return listener


def rendezvous(names: list[str], addresses: list[str], index: int, timeout: float) -> float:
    """Wait until every task has said hello to this one and heard from it; returns the seconds left.

    Exits (one line on stderr) when the timeout passes, naming the tasks not heard from, or when a
    stop signal is pending. Signals must be blocked (`block_stop_signals`)."""
    deadline = time.monotonic() + timeout
    token = _token(addresses)
    peers = [i for i in range(len(addresses)) if i != index]
    said, heard = set(), set()
    print(f"multi_worker start-up: task {names[index]} of {len(addresses)} waiting for its peers "
          f"(--startup_timeout={timeout:g}s)", flush=True)
    listener = listen(addresses[index])
    try:
        while not (said.issuperset(peers) and heard.issuperset(peers)):
            signum = _pending_stop_signal(0)
            if signum is not None:
                _stopped_by(signum, "waiting for peers")
            for peer in peers:
                if peer not in said and hello(addresses[peer], token, index):
                    said.add(peer)
            while (sender := _read_hello(listener, token)) is not None:
                heard.add(sender)
            if time.monotonic() > deadline:
                missing = [p for p in peers if p not in heard or p not in said]
                print(f"error: multi_worker start-up: no contact within --startup_timeout={timeout:g}s "
                      f"with {describe([names[p] for p in missing], [addresses[p] for p in missing])}; "
                      f"is it running, and can this host reach that port?", file=sys.stderr, flush=True)
                sys.exit(EXIT_STARTUP_FAILED)
            signum = _pending_stop_signal(_POLL_SECONDS)
            if signum is not None:
                _stopped_by(signum, "waiting for peers")
    finally:
        listener.close()
    return max(deadline - time.monotonic(), 1.0)


@contextlib.contextmanager
def watch_creation(names: list[str], addresses: list[str], index: int, seconds: float):
    """Run the body (strategy creation) under a watchdog process that kills this worker with one
    line if the body outlasts `seconds` or a stop signal becomes pending meanwhile."""
    peers = [i for i in range(len(addresses)) if i != index]
    watchdog = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), str(os.getpid()), f"{seconds:.1f}",
         ",".join(names[p] for p in peers), ",".join(addresses[p] for p in peers)],
        stdin=subprocess.PIPE, close_fds=True)
    try:
        yield
    finally:
        try:
            watchdog.stdin.close()  # "Done": the watchdog exits.
        except OSError:
            pass
        watchdog.wait()


def after_creation(previous: dict) -> None:
    """Put Python's signal handlers back over TensorFlow's, then let pending signals in (unless
    the stop-signal thread of preemption.py takes them: then they stay blocked for it)."""
    from convmixer_dist import preemption

    if preemption.signals_managed():
        return
    for signum in STOP_SIGNALS:
        handler = previous.get(signum)
        if signum != signal.SIGINT and not callable(handler):
            handler = _preempted_before_training
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    atexit.register(_ignore_stop_signals)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _ignore_stop_signals() -> None:
    """While the interpreter shuts down (TensorFlow's teardown can take seconds), a stop signal
    would kill the worker and replace its exit code (75, 0, ...) with 143: when one worker exits,
    srun and the launchers send SIGTERM to the others, so the job's outcome would depend on which
    worker exited first. Python resets its handlers to the default during shutdown; ignore instead."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _preempted_before_training(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    """Outside the training loop's own handling, a stop signal still means "exit 75, rerun resumes"."""
    print(f"preempted: {signal.Signals(signum).name} outside the training loop; rerun the same "
          f"command to resume", file=sys.stderr, flush=True)
    sys.exit(EXIT_PREEMPTED)


def handlers() -> dict:
    """The Python-level handlers now installed for the stop signals (for `after_creation`)."""
    return {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}


# ---- the watchdog process (this file run as a script; standard library only)

def _pending_in(pid: int) -> int | None:
    """A stop signal pending in process `pid` (blocked there), from /proc; None if none."""
    mask = 0
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("ShdPnd:", "SigPnd:")):
                    mask |= int(line.split()[1], 16)
    except OSError:
        return None
    for signum in STOP_SIGNALS:
        if mask & (1 << (signum - 1)):
            return int(signum)
    return None


def _reachable(address: str) -> bool:
    try:
        with socket.create_connection(_split(address), timeout=1.0):
            return True
    except OSError:
        return False


def watchdog_main(pid: int, seconds: float, names: list[str], addresses: list[str]) -> None:
    """Until stdin closes (creation done, or the worker died): kill the worker on a pending stop
    signal or when `seconds` pass, after printing one line that says why."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    for signum in STOP_SIGNALS:  # Outlive a signal sent to the whole process tree; the worker
        signal.signal(signum, signal.SIG_IGN)  # must still be stopped.
    deadline = time.monotonic() + seconds
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], 0.2)
        if ready:
            return  # EOF: the body finished.
        signum = _pending_in(pid)
        if signum is not None:
            print(f"{'interrupted' if signum == signal.SIGINT else 'preempted'}: "
                  f"{signal.Signals(signum).name} during multi-worker start-up (creating the strategy); "
                  f"stopping this worker (nothing to save)", file=sys.stderr, flush=True)
            break
        if time.monotonic() > deadline:
            silent = [i for i, address in enumerate(addresses) if not _reachable(address)]
            who = (f"unreachable: {describe([names[i] for i in silent], [addresses[i] for i in silent])}"
                   if silent else f"peers {describe(names, addresses)} reachable but not joining")
            print(f"error: multi_worker start-up: TensorFlow did not finish creating the strategy "
                  f"within --startup_timeout ({who}); stopping this worker", file=sys.stderr, flush=True)
            break
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    _pid, _seconds, _names, _addresses = sys.argv[1:5]
    watchdog_main(int(_pid), float(_seconds), _names.split(","), _addresses.split(","))
