"""Helpers of the benchmarks that run work in fresh processes: one size each (peak RSS is per process), or a
logged `prerank` command."""

from __future__ import annotations

import json
import os
import resource
import shlex
import subprocess
import sys
from pathlib import Path

from prerank.io import atomic_write_text


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def run_child(script: str, args: list[str]) -> dict:
    """Run ``script`` with ``args`` in a fresh interpreter; its last stdout line is a JSON report."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def flags(options: list[str]) -> list[str]:
    """``["--epochs=10", "--x"]`` -> ``["--epochs", "10", "--x"]``: command options given as one word each."""
    return [a for o in options for a in (o.split("=", 1) if "=" in o else [o])]


class Runner:
    """Runs ``prerank`` commands in a fresh interpreter, each logged to ``WORK/commands.txt``; ``dry_run``: print."""

    def __init__(self, work: Path, dry_run: bool):
        self.work, self.dry_run = work, dry_run
        self.log = work / "commands.txt"

    def __call__(self, *args: str, stdout: Path | None = None) -> None:
        cmd = ["prerank", *args]
        line = shlex.join(cmd) + (f" > {stdout}" if stdout else "")
        print(line, flush=True)
        if self.dry_run:
            return
        with self.log.open("a") as f:
            f.write(line + "\n")
        exe = [sys.executable, "-m", "prerank", *args]
        if stdout is None:
            subprocess.run(exe, check=True)
        else:
            out = subprocess.run(exe, check=True, capture_output=True, text=True).stdout
            atomic_write_text(stdout, out)
