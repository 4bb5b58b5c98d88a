"""Run the suite as two pytest processes side by side: the tests on this machine's engine and
the tests on the lab hosts' own engines (marker `lab`, tests/conftest.py). They share no
engine, no stack and no lock, so the lab's clusters (level 3, swarm, off-site backups,
Patroni) wait on their daemons while the local tests use the CPU: CI's wall time is about the
longer of the two, not their sum.

    python -m tests.split [-m EXPR] [pytest args ...]

The local process streams to stdout; the lab process writes to build/test-lab.log, which is
printed when both have ended (interleaved lines of two pytest runs cannot be read). Closing
line: `tests: N passed, N failed` over both, then the exit code of the worse of the two.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build"


def totals(junit: Path) -> dict[str, int]:
    """passed/failed/errors/skipped of one run, from its JUnit XML (absent: nothing ran)."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    if not junit.exists():
        return counts
    root = ET.parse(junit).getroot()
    for suite in root.iter("testsuite"):
        tests = int(suite.get("tests", 0))
        failed = int(suite.get("failures", 0))
        errors = int(suite.get("errors", 0))
        skipped = int(suite.get("skipped", 0))
        counts["failed"] += failed
        counts["errors"] += errors
        counts["skipped"] += skipped
        counts["passed"] += tests - failed - errors - skipped
    return counts


def main(argv: list[str]) -> int:
    marker = "not extended"
    if len(argv) >= 2 and argv[0] == "-m":
        marker, argv = argv[1], argv[2:]
    OUT.mkdir(exist_ok=True)
    local_xml, lab_xml, lab_log = (
        OUT / "junit-local.xml",
        OUT / "junit-lab.xml",
        OUT / "test-lab.log",
    )
    for path in (local_xml, lab_xml):
        path.unlink(missing_ok=True)
    pytest = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
    with lab_log.open("w") as log:
        lab = subprocess.Popen(
            [*pytest, "-m", f"({marker}) and lab", f"--junitxml={lab_xml}", *argv],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ,
        )
        try:
            local = subprocess.run(
                [*pytest, "-m", f"({marker}) and not lab", f"--junitxml={local_xml}", *argv],
                cwd=ROOT,
                env=os.environ,
            ).returncode
            lab_code = lab.wait()
        except BaseException:
            lab.terminate()
            lab.wait()
            raise
    print(f"\n{'=' * 30} the lab's tests (build/test-lab.log) {'=' * 30}", flush=True)
    print(lab_log.read_text(), flush=True)
    # pytest's 5 is "nothing collected": a selection with no lab test (or only lab tests) is
    # not a failure of the other half.
    codes = [code for code in (local, lab_code) if code != 5]
    both = {key: totals(local_xml)[key] + totals(lab_xml)[key] for key in ("passed", "failed")}
    bad = totals(local_xml)["errors"] + totals(lab_xml)["errors"]
    print(f"local exit {local}, lab exit {lab_code}; errors {bad}")
    print(f"tests: {both['passed']} passed, {both['failed'] + bad} failed")
    if not codes:
        return 5
    return max(codes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
