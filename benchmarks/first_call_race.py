"""Does a process's first multi-threaded elementwise op compute what every later one does?

    python benchmarks/first_call_race.py [--processes 120] [--parallel 6] [--out benchmarks/results/first_call_race.json]

Intel MKL's vector math (VML), which ATen uses for sqrt, exp, log, tanh... of float tensors,
initialises itself at its first call in a process. Each fresh process below runs a training step's
matmuls on two threads (as trainkit's recipes do), then the same ``sqrt`` and ``exp`` of a
200,704-element tensor twice, and reports whether the first result equals the second, bit for bit.
``--parallel`` processes run at once on this machine, so they compete for its cores as runs on a
shared machine do. Two settings alternate:

- ``trainkit``: the process imports ``trainkit.devices`` first (``settle_cpu_vector_math``);
- ``bare``: it imports torch alone.

A process whose first ``sqrt`` differed trains other weights from the same seed (AdamW takes the
square root of its second moment at every step): docs/reliability.md, "Determinism on a CPU".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRST_CALLS = """
import sys
import torch
if sys.argv[1] == "trainkit":
    import trainkit.devices  # what every trainkit entry point imports before its first op
torch.set_num_threads(2)
generator = torch.Generator().manual_seed(0)
x = torch.randn(64, 784, generator=generator)
w = torch.randn(256, 784, generator=generator, requires_grad=True)
(x @ w.t()).relu().sum().backward()  # a training step's matmuls: MKL's and OpenMP's threads start
v = torch.rand(256, 784, generator=generator)
differ = [name for name, op in (("sqrt", torch.sqrt), ("exp", torch.exp)) if not torch.equal(op(v), op(v))]
print(",".join(differ) or "same")
"""
SETTINGS = ("trainkit", "bare")


def first_calls_differ(setting: str) -> list[str]:
    """The ops whose first result differed from their second in one fresh process."""
    done = subprocess.run([sys.executable, "-c", FIRST_CALLS, setting], capture_output=True, text=True,
                          check=True, cwd=ROOT)  # fmt: skip
    answer = done.stdout.strip()
    return [] if answer == "same" else answer.split(",")


def launch(settings: list[str], parallel: int) -> list[list[str]]:
    """One fresh process per entry of ``settings``, ``parallel`` at a time, in order."""
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(first_calls_differ, settings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=120, help="fresh processes per setting")
    parser.add_argument("--parallel", type=int, default=6, help="processes running at once")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "first_call_race.json"))
    args = parser.parse_args()
    order = [setting for _ in range(args.processes) for setting in SETTINGS]  # alternating: the same load for both
    started = time.perf_counter()
    differed = launch(order, args.parallel)
    report = {
        "command": " ".join(["python", "benchmarks/first_call_race.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "torch": __import__("torch").__version__,
        "parallel": args.parallel,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "settings": {
            setting: {
                "processes": args.processes,
                "first_call_differed": {op: sum(op in ops for s, ops in zip(order, differed) if s == setting)
                                        for op in ("sqrt", "exp")},  # fmt: skip
            }
            for setting in SETTINGS
        },
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for setting, entry in report["settings"].items():
        print(f"{setting:9s} of {entry['processes']} processes, first call differed: {entry['first_call_differed']}")


if __name__ == "__main__":
    main()
