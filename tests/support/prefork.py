"""Launch ``python -m MODULE ARGS`` on N ranks the way ``torch.distributed.run`` does,
from a server that has already imported what every ``axolotl`` run imports.

Each rank process of ``axolotl train`` spends 7-10 s of CPU importing torch,
transformers, PEFT, DeepSpeed and Axolotl before its first step; the multi-rank tests
launch about 60 of them per test leg. The server (one per pytest process, started on
first use) imports the modules Axolotl's CLI imports on every run (``PRELOAD``), then
forks every rank of every launch from that state:

* each rank is a new process running ``runpy.run_module(MODULE, run_name="__main__")``
  with ``sys.argv``, working directory and environment of its own, plus the variables
  ``torch.distributed.run`` gives a worker (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR``/``MASTER_PORT``, ``TORCHELASTIC_*``): its own process group, plugin
  manager, model and trainer, nothing shared with other launches;
* the output of all ranks goes to one log file, unbuffered, as torchrun's does;
* when a rank fails the others are stopped and the launch fails, as with torchrun.

Nothing is imported in the server that the launched module would not import itself
(``PRELOAD`` lists Axolotl's lazily imported CLI modules, which every run loads), and
the server starts no thread, so forking it is safe. Launches that must go through the
real ``torch.distributed.run`` (the user's launcher) say so:
``tests.support.ranks.run_module(..., launcher="torchrun")``.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# What ``axolotl.cli.train`` imports lazily on every run (its ``_LAZY_IMPORTS``, the
# same in Axolotl 0.19 and 0.21), and the plugin every config here names.
PRELOAD = (
    "torch.distributed",
    "accelerate",
    "transformers.hf_argparser",
    "axolotl.cli.args",
    "axolotl.cli.config",
    "axolotl.common.datasets",
    "axolotl.utils.config",
    "axolotl.utils.trainer",
    "axolotl.train",
    "longlora_plugin",
)
GRACE_S = 10.0  # after a failed rank, the others get SIGTERM, then SIGKILL after this


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a launch's ``MASTER_PORT``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_env(rank: int, ranks: int, port: int) -> dict[str, str]:
    """The variables ``torch.distributed.run --nproc_per_node ranks`` gives worker
    ``rank`` on one node (``TORCHELASTIC_USE_AGENT_STORE=False``: rank 0 hosts the
    store, there being no agent)."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "GROUP_RANK": "0",
        "ROLE_RANK": str(rank),
        "ROLE_NAME": "default",
        "WORLD_SIZE": str(ranks),
        "LOCAL_WORLD_SIZE": str(ranks),
        "GROUP_WORLD_SIZE": "1",
        "ROLE_WORLD_SIZE": str(ranks),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
        "TORCHELASTIC_RUN_ID": "none",
        "TORCHELASTIC_USE_AGENT_STORE": "False",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    }


# ---------------------------------------------------------------------- server side
def _run_rank(request: dict[str, Any], rank: int, port: int, log_fd: int) -> None:
    """In the forked child: become rank ``rank`` of the launch and exit with its code."""
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        env = dict(request["env"])
        if request["ranks"] > 1:
            env.update(torchrun_env(rank, request["ranks"], port))
        os.environ.clear()
        os.environ.update(env)
        os.chdir(request["cwd"])
        sys.path[0] = request["cwd"]  # as `python -m` run there, with its PYTHONPATH
        extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[1:1] = [p for p in extra if p not in sys.path]
        sys.stdout.reconfigure(line_buffering=True, write_through=True)  # torchrun's -u
        sys.stderr.reconfigure(line_buffering=True, write_through=True)
        sys.argv = [request["module"], *request["args"]]
        import runpy

        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        if stop.code is None:
            code = 0
        elif isinstance(stop.code, int):
            code = stop.code
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class Launches:
    """The launches in flight: their rank processes, and the exit status of each launch
    once its ranks are done. A failed rank stops its launch's other ranks at once (as
    torchrun does), whichever launch is being waited for."""

    def __init__(self, closing: list[Any]) -> None:
        self.closing = closing  # the server's sockets, closed in every child
        self.ranks: dict[int, int] = {}  # pid -> launch id
        self.running: dict[int, set[int]] = {}  # launch id -> its live pids
        self.returncode: dict[int, int] = {}  # launch id -> first failed rank's code, or 0
        self.deadline: dict[int, float] = {}

    def start(self, request: dict[str, Any]) -> int:
        """Fork the ranks of ``request``; returns the launch id."""
        launch = len(self.deadline)
        port = free_port()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        log_fd = os.open(request["log"], flags, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        self.running[launch] = set()
        for rank in range(request["ranks"]):
            pid = os.fork()
            if pid == 0:
                for item in self.closing:
                    item.close()
                _run_rank(request, rank, port, log_fd)
            self.ranks[pid] = launch
            self.running[launch].add(pid)
        os.close(log_fd)
        self.returncode[launch] = 0
        self.deadline[launch] = time.monotonic() + request["timeout"]
        return launch

    def _reaped(self, pid: int, status: int) -> None:
        launch = self.ranks.pop(pid)
        self.running[launch].discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and self.returncode[launch] == 0:
            self.returncode[launch] = code if code > 0 else 1
            self._signal(launch, signal.SIGTERM)
            self.deadline[launch] = min(self.deadline[launch], time.monotonic() + GRACE_S)

    def _signal(self, launch: int, sig: int) -> None:
        for pid in self.running[launch]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def wait(self, launch: int) -> dict[str, Any]:
        """``{"returncode": ...}`` of ``launch`` once its ranks are done, as torchrun
        would exit (``"timed_out": True`` past its timeout: its ranks are killed)."""
        timed_out = False
        while self.running[launch]:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid:
                self._reaped(pid, status)
                continue
            if time.monotonic() > self.deadline[launch]:
                timed_out = timed_out or self.returncode[launch] == 0
                self._signal(launch, signal.SIGKILL)
                for pid in list(self.running[launch]):
                    self._reaped(*os.waitpid(pid, 0))
                break
            time.sleep(0.05)
        done = {"returncode": self.returncode[launch]}
        if timed_out:
            done.update(returncode=-signal.SIGKILL, timed_out=True)
        return done

    def kill(self, launch: int) -> dict[str, Any]:
        """Kill ``launch``'s ranks (a test that gave up on it); its exit status."""
        self.deadline[launch] = 0.0
        return self.wait(launch)

    def stop_all(self) -> None:
        for launch in self.running:
            self._signal(launch, signal.SIGKILL)
        for pid in list(self.ranks):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def serve(address: str) -> None:
    """Import ``PRELOAD``, then answer requests on the Unix socket ``address`` until the
    client disconnects: ``{"op": "start", ...}`` forks a launch and answers its id,
    ``{"op": "wait", "launch": id}`` answers its exit status once it is done."""
    for name in PRELOAD:
        importlib.import_module(name)
    threads = [t.name for t in threading.enumerate()]
    assert threads == ["MainThread"], f"threads before fork: {threads}"
    with Listener(address, family="AF_UNIX") as listener:
        conn = listener.accept()
        launches = Launches([conn, listener])
        try:
            while True:
                try:
                    request = conn.recv()
                except EOFError:
                    return
                if request["op"] == "start":
                    conn.send(launches.start(request))
                elif request["op"] == "kill":
                    conn.send(launches.kill(request["launch"]))
                else:
                    conn.send(launches.wait(request["launch"]))
        finally:
            launches.stop_all()


# ---------------------------------------------------------------------- client side
class Server:
    """The server process of this pytest process, started on first use."""

    _current: Server | None = None

    def __init__(self, env: dict[str, str]) -> None:
        env = dict(env)  # the server's imports see the repository, as the tests do
        path = [str(REPO), *env.get("PYTHONPATH", "").split(os.pathsep)]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in path if p))
        folder = Path(tempfile.mkdtemp(prefix="longlora-prefork-"))
        self.address = str(folder / "socket")
        self.log = folder / "server.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.support.prefork", self.address],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 300
        while not os.path.exists(self.address):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"prefork server did not start:\n{self.log.read_text()}")
            time.sleep(0.1)
        self.conn: Connection = Client(self.address, family="AF_UNIX")
        atexit.register(self.close)

    @classmethod
    def get(cls, env: dict[str, str]) -> Server:
        if cls._current is None or cls._current.proc.poll() is not None:
            cls._current = cls(env)
        return cls._current

    def start(self, module: str, args: list[str], *, ranks: int, env: dict[str, str],
              cwd: Path, log: Path, timeout: float) -> int:  # fmt: skip
        """Fork ``python -m module args`` on ``ranks`` processes; returns the launch id
        for :meth:`wait`. Several launches may run at once."""
        request = {"op": "start", "module": module, "args": args, "ranks": ranks}
        request.update({"env": env, "cwd": str(cwd), "log": str(log), "timeout": timeout})
        self.conn.send(request)
        return self.conn.recv()

    def wait(self, launch: int) -> dict[str, Any]:
        """``{"returncode": ...}`` (and ``"timed_out": True`` past the timeout)."""
        self.conn.send({"op": "wait", "launch": launch})
        return self.conn.recv()

    def kill(self, launch: int) -> dict[str, Any]:
        self.conn.send({"op": "kill", "launch": launch})
        return self.conn.recv()

    def launch(self, module: str, args: list[str], **kwargs: Any) -> dict[str, Any]:
        """:meth:`start`, then :meth:`wait`."""
        return self.wait(self.start(module, args, **kwargs))

    def close(self) -> None:
        self.conn.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


if __name__ == "__main__":
    serve(sys.argv[1])
