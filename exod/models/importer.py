"""Import a GGUF file as a model of exod's own: a supervised conversion, then registration.

The conversion (`python -m exod.models.gguf SRC DEST`, which imports numpy, gguf and tokenizers;
exod itself never does) runs under the runner shim, in a process group of its own with the
lifeline (exod/runners/shim.py): if exod dies, the group dies. exod reads its JSON progress lines,
ends the group when the converter goes quiet for EXOD_IMPORT_STALL_TIMEOUT or its tree grows past
EXOD_MAX_RUNNER_MEMORY, and when the client goes away (Ctrl-C on exoctl closes the connection,
which cancels the call). The converter writes into a work directory `HOME/models/.import-*`
beside the final one; only a finished conversion is renamed to `HOME/models/NAME` and registered
(owned: `exoctl models rm` deletes it). Whatever else happens, the work directory is removed, so
an import that fails or is cancelled leaves no directory and no registry entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import sys
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from exod.config import Settings
from exod.errors import REASONS, ExoError
from exod.eventlog import ModelView, StoreError
from exod.journal import Journal
from exod.models import MODEL_NAME_PATTERN
from exod.proto.exo.v1 import control_pb2, events_pb2
from exod.runners import process
from exod.runners.command import runner_env, shim_command
from exod.runners.supervisor import Supervisor

log = logging.getLogger(__name__)

MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
WORK_PREFIX = ".import-"
TRASH_PREFIX = ".removing-"  # `models rm` moves an owned directory here before deleting it
PROGRESS_KEYS = ("tensors_done", "tensors_total", "bytes_done", "bytes_total")
# As the supervisor samples runners: USS reads /proc/*/smaps, cheap but not free.
MEMORY_SAMPLE_PERIOD = 0.5
STDERR_TAIL_LINES = 8
# At exod's stop, how long past the kill grace to wait for imports to end and clean up.
SHUTDOWN_MARGIN_S = 5.0


@dataclass(frozen=True)
class Finished:
    """The converter's last line: the directory is complete, with this content hash."""

    content_hash: str


Line = control_pb2.ImportProgress | Finished | ExoError


