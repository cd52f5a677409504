"""The newcomer's commands (demo, explore, evaluate) timed against an older commit, in the same run.

Wall times on the shared 2 cores move with what else runs (3-10x the idle figures under a load average of
8), so a figure alone says little: this runs each command from this checkout and from ``--against REV``
(its library extracted with ``git archive``), alternating, in fresh processes on the NLST-Sybil reference
imported from ``../shared/data/nlst-sybil-embeddings``, and prints wall and CPU seconds (user + system of
the command and its workers) with the load average before each run. A regression shows as a CPU ratio
well above 1 in every round; the load moves the wall times of both alike.

    python benchmarks/commands.py --against e40fc01 --rounds 2
    python benchmarks/commands.py --against HEAD~1 --commands demo explore
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NLST = ROOT.parent / "shared" / "data" / "nlst-sybil-embeddings"
COMMANDS = {
    "demo": ["demo"],  # on an empty data home: it imports NLST-Sybil itself
    "explore": ["explore", "--reference", "nlst-sybil", "--graph", "3", "--out", "{out}/map.html", "--png",
                "{out}/map.png"],
    "evaluate": ["evaluate", "--reference", "nlst-sybil", "--out", "{out}/report"],
}  # fmt: skip


def extract(revision: str, folder: Path) -> Path:
    """The library of ``revision`` under ``folder`` (``git archive``: no worktree left behind)."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "source.tar"
    with open(archive, "wb") as stream:
        subprocess.run(["git", "archive", revision, "SimilarPatients"], cwd=ROOT, stdout=stream, check=True)
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(archive) as tar:
        tar.extractall(folder, **safe)
    return folder / "SimilarPatients"


def timed(library: Path, home: Path, argv: list[str], out: Path) -> tuple[float, float]:
    """Wall and CPU seconds of ``similar-patients ARGV`` run with ``library`` in a child process."""
    environment = {**os.environ, "PYTHONPATH": str(library), "SIMILARPATIENTS_HOME": str(home)}
    environment["SIMILARPATIENTS_NLST_SYBIL_DIR"] = str(NLST)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    command = [sys.executable, "-m", "SimilarPatientsLib", *(a.format(out=out) for a in argv)]
    subprocess.run(command, env=environment, check=True, capture_output=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, metavar="REV", help="the older commit to compare with")
    parser.add_argument("--commands", nargs="+", choices=list(COMMANDS), default=list(COMMANDS))
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        libraries = {"this checkout": ROOT / "SimilarPatients", args.against: extract(args.against, scratch / "old")}
        homes = {}
        for name, library in libraries.items():  # a reference for explore and evaluate, imported untimed
            homes[name] = scratch / f"home-{len(homes)}"
            timed(library, homes[name], ["references", "import", "nlst-sybil", "--source", str(NLST)], scratch)
        print(f"commands, NLST-Sybil, {os.cpu_count()} CPUs; this checkout vs {args.against}, alternating")
        print(f"{'command':<9} {'round':>5} {'library':<14} {'load':>5} {'wall s':>8} {'CPU s':>8} {'CPU ratio':>9}")
        for command in args.commands:
            for round_ in range(1, args.rounds + 1):
                cpu = {}
                for name, library in libraries.items():
                    home = scratch / "empty-home" if command == "demo" else homes[name]
                    load = os.getloadavg()[0]
                    wall, cpu[name] = timed(library, home, COMMANDS[command], scratch)
                    if command == "demo":
                        subprocess.run(["rm", "-rf", str(home)], check=True)
                    ratio = cpu[name] / cpu["this checkout"]
                    print(f"{command:<9} {round_:>5} {name:<14} {load:5.1f} {wall:8.1f} {cpu[name]:8.1f} {ratio:9.2f}")


if __name__ == "__main__":
    main()
