"""benchmarks/gpu_check.sh's CPU dry run: the GPU check's own code runs in CI, minus its CUDA-only checks."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA_ONLY = {"seed-nondeterministic", "resume-cuda-on-cpu", "fp16-evaluate-on-cpu", "fsdp-offload", "compile"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run benchmarks/gpu_check.sh itself")
def test_the_gpu_checks_dry_run_passes_on_the_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINKIT_KILL")} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-6000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {result["name"]: result["status"] for result in report["results"]}
    assert {name for name, status in statuses.items() if status == "SKIP"} == CUDA_ONLY
    assert all(status == "PASS" for name, status in statuses.items() if name not in CUDA_ONLY)
    assert len(statuses) == 21 and "CPU only" in report["machine"]
    lines = [line for line in done.stdout.splitlines() if line.startswith(("PASS", "SKIP", "FAIL"))]
    assert len(lines) == len(statuses)  # one line per check