def parse_line(text: str) -> Line | None:
    """One line of the converter's stdout (exod/models/gguf/__main__.py); None when it is not one
    of its JSON lines (nothing else should write there, but a wrapper might)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    if "error" in obj:
        reason = obj.get("error")
        message = str(obj.get("message") or "the conversion failed")
        return ExoError(
            reason if isinstance(reason, str) and reason in REASONS else "internal", message
        )
    if "done" in obj and isinstance(obj.get("content_hash"), str):
        return Finished(obj["content_hash"])
    counts = [obj.get(k) for k in PROGRESS_KEYS]
    ints = [c for c in counts if isinstance(c, int) and not isinstance(c, bool) and c >= 0]
    if len(ints) != len(PROGRESS_KEYS):
        return None
    return control_pb2.ImportProgress(
        tensors_done=ints[0], tensors_total=ints[1], bytes_done=ints[2], bytes_total=ints[3]
    )


def refusal(
    models: Mapping[str, ModelView],
    name: str,
    *,
    dest: Path,
    dest_exists: bool,
    force: bool,
    source: str,
) -> ExoError | None:
    """Why importing `source` as `name` into `dest` must not start (or finish), if it must not.

    A registered name is replaced only with force (a typo must not replace a model that scripts
    run by name). An existing `dest` is replaced only when it is the directory of the model being
    replaced; another name's directory never, and a stray one only with force.
    """
    old = models.get(name)
    again = f"`exoctl models add {name} {shlex.quote(source)} --force`"
    if old is not None and not force:
        return ExoError(
            "invalid_argument",
            f"the name {name!r} is already registered to {old.path}: choose another name, or "
            f"replace it with {again}",
        )
    if not dest_exists:
        return None
    holders = sorted(m.name for m in models.values() if m.path == str(dest) and m.name != name)
    if holders:
        return ExoError(
            "invalid_argument",
            f"{dest} is the directory of the registered model {holders[0]!r}: choose another name",
        )
    if old is None or old.path != str(dest):
        if force:
            return None
        return ExoError(
            "invalid_argument",
            f"{dest} exists but is no registered model: remove it, or replace it with {again}",
        )
    return None


class Importer:
    """Runs imports for the Control service; each import is one call of `run`."""

    def __init__(self, settings: Settings, journal: Journal, supervisor: Supervisor) -> None:
        self._settings = settings
        self._journal = journal
        self._supervisor = supervisor
        self._models = settings.home / "models"
        self._active: set[Path] = set()  # work directories of the imports in flight
        self._stopping = asyncio.Event()  # exod is stopping: every import ends now
        self._none_active = asyncio.Event()  # set while no import is in flight
        self._none_active.set()
        # At start nothing runs: whatever work or trash directory is there was left by a killed
        # exod.
        self._remove_strays(WORK_PREFIX, TRASH_PREFIX)

    async def run(
        self, request: control_pb2.ImportRequest
    ) -> AsyncGenerator[control_pb2.ImportReply, None]:
        """Progress replies, then `done` with the registered model; raises ExoError (or
        StoreError when the registration cannot be logged). Closing the generator early (the
        client went away) ends the conversion and removes everything it wrote."""
        name, src = _check_request(request)
        source = request.source or str(src)
        dest = self._models / name
        self._refuse(name, dest, request.force, source)
        await asyncio.to_thread(self._remove_strays, WORK_PREFIX)
        work = self._models / f"{WORK_PREFIX}{name}-{secrets.token_hex(4)}"
        # Active before it exists: another import's stray sweep must never take it for a stray.
        self._active.add(work)
        self._none_active.clear()
        try:
            try:
                await asyncio.to_thread(work.mkdir, parents=True)
            except OSError as e:
                raise _write_error(self._models, e) from None
            conversion = Conversion(self._settings, src, work / name, self._stopping)
            async with contextlib.aclosing(conversion.progress()) as progress:
                async for item in progress:
                    yield control_pb2.ImportReply(progress=item)
            info = self._register(
                request, name, work, dest=dest, digest=conversion.content_hash, source=source
            )
            log.info("imported %s from %s into %s", name, source, dest)
            yield control_pb2.ImportReply(done=info)
        except ExoError as e:
            log.warning("import of %s from %s failed (%s): %s", name, source, e.reason, e.message)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            log.info("import of %s from %s cancelled: the client went away", name, source)
            raise
        finally:
            try:
                # Shielded: a second cancellation must not leave the work directory behind.
                await asyncio.shield(asyncio.to_thread(shutil.rmtree, work, True))
            finally:
                self._active.discard(work)
                if not self._active:
                    self._none_active.set()

    async def shutdown(self) -> None:
        """End every import in flight and return once their files are gone: exod is stopping,
        and a work directory left behind would wait for the next start to be removed."""
        self._stopping.set()
        with contextlib.suppress(TimeoutError):
            limit = self._settings.kill_grace + SHUTDOWN_MARGIN_S
            await asyncio.wait_for(self._none_active.wait(), limit)

    def _refuse(self, name: str, dest: Path, force: bool, source: str) -> None:
        err = refusal(
            self._journal.state.models,
            name,
            dest=dest,
            dest_exists=os.path.lexists(dest),
            force=force,
            source=source,
        )
        if err is not None:
            raise err

    def _remove_strays(self, *prefixes: str) -> None:
        """Remove the work directories of imports that no longer run: exod was killed during
        one (the shim then ended the converter, but nobody removed its files), or during a
        `models rm` (its trash directory)."""
        if not self._models.is_dir():
            return
        for path in self._models.iterdir():
            if path.name.startswith(prefixes) and path not in self._active:
                log.info("removing %s, left by an import or a removal that did not finish", path)
                shutil.rmtree(path, ignore_errors=True)

    def _register(
        self,
        request: control_pb2.ImportRequest,
        name: str,
        work: Path,
        *,
        dest: Path,
        digest: str,
        source: str,
    ) -> control_pb2.ModelInfo:
        """Move the converted directory into place and log it, all or nothing.

        Synchronous from the checks to the append, so no other call can slip in between.
        """
        # Checked again: another call may have taken the name during the conversion.
        self._refuse(name, dest, request.force, source)
        converted = work / name
        replaced = work / ".replaced"
        try:
            if os.path.lexists(dest):
                dest.rename(replaced)
            converted.rename(dest)
        except OSError as e:
            with contextlib.suppress(OSError):
                if replaced.exists() and not os.path.lexists(dest):
                    replaced.rename(dest)
            raise _write_error(dest, e) from None
        stop = list(request.stop)
        added = events_pb2.ModelAdded(
            name=name, path=str(dest), content_hash=digest, owned=True, stop=stop
        )
        try:
            self._journal.append(events_pb2.Event(model_added=added))
        except StoreError:
            # Not registered: put everything back as it was.
            with contextlib.suppress(OSError):
                dest.rename(converted)
                if replaced.exists():
                    replaced.rename(dest)
            raise
        # A runner of the replaced directory still holds the old weights: end it now (a run on
        # it ends with 75, evicted), so that the next run loads the new ones.
        for runner in list(self._supervisor.runners.values()):
            if runner.model_path == str(dest):
                self._supervisor.stop_soon(runner, "evicted", "its model was replaced by an import")
        return control_pb2.ModelInfo(
            name=name, path=str(dest), content_hash=digest, owned=True, stop=stop
        )


class Conversion:
    """One run of the converter in its own process group, until it ends one way or another."""

    def __init__(self, settings: Settings, src: Path, dest: Path, stopping: asyncio.Event) -> None:
        self._settings = settings
        self._src = src
        self._dest = dest
        self._stopping = stopping
        self.content_hash = ""

    async def progress(self) -> AsyncGenerator[control_pb2.ImportProgress, None]:
        """The converter's progress; returns once it has finished (content_hash is set), raises
        ExoError when it failed or broke a limit. Closing it early ends the process group."""
        converter = [sys.executable, "-m", "exod.models.gguf", str(self._src), str(self._dest)]
        proc, lifeline_write = await process.spawn_group(
            lambda lifeline: shim_command(
                lifeline, os.getpid(), [*self._settings.runner_wrapper, *converter]
            ),
            what="the converter",
            env=runner_env(os.environ, self._settings.home, "import-" + secrets.token_hex(4)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        lines: asyncio.Queue[bytes] = asyncio.Queue()
        stderr: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        readers = [
            asyncio.create_task(_pump(proc.stdout, lines.put_nowait)),
            asyncio.create_task(_pump(proc.stderr, lambda b: stderr.append(_text(b)))),
        ]
        try:
            async for item in self._follow(proc, lines, stderr):
                yield item
        finally:
            # However it ended (finished, failed, a limit, the client gone), nothing of the
            # group may outlive the call. Shielded so a second cancellation cannot skip it.
            await asyncio.shield(self._end(proc, lifeline_write, readers))

    def _broken(self, quiet: float) -> ExoError | None:
        """Why the import must end now: exod is stopping, or it made no progress for too long."""
        if self._stopping.is_set():
            return ExoError(
                "daemon_stopped",
                "exod is stopping, so the import was ended and nothing was kept: import again "
                "once exod runs",
            )
        limit = self._settings.import_stall_timeout
        if quiet > limit:
            return ExoError(
                "load_stall",
                f"the import made no progress for {quiet:.0f}s (EXOD_IMPORT_STALL_TIMEOUT="
                f"{limit:g}) and was ended; nothing was kept: retry, or raise the limit for a "
                "very large model",
            )
        return None

    async def _follow(
        self, proc: asyncio.subprocess.Process, lines: asyncio.Queue[bytes], stderr: deque[str]
    ) -> AsyncGenerator[control_pb2.ImportProgress, None]:
        settings = self._settings
        last_progress = sampled = time.monotonic()
        failure: ExoError | None = None
        while True:
            try:
                raw = await asyncio.wait_for(lines.get(), MEMORY_SAMPLE_PERIOD)
            except TimeoutError:
                raw = None
            now = time.monotonic()
            if raw == b"":  # stdout closed: the converter is ending
                break
            if raw is not None:
                last_progress = now
                item = parse_line(_text(raw))
                if isinstance(item, control_pb2.ImportProgress):
                    yield item
                elif isinstance(item, Finished):
                    self.content_hash = item.content_hash
                elif isinstance(item, ExoError):
                    failure = item
            if now - sampled >= MEMORY_SAMPLE_PERIOD:
                sampled = now
                memory = await asyncio.to_thread(process.tree_memory, proc.pid)
                if memory > settings.max_runner_memory:
                    raise ExoError(
                        "memory_limit",
                        f"the import used {_size(memory)}, over the cap of "
                        f"{_size(settings.max_runner_memory)} (EXOD_MAX_RUNNER_MEMORY): raise "
                        "the cap, or import on a machine with more memory",
                    )
            broken = self._broken(now - last_progress)
            if broken is not None:
                raise broken
        status = await proc.wait()
        if failure is not None:
            raise failure
        if status != 0 or not self.content_hash:
            tail = " | ".join(line for line in stderr if line) or "no output"
            raise ExoError(
                "crashed",
                f"the converter ended with status {status} without finishing ({tail}); "
                "nothing was kept: retry, and see exod's log if it happens again",
            )

    async def _end(
        self,
        proc: asyncio.subprocess.Process,
        lifeline: int,
        readers: list[asyncio.Task[None]],
    ) -> None:
        if proc.returncode is None:
            survivors = await process.end_group(proc.pid, self._settings.kill_grace)
            if survivors:
                log.error("import converter group %d survived SIGKILL: %s", proc.pid, survivors)
        else:
            # The shim has exited; a child it left behind would still be in the group.
            await asyncio.to_thread(process.kill_group_now, proc.pid)
        await proc.wait()
        os.close(lifeline)
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


async def _pump(stream: asyncio.StreamReader | None, put: Callable[[bytes], None]) -> None:
    """Hand each line of `stream` to `put`, then b"" at its end."""
    assert stream is not None  # both pipes were asked for
    while True:
        try:
            line = await stream.readline()
        except ValueError:  # a line longer than the buffer: not one of the converter's
            continue
        put(line)
        if not line:
            return


def _check_request(request: control_pb2.ImportRequest) -> tuple[str, Path]:
    if not MODEL_NAME.fullmatch(request.name):
        raise ExoError(
            "invalid_argument",
            f"invalid model name {request.name!r}: use lowercase letters, digits, '.', '_' or "
            "'-' (up to 64, starting with a letter or digit)",
        )
    src = Path(request.path)
    if not src.is_absolute():
        raise ExoError("invalid_argument", f"GGUF path {request.path!r} must be an absolute path")
    if any(not s for s in request.stop):
        raise ExoError("invalid_argument", "a stop sequence must not be empty")
    return request.name, src


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").rstrip("\n")


def _write_error(path: Path, e: OSError) -> ExoError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ExoError("disk_full", f"no room to write {path}: free some space and import again")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ExoError(
            "permission_denied",
            f"cannot write {path} ({e.strerror}): make exod's home writable by the user it runs as",
        )
    return ExoError("internal", f"cannot write {path}: {e}")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
