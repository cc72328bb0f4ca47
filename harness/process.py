"""Process helpers shared by every launcher and the zygote: the worker's environment, a child in its own
session, waiting with a timeout (seconds), killing the whole process group, a log's tail, library quieting."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import warnings
from pathlib import Path

from optimem.harness.env_facts import REPO_ROOT


def worker_env() -> dict[str, str]:
    """The environment a worker runs in: this process's, with optimem importable and output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


QUIETED_LOGGERS = ("torchao", "torch._dynamo", "torch._inductor", "torch.utils._pytree", "transformers",
                   "bitsandbytes", "accelerate")


def quiet_libraries(*more: str) -> None:
    """Keep the libraries' warnings and log lines (torchao's missing CUDA kernels, deprecation notes) out of the
    user's screen and a run's output; ``more``: further logger names."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    for name in (*QUIETED_LOGGERS, *more):
        logging.getLogger(name).setLevel(logging.ERROR)


def spawn(argv: list[str], log, env: dict[str, str], preexec_fn=None) -> subprocess.Popen:
    """``argv`` in a session of its own, stdin closed, stdout and stderr into the open file ``log``."""
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, cwd=os.getcwd(), preexec_fn=preexec_fn)


def wait(proc, timeout_s: float, grace_s: float = 3.0) -> bool:
    """Wait for ``proc``; True when it ran past ``timeout_s`` (its group is then killed). Any exception
    (Ctrl-C) kills the group and is re-raised."""
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc, grace_s)
        return True
    except BaseException:
        kill_group(proc, grace_s)
        raise
    return False


def kill_group(proc, grace_s: float = 3.0) -> None:
    """SIGTERM then SIGKILL to the process group of ``proc`` (it and anything it started)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            if proc.poll() is not None:
                return
            try:  # not (yet) a group leader: the process alone
                os.kill(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
        try:
            proc.wait(timeout=grace_s)
            if sig == signal.SIGTERM:
                # the group may still hold children (compile workers): make sure
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            return
        except subprocess.TimeoutExpired:
            continue


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """``preexec_fn``: the child gets SIGKILL when this process dies (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except Exception:
        pass


def signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def tail(path: Path, limit: int = 3000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


def last_line(text: str) -> str:
    return next((ln.strip() for ln in reversed((text or "").strip().splitlines()) if ln.strip()), "")
