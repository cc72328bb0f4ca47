"""The zygote: one process that imports torch, transformers and the optimizer packages once, then forks
every measured run of a sweep from there.

A fresh ``python -m optimem.harness.worker`` spends seconds importing before it trains for a few; a sweep of
hundreds of runs would spend most of its time importing. A run forked from the zygote starts with all of
that already imported, and is still a process of its own: it runs in its own session (a timeout or an
interrupt kills it and everything it started, a crash or an out-of-memory kill takes only it down), its
output goes to its own log, and it dies with its parent. Exactly what ``python -m optimem.harness.worker`` would
do then happens in it (:func:`optimem.harness.worker.main`).

CUDA is never initialised in the zygote (a CUDA context does not survive ``fork``): after each preloaded
module it checks ``torch.cuda.is_initialized()``. A module that initialised CUDA on import
(bitsandbytes asks for the device's compute capability, for one) makes the zygote exit naming it; the
launcher starts a new zygote without it (the run imports it itself) and remembers that in the optimem
cache (:mod:`optimem.estimators.cache`, namespace ``zygote``), so the next sweep on this machine does not try again.

Two halves live here: :func:`serve` runs in the zygote (``python -m optimem.harness.zygote``), :class:`Zygote` is the
launcher's handle on it, whose :meth:`Zygote.spawn` returns a :class:`ForkedRun` (the part of
``subprocess.Popen`` the launcher uses). They talk in JSON lines over the zygote's stdin and stdout:

- zygote -> launcher: ``{"event": "ready", "pid", "preloaded", "env", "seconds"}`` once, or ``{"event":
  "poisoned", "module"}`` / ``{"event": "failed", "error"}`` before exiting; then ``{"event": "forked",
  "id", "pid"}`` per request and ``{"event": "exit", "pid", "code"}`` when a run ends (``code`` as
  ``Popen.returncode``: negative for a signal).
- launcher -> zygote: ``{"op": "fork", "id", "argv", "log", "cwd", "env"}``. End of input (the launcher
  closed the pipe, or died) makes the zygote kill the runs still going and exit.
"""
from __future__ import annotations

import ctypes
import importlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from optimem.estimators import REGISTRY, cache
from optimem.estimators.catalog import catalog, resolve
from optimem.harness.contract import FAULT_ENV, RUN_DIR_ENV
from optimem.harness.env_facts import package_versions
from optimem.harness.process import quiet_libraries

RUNTIME_ENV = frozenset({FAULT_ENV, RUN_DIR_ENV})
"""Environment variables read only while a run runs, never at import: a run whose environment differs from
the zygote's in these alone is still forked from it (the child gets the run's environment in full). The
zygote's environment is the one it started with, or the one its imports left (importing transformers sets
``TORCHINDUCTOR_CACHE_DIR``, so a launcher that imported it too passes that on to its runs)."""
START_TIMEOUT_S = 600.0
MAX_RESTARTS = 4
ZYGOTE_CACHE_VERSION = 1


# ================================================================================== in the zygote
def preload_modules() -> list[str]:
    """What the zygote imports, in order: torch; transformers, its Trainer and accelerate; the worker and its
    trackers; the model classes of the catalog's configs; every installed optimizer's module (from the
    registry: the module of each spec's class). ``pkg:Name`` means ``getattr(import(pkg), Name)`` (transformers'
    lazily imported model classes)."""
    mods = ["torch", "transformers", "transformers.trainer", "accelerate", "optimem.harness.worker", "optimem.harness.scenario",
            "optimem.harness.state_walker", "optimem.harness.trackers.phases", "optimem.harness.trackers.rss", "optimem.harness.trackers.cuda",
            "optimem.harness.trackers.tensor_accounting", "optimem.harness.trackers.throughput", "optimem.harness.trackers.nvml"]
    for name in catalog():
        for arch in resolve(name).load().get("architectures") or []:
            if f"transformers:{arch}" not in mods:
                mods.append(f"transformers:{arch}")
    for spec in REGISTRY.values():
        module = spec.cls.rsplit(".", 1)[0]
        if spec.availability == "ok" and module not in mods and spec.installed():
            mods.append(module)
    return mods


