"""What lets a replica outlive a killed r1serve, and the next r1serve take it back.

* **The lease.** The supervisor touches ``DATA_DIR/deployments/supervisor.lease`` at every tick; each
  replica it starts is told the file and ``R1SERVE_DEPLOYMENT_ORPHAN_SECONDS``, and ends itself once the
  file is that old. So a replica of an r1serve that was killed lives on for that long, long enough for
  a restarted r1serve (same data dir) to renew the lease and re-adopt it, and no longer: no orphan holds
  a port for good.
* **Output to a file, not a pipe.** A pipe's reader dies with r1serve and the replica's next write fails;
  a file outlives both. The supervisor follows the file (:func:`follow`) into the deployment's log.
* **Is it ours?** A pid stored in the database may have been reused. A process is re-adopted only if
  ``/proc`` says it runs ``r1serve serve --port PORT`` with the replica's own data dir, and it is alive
  (not a zombie); then its ``/health`` must answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger("r1serve.deployments")

LEASE_FILE = "supervisor.lease"
_CHUNK = 65536


def renew(path: Path) -> None:
    """Touch the lease (creating it): every replica of this data dir sees its supervisor is alive."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


async def watch_lease(path: Path, seconds: float, on_expired: Callable[[], None]) -> None:
    """Call ``on_expired`` once the lease has not been renewed for ``seconds`` (a replica's side)."""
    started = time.time()
    while True:
        await asyncio.sleep(max(0.2, min(1.0, seconds / 4)))
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            age = time.time() - started  # never written yet, or removed: count from our own start
        if age > seconds:
            log.warning("the supervising r1serve has not renewed %s for %.0fs: shutting down", path, age)
            on_expired()
            return


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command name in parentheses, which may itself contain spaces and ')'.
    state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else "?"
    return state not in ("Z", "X")


def is_ours(pid: int, port: int, data_dir: Path) -> bool:
    """``pid`` runs ``r1serve serve`` on ``port`` with ``data_dir`` as its R1SERVE_DATA_DIR."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [a.decode(errors="replace") for a in argv]
    if "r1serve" not in args or "serve" not in args:
        return False
    if "--port" not in args or args[args.index("--port") + 1 : args.index("--port") + 2] != [str(port)]:
        return False
    return f"R1SERVE_DATA_DIR={data_dir}".encode() in env


async def wait_gone(pid: int, interval: float = 0.25) -> None:
    while alive(pid):
        await asyncio.sleep(interval)


def follow(path: Path, offset: int, done: Awaitable[object]) -> asyncio.StreamReader:
    """A stream of what is appended to ``path`` after ``offset``, ending (EOF) once ``done`` has
    completed and the file's last bytes are read."""
    reader = asyncio.StreamReader(limit=2**24)
    finished = asyncio.ensure_future(done)

    async def run() -> None:
        position = offset
        try:
            with open(path, "rb") as f:
                while True:
                    f.seek(position)
                    chunk = f.read(_CHUNK)
                    if chunk:
                        position += len(chunk)
                        reader.feed_data(chunk)
                        continue
                    if finished.done():
                        break
                    await asyncio.sleep(0.1)
        except OSError as exc:
            log.warning("following %s failed: %s", path, exc)
        finally:
            reader.feed_eof()

    task = asyncio.get_running_loop().create_task(run(), name=f"follow:{path.name}")
    _followers.add(task)
    task.add_done_callback(_followers.discard)
    return reader


_followers: set[asyncio.Task[None]] = set()
