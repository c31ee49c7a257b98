"""Peak memory of reading and encoding a text file (trainkit.recipes.text.data.load_text), above the
baseline after importing torch; run it under `ulimit -v` (docs/benchmarks.md, "Reliability, round three").

    python benchmarks/text_load_memory.py TEXT_FILE [char|byte|bpe]
"""

from __future__ import annotations

import os
import resource
import sys
import time

import torch  # noqa: F401 - the baseline includes torch, as a run's does

from trainkit.recipes.text.data import load_text


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    path, tokenizer = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "char")
    base = peak_mib()
    start = time.perf_counter()
    data = load_text(path, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    size = os.path.getsize(path) / 2**20
    held = (data.train.numel() + data.val.numel()) * data.train.element_size() / 2**20
    above = peak_mib() - base
    print(f"{tokenizer}: file {size:.1f} MiB, ids {held:.1f} MiB, peak above baseline {above:.0f} MiB "
          f"({above / size:.1f}x the file), {seconds:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
