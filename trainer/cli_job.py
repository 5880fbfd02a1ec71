"""How the command line runs a training job: refusals as one line, Ctrl+C, nothing empty left behind.

- The lines a run prints while it checks its inputs (memory plan, model family, skipped images) are held
  back until it starts loading the model: a run refused by those checks prints its one error line alone.
- The first Ctrl+C asks the job to stop and waits while it saves; a second one quits at once with exit code
  130 (checkpoints are written atomically, so the last complete one stays intact), never an abort.
- Folders the run created are removed again when it fails before writing any file into them.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

from .files import new_folders, remove_empty_folders

# Events that only come once the run is past its early checks (the model is loading or loaded).
_PAST_CHECKS = ("progress", "cache", "checkpoint", "preview", "health")
_LOADING = "loading the model"
MAX_ITEMS = 4  # problems of a multi-line error shown on its one line


def one_line(text: str) -> str:
    """A (multi-line) error message as one line: 'head: item; item; ... (N more)'."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    head, items = lines[0], [line.removeprefix("- ") for line in lines[1:]]
    more = f"; ... ({len(items) - MAX_ITEMS} more)" if len(items) > MAX_ITEMS else ""
    return f"{head}{'' if head.endswith(':') else ':'} {'; '.join(items[:MAX_ITEMS])}{more}"


class HeldStream:
    """A text stream that keeps what is written until `release()` (then writes through) or `discard()`."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._held: list[str] | None = []
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            if self._held is not None:
                self._held.append(text)
                return len(text)
        return self.stream.write(text)

    def flush(self) -> None:
        with self._lock:
            if self._held is None:
                self.stream.flush()

    def release(self) -> None:
        """Write what was held and everything after it."""
        with self._lock:
            held, self._held = self._held, None
            if held:
                self.stream.write("".join(held))
                self.stream.flush()

    def discard(self) -> None:
        """Drop what was held (a refusal prints its own line instead)."""
        with self._lock:
            if self._held is not None:
                self._held = []

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... of the real stream
        return getattr(self.stream, name)


class _LogLines(logging.Handler):
    """The engine's warnings (e.g. a skipped image) as plain lines on the held stream."""

    def __init__(self, stream: HeldStream):
        super().__init__(logging.WARNING)
        self.held = stream

    def emit(self, record: logging.LogRecord) -> None:
        self.held.write(record.getMessage() + "\n")
        self.held.flush()


class SetupLines:
    """Holds a run's set-up lines (events and the trainer's warnings) on `stream` until the run is past its
    early checks; `finish(refused)` drops them for a refusal and prints them otherwise."""

    def __init__(self, stream: TextIO):
        self.held = HeldStream(stream)
        self._handler = _LogLines(self.held)
        self._logger = logging.getLogger(__package__ or "trainer")
        self._logger.addHandler(self._handler)

    def listener(self, event: Any) -> None:
        """Release the lines on the first event of a run past its checks (subscribe before the printers)."""
        message = str(event.data.get("message", "")) if event.kind == "log" else ""
        if event.kind in _PAST_CHECKS or message.startswith(_LOADING):
            self.held.release()

    def finish(self, refused: bool) -> None:
        self._logger.removeHandler(self._handler)
        if refused:
            self.held.discard()
        self.held.release()


def _wait(job: Any) -> None:
    while not job.wait(0.5):
        pass


def wait_for(job: Any, speak: bool = True) -> bool:
    """Wait for the job; Ctrl+C asks it to stop (it saves first), a second Ctrl+C quits at once (exit 130).
    True when it was interrupted."""
    try:
        _wait(job)
        return False
    except KeyboardInterrupt:
        pass
    # from here on a Ctrl+C, wherever it lands, quits at once (the handler needs the main thread)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: quit_now(speak)) if main else None
    try:
        if speak:
            print("\nstopping: saving a checkpoint (Ctrl+C again to quit at once; the last saved checkpoint "
                  "stays intact)", file=sys.stderr, flush=True)
        job.stop()
        _wait(job)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    return True


def quit_now(speak: bool = True) -> None:
    """Exit with 130 at once, without waiting for the job thread (no interpreter shutdown that could abort
    while it writes): temp files of a save in progress are removed by the next save."""
    if speak:
        print("\nquit without waiting for the save: the checkpoints saved before are intact",
              file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)


class NewFolders:
    """The folders a run would create for `path`; `remove_if_empty()` takes back those still without files."""

    def __init__(self, path: str | os.PathLike):
        self.folders: list[Path] = new_folders(path)

    def remove_if_empty(self) -> None:
        remove_empty_folders(self.folders)
