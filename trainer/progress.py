"""A terminal front end of the job events: a one-line progress bar with loss, it/s and ETA."""

from __future__ import annotations

import math
from typing import TextIO

from .job import JobEvent


class ProgressPrinter:
    """Listener that redraws one status line per progress event and prints log/checkpoint/preview lines."""

    def __init__(self, stream: TextIO, width: int = 30):
        self.stream, self.width = stream, width

    def __call__(self, event: JobEvent) -> None:
        d = event.data
        if event.kind == "progress":
            done = int(self.width * d["step"] / d["steps"])
            eta = "?" if math.isinf(d["eta_s"]) else f"{d['eta_s']:.0f}s"
            bar = "#" * done + "." * (self.width - done)
            self.stream.write(f"\r[{bar}] {d['step']}/{d['steps']} loss {d['loss']:.4f} "
                              f"lr {d['lr']:.2e} {d['it_s']:.1f} it/s eta {eta}   ")
            if d["step"] == d["steps"]:
                self.stream.write("\n")
        elif event.kind == "health":
            self.stream.write(f"\rturbo health {d['health']:.2f} at step {d['step']} "
                              f"({d.get('scale') or '1 = as the base'}; warning above {d['threshold']:g})\n")
        elif event.kind in ("log", "checkpoint", "preview"):
            text = d.get("message") or d.get("path")
            self.stream.write(f"\r{event.kind}: {text}\n")
        self.stream.flush()
