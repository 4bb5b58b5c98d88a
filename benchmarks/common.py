"""What the benchmark scripts share: engine memory sampling and writing figures to docs/."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def stack_memory(project: str) -> dict[str, int]:
    """Every running container of the stack (a deploy's -next one included): bytes used by
    the one memory formula (commands/engine.py, as `docker stats`), one read for all."""
    from aiia_ops.commands.engine import parse_ps_labels
    from aiia_ops.host.engine import Engine
    from aiia_ops.host.runners import LocalRunner

    engine = Engine(LocalRunner())
    running = {
        row["Names"]: row["ID"]
        for row in engine.containers(project)
        if row.get("State") == "running"
        and not parse_ps_labels(row.get("Labels", "")).get("org.eduaiia.one-off")
    }
    # one removed meanwhile (the old release at the end of a deploy) counts 0
    return {n: (u.memory_used or 0) if u else 0 for n, u in engine.usage(running).items()}


class PeakSampler:
    """Samples the stack's memory in the background; keeps the peak total and per container."""

    def __init__(self, project: str, every: float = 0.2):
        self.project, self.every = project, every
        self.peak_total = 0
        self.peak: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                mem = stack_memory(self.project)
            except Exception:
                mem = {}
            self.samples += 1
            self.peak_total = max(self.peak_total, sum(mem.values()))
            for name, used in mem.items():
                self.peak[name] = max(self.peak.get(name, 0), used)
            self._stop.wait(self.every)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def mb(n: int) -> str:
    return f"{n / 1024**2:.1f} MB"


def machine_note() -> str:
    load = os.getloadavg()
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, 2 vCPU machine shared with "
        f"other work, load average {load[0]:.2f}"
    )


def write_section(doc: Path, name: str, markdown: str, data: dict) -> None:
    """Replace the block between <!-- name:start --> and <!-- name:end --> in `doc`."""
    (DOCS / "benchmarks").mkdir(parents=True, exist_ok=True)
    (DOCS / "benchmarks" / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"<!-- {name}:start -->\n{markdown.strip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.S)
    text = pattern.sub(block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    doc.write_text(text.rstrip() + "\n")
