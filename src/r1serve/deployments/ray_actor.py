"""The Ray actor behind one replica: it runs on the node Ray placed it on and starts the replica's
server process there.

Standard library only, and shipped to the workers by value (``register_pickle_by_value`` in
:mod:`.ray_executor`): a node needs Ray, and r1serve only when the replica itself is ``r1serve serve``
(a ``command`` replica, e.g. vLLM on a GPU node, needs no r1serve there).

The actor is the replica's *slot*: a named, detached actor holding the replica's Ray resources. Its
process is started only when r1serve asks (:meth:`ReplicaProcess.spawn`), so r1serve's own restart
backoff and crash accounting stay the only policy. If Ray restarts the actor (its worker died,
``max_restarts``), the new actor has no process and a new generation: r1serve sees its process gone and
starts another, as for a local crash.

**Orphans.** The supervising r1serve calls the actor every few seconds (liveness polls, a heartbeat).
An actor that nobody has called for ``orphan_seconds`` (R1SERVE_DEPLOYMENT_ORPHAN_SECONDS: the r1serve
that owned it was killed and not restarted in time) ends its process and kills itself without restart,
so no detached actor holds a node's resources for good; a restarted r1serve within that time re-adopts.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

_PLACEHOLDER = re.compile(r"\{(port|host|python|model|threads)\}")
_PR_SET_PDEATHSIG = 1
_CHUNK = 65536


def _die_with_parent() -> None:  # between fork and exec: the process must not outlive its actor
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():  # in an actor: the address of its node, which the replica listens on
            util: Any = ray.util  # untyped
            return str(util.get_node_ip_address())
    except ImportError:
        pass
    return "127.0.0.1"  # outside Ray (the unit tests)


class ReplicaProcess:
    """One replica's server process on this node (a Ray actor class; see the module docstring)."""

    def __init__(
        self, argv: list[str], env: dict[str, str], workdir: str, values: dict[str, str], orphan_seconds: float = 0.0
    ) -> None:
        self.argv, self.env, self.workdir, self.values = argv, env, Path(workdir), values
        self.host = _node_ip()
        self.port = 0
        # New for each actor instance: a process reported by an earlier instance is not this one's.
        self.instance = uuid.uuid4().hex
        self.gen = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen = time.monotonic()  # the last call from r1serve
        if orphan_seconds > 0:
            threading.Thread(target=self._watch, args=(orphan_seconds,), daemon=True).start()

    def _watch(self, seconds: float) -> None:
        while time.monotonic() - self.seen <= seconds:
            time.sleep(max(0.2, min(1.0, seconds / 4)))
        self.kill()
        try:
            import ray

            # Checked first: outside Ray (the unit tests), get_runtime_context would start a local one.
            if ray.is_initialized():
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
        except ImportError:
            pass

    def ping(self) -> None:
        self.seen = time.monotonic()

    def spawn(self) -> dict[str, Any]:
        """End the current process (if any), start a fresh one on a free port; its info."""
        self.seen = time.monotonic()
        self._end(5.0)
        self.workdir.mkdir(parents=True, exist_ok=True)
        with socket.socket() as sock:
            sock.bind((self.host, 0))
            self.port = int(sock.getsockname()[1])
        values = dict(self.values, port=str(self.port), host=self.host, python=sys.executable)
        # Placeholders as templates.expand fills them locally (only these names: other braces stay).
        argv = [_PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), a) for a in self.argv]
        # This node's environment, minus any R1SERVE_* of its own, plus the replica's settings.
        env = {k: v for k, v in os.environ.items() if not k.startswith("R1SERVE_")}
        env.update(self.env)
        with open(self.workdir / "output.log", "wb") as output:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self.gen += 1
        return self.info()

    def info(self) -> dict[str, Any]:
        self.seen = time.monotonic()
        proc = self.proc
        output = self.workdir / "output.log"
        return {
            "instance": self.instance,
            "gen": self.gen,
            "host": self.host,
            "port": self.port,
            "pid": proc.pid if proc else None,
            "returncode": proc.poll() if proc else None,
            "size": output.stat().st_size if output.exists() else 0,
        }

    def read(self, instance: str, gen: int, offset: int) -> bytes:
        """Up to 64 KiB of the process's output from ``offset``; nothing once it is not that process."""
        if instance != self.instance or gen != self.gen:
            return b""
        try:
            with open(self.workdir / "output.log", "rb") as f:
                f.seek(offset)
                return f.read(_CHUNK)
        except OSError:
            return b""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def stop(self, grace: float) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; the exit code."""
        return self._end(grace)

    def _end(self, grace: float) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode
