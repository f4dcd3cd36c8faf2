"""Helpers of the benchmarks that measure each size in a fresh process (peak RSS is per process)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys


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