def _import(name: str) -> None:
    if ":" in name:
        module, attr = name.split(":", 1)
        getattr(importlib.import_module(module), attr)
    else:
        importlib.import_module(name)


def _cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and hasattr(torch, "cuda") and torch.cuda.is_initialized())


def _send(out, event: dict) -> None:
    out.write((json.dumps(event) + "\n").encode())
    out.flush()


def _child(req: dict, ready_w: int, close_fds: list[int], zygote_pid: int) -> None:
    """In the forked run: its own session, dies with the zygote, the run's stdio, cwd and environment, then
    ``optimem.harness.worker.main``. Never returns."""
    code = 1
    try:
        os.setsid()
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the zygote
        except Exception:  # noqa: BLE001 - not Linux: the worker's parent watch still runs
            pass
        if os.getppid() != zygote_pid:
            os._exit(3)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.write(ready_w, b"1")
        for fd in [ready_w, *close_fds]:
            try:
                os.close(fd)
            except OSError:
                pass
        null = os.open(os.devnull, os.O_RDONLY)
        log = os.open(req["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        sys.argv = ["optimem.harness.worker", *req["argv"]]
        from optimem.harness import worker  # lazy: torch; the launcher imports this module too

        code = worker.main(list(req["argv"]), parent_pid=zygote_pid) or 0  # os._exit()s once the result is written
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - as an uncaught exception in python -m optimem.harness.worker
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def serve() -> int:
    """``python -m optimem.harness.zygote``: preload, report, then fork runs on request (see the module doc)."""
    control = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # whatever the imports print goes to the zygote's log, not into the protocol
    requests = os.fdopen(os.dup(0), "rb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launcher, which ends the sweep
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    exclude = set(filter(None, os.environ.pop("OPTIMEM_ZYGOTE_EXCLUDE", "").split(",")))
    t0 = time.perf_counter()
    done = []
    try:
        quiet_libraries()
        for name in preload_modules():
            if name in exclude:
                continue
            try:
                _import(name)
            except Exception as exc:  # noqa: BLE001 - a broken optional package: the run reports it
                print(f"zygote: could not preload {name}: {exc}", file=sys.stderr)
                continue
            if _cuda_initialized():
                _send(control, {"event": "poisoned", "module": name})
                return 4
            done.append(name)
    except Exception as exc:  # noqa: BLE001
        _send(control, {"event": "failed", "error": f"{type(exc).__name__}: {exc}"})
        return 5
    if threading.active_count() > 1:
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.main_thread())
        _send(control, {"event": "failed", "error": f"preloading started threads ({names}): cannot fork safely"})
        return 5
    _send(control, {"event": "ready", "pid": os.getpid(), "preloaded": done, "env": dict(os.environ),
                    "seconds": round(time.perf_counter() - t0, 3)})

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(requests, selectors.EVENT_READ, "requests")
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    children: set[int] = set()
    buf = b""
    me = os.getpid()

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)
            _send(control, {"event": "exit", "pid": pid, "code": os.waitstatus_to_exitcode(status)})

    while True:
        for key, _ in sel.select(timeout=1.0):
            if key.data == "wake":
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
                continue
            chunk = requests.read(65536)
            if not chunk:  # the launcher is gone or done: so are its runs
                for pid in children:
                    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                        try:
                            target()
                            break
                        except OSError:
                            continue
                return 0
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    req = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if _cuda_initialized():
                    _send(control, {"event": "forked", "id": req["id"], "pid": None,
                                    "error": "CUDA was initialised in the zygote"})
                    continue
                ready_r, ready_w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(ready_r)
                    _child(req, ready_w, [requests.fileno(), control.fileno(), wake_r, wake_w, sel.fileno()], me)
                os.close(ready_w)
                os.read(ready_r, 1)  # the child is a session leader now: killpg(pid) reaches it
                os.close(ready_r)
                children.add(pid)
                _send(control, {"event": "forked", "id": req["id"], "pid": pid})
        reap()


# ================================================================================ in the launcher
class ForkedRun:
    """A run forked by the zygote: ``pid``, ``returncode``, ``poll``, ``wait``, ``send_signal``, ``terminate``
    and ``kill`` as on ``subprocess.Popen``. ``lost``: the zygote died before telling how the run ended."""

    def __init__(self, pid: int, args: list[str]):
        self.pid = pid
        self.args = args
        self.returncode: int | None = None
        self.lost = False
        self._done = threading.Event()

    def _ended(self, code: int | None, lost: bool = False) -> None:
        self.returncode, self.lost = code, lost
        self._done.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if not self._done.is_set():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _env_key(env: dict[str, str]) -> tuple:
    return tuple(sorted((k, v) for k, v in env.items() if k not in RUNTIME_ENV))


class Zygote:
    """The launcher's handle on a zygote process, started on the first :meth:`spawn` for the environment of
    that run. A run whose environment differs (beyond :data:`RUNTIME_ENV`), or any run after the zygote
    could not be started, gets None from :meth:`spawn`: the caller starts a plain subprocess instead.
    ``failure`` says why; ``preloaded`` and ``start_s`` what the zygote imported and how long it took."""

    def __init__(self, log_path: str | os.PathLike | None = None, command: list[str] | None = None):
        """``log_path``: where the zygote's own output goes (default: a temporary file, removed by
        :meth:`close`; its tail is in ``failure`` when the zygote could not start). ``command`` replaces
        ``[python, -m, optimem.harness.zygote]``: tests stand in a zygote whose imports initialise CUDA."""
        self.log_path = Path(log_path) if log_path else None
        self._own_log = False
        self.command = list(command) if command else [sys.executable, "-m", "optimem.harness.zygote"]
        self.failure: str | None = None
        self.refusal: str | None = None
        """Why the last :meth:`spawn` that returned None did (a failure, or an environment mismatch)."""
        self.preloaded: list[str] = []
        self.excluded: list[str] = []
        self.start_s: float | None = None
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._keys: set[tuple] = set()
        self._runs: dict[int, ForkedRun] = {}
        self._pending: dict[int, list] = {}
        self._next_id = 0
        self._closing = False
        self._starting: subprocess.Popen | None = None
        self._log_fh = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # ------------------------------------------------------------------------------------ starting
    def _exclusions_key(self, env: dict[str, str]):
        return cache.key("zygote", ZYGOTE_CACHE_VERSION, python=sys.version, executable=sys.executable,
                         packages=package_versions(), cuda_visible=env.get("CUDA_VISIBLE_DEVICES"),
                         nvidia=os.path.exists("/dev/nvidiactl"))

    def _start(self, env: dict[str, str], cwd: str) -> bool:
        ck = self._exclusions_key(env)
        excluded = list(cache.get(ck) or [])
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="optimem-zygote-", suffix=".log")
            os.close(fd)
            self.log_path, self._own_log = Path(name), True
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = open(self.log_path, "ab")
        for _attempt in range(MAX_RESTARTS + 1):
            zenv = {**env, "OPTIMEM_ZYGOTE_EXCLUDE": ",".join(excluded)}
            t0 = time.perf_counter()
            if self._closing:
                break
            proc = self._starting = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                     stderr=self._log_fh or subprocess.DEVNULL, env=zenv, cwd=cwd)
            first: list = []
            reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
            reader.start()
            reader.join(START_TIMEOUT_S)
            line = first[0] if first else b""
            try:
                event = json.loads(line) if line else {"event": "failed", "error": "no answer"}
            except json.JSONDecodeError:
                event = {"event": "failed", "error": f"unexpected output {line[:200]!r}"}
            self._starting = None
            if event.get("event") == "ready" and not self._closing:
                self._proc, self.preloaded, self.excluded = proc, event.get("preloaded", []), excluded
                self._keys = {_env_key(env), _env_key(event.get("env") or env)}
                self.start_s = time.perf_counter() - t0
                self._reader = threading.Thread(target=self._read_events, name="optimem-zygote", daemon=True)
                self._reader.start()
                return True
            self._stop_proc(proc)
            if self._closing:
                break
            if event.get("event") == "poisoned" and event.get("module") not in excluded:
                excluded.append(event["module"])
                cache.put(ck, excluded)
                continue
            self.failure = f"the zygote did not start ({event.get('error') or event}){self._log_tail()}"
            return False
        self.failure = "closed" if self._closing else \
            f"the zygote kept initialising CUDA (excluded {', '.join(excluded)})"
        return False

    def _log_tail(self, limit: int = 400) -> str:
        try:
            text = self.log_path.read_bytes()[-limit:].decode("utf-8", "replace").strip()
        except (OSError, AttributeError):
            return ""
        return f"; its log ends: {text}" if text else ""

    @staticmethod
    def _stop_proc(proc: subprocess.Popen) -> None:
        for closer in (proc.stdin.close, lambda: proc.wait(timeout=10)):
            try:
                closer()
            except Exception:  # noqa: BLE001
                proc.kill()

    # ------------------------------------------------------------------------------------ running
    def _read_events(self) -> None:
        proc = self._proc
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            kind = event.get("event")
            with self._lock:
                if kind == "forked":
                    slot = self._pending.pop(event["id"], None)
                    run = None
                    if event.get("pid"):
                        run = self._runs[event["pid"]] = ForkedRun(event["pid"], slot[2] if slot else [])
                    if slot is not None:
                        slot[1] = run if run is not None else event.get("error", "fork failed")
                        slot[0].set()
                elif kind == "exit":
                    run = self._runs.pop(event["pid"], None)
                    if run is not None:
                        run._ended(int(event["code"]))
        with self._lock:  # the zygote is gone: so are its runs (they die with it)
            for run in self._runs.values():
                run._ended(None, lost=True)
            self._runs.clear()
            for slot in self._pending.values():
                slot[1] = "the zygote exited"
                slot[0].set()
            self._pending.clear()
            if self.failure is None:
                self.failure = f"the zygote exited (code {proc.poll()})"

    def _ensure(self, env: dict[str, str], cwd: str) -> bool:
        """(lock held) Whether a zygote for ``env`` is running, starting it when none was started yet."""
        if self.failure is not None:
            return False
        if self._proc is None and not self._start(env, cwd):
            self.refusal = self.failure
            return False
        if _env_key(env) in self._keys:
            return True
        theirs = dict(min(self._keys, key=lambda k: len(set(k) ^ set(_env_key(env)))))
        diff = sorted(k for k in set(theirs) | set(env) if k not in RUNTIME_ENV and theirs.get(k) != env.get(k))
        self.refusal = f"the run's environment differs from the zygote's in {', '.join(diff[:5])}"
        return False

    def start(self, env: dict[str, str], cwd: str) -> bool:
        """Start the zygote for runs in ``env`` now (``bench sweep`` does so while it prepares); False when it
        cannot be (``failure`` says why)."""
        with self._lock:
            return self._ensure(env, cwd)

    def spawn(self, argv: list[str], *, log: str | os.PathLike, env: dict[str, str], cwd: str) -> ForkedRun | None:
        """Fork ``python -m optimem.harness.worker ARGV`` from the zygote (starting it first if needed); None when the
        run must start as a plain subprocess (see the class doc)."""
        with self._lock:
            if not self._ensure(env, cwd):
                return None
            rid = self._next_id = self._next_id + 1
            slot = self._pending[rid] = [threading.Event(), None, [sys.executable, "-m", "optimem.harness.worker", *argv]]
            request = {"op": "fork", "id": rid, "argv": list(argv), "log": str(log), "cwd": cwd, "env": env}
            try:
                self._proc.stdin.write((json.dumps(request) + "\n").encode())
                self._proc.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                self._pending.pop(rid, None)
                self.failure = "the zygote is gone"
                return None
        slot[0].wait(60)
        return slot[1] if isinstance(slot[1], ForkedRun) else None

    def close(self) -> None:
        """Stop the zygote (runs still going are killed with it), also while it is still starting."""
        self._closing = True
        starting = self._starting
        if starting is not None:  # importing: do not wait for it (Ctrl-C early in a sweep)
            starting.kill()
        with self._lock:
            proc, self._proc = self._proc, None
            self.failure = self.failure or "closed"
        if proc is not None:
            self._stop_proc(proc)
        if self._reader is not None:
            self._reader.join(5)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        if self._own_log and self.log_path is not None:
            try:
                self.log_path.unlink()
            except OSError:
                pass

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["ForkedRun", "RUNTIME_ENV", "Zygote", "preload_modules", "serve"]

if __name__ == "__main__":
    sys.exit(serve())
