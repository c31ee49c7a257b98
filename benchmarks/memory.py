"""Memory and step time with and without gradient checkpointing, on CPU.

Memory is read from the profiler's CPU allocation events (trainkit.loop.memory.live_bytes): the
bytes of tensors allocated above the level before the measured code, event by event. It
counts exactly what checkpointing changes (activations kept for backward) and nothing that
it does not (torch's libraries, glibc's caches), unlike peak RSS. Three figures per case:

- activations kept: bytes still allocated when the forward pass ends (saved for backward + logits);
- forward+backward peak: activations plus the gradients as they are created;
- step peak: the whole step with AdamW (its state already exists: a steady-state step).

Step time: median wall time of a plain training step (forward, backward, AdamW), no profiler.

    .venv/bin/python benchmarks/memory.py            # prints a markdown table
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from trainkit.loop.memory import MiB, live_bytes, measure_step_memory, training_step
from trainkit.nn.models import cnn, enable_grad_checkpointing, mlp

CASES = {
    "cnn": ("CNN 32-64-128 (MNIST recipe)", 256, lambda: cnn()),
    "deep_mlp": ("MLP 8 x 1024, BatchNorm", 1024, lambda: mlp(784, (1024,) * 8)),
}


def activations_kept(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes still allocated after the forward pass (and the loss), before backward frees them."""
    kept: list[torch.Tensor] = []
    timeline = live_bytes(lambda: kept.append(nn.functional.cross_entropy(model(x), y)))
    kept.pop().backward()
    model.zero_grad(set_to_none=True)
    return timeline[-1]


def step_seconds(model: nn.Module, optimizer: torch.optim.Optimizer, x, y, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        training_step(model, optimizer, x, y)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        training_step(model, optimizer, x, y)
        times.append(time.perf_counter() - started)
    return times


def measure(case: str, checkpointing: bool, steps: int, warmup: int) -> dict[str, float]:
    _, batch, build = CASES[case]
    torch.manual_seed(0)
    model = build()
    if checkpointing:
        model = enable_grad_checkpointing(model)
    model.train()
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = step_seconds(model, optimizer, x, y, steps, warmup)  # also creates AdamW's state
    memory = measure_step_memory(model, optimizer, x, y)
    return {
        "activations": activations_kept(model, x, y) / MiB,
        "forward_backward": memory.forward_backward_peak / MiB,
        "step": memory.peak / MiB,
        "step_ms": 1000 * statistics.median(times),
        "step_ms_min": 1000 * min(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma separated: " + ", ".join(CASES))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} timed steps after {args.warmup}")
    print()
    print("| model | batch | checkpointing | activations kept (MiB) | fwd+bwd peak (MiB) | step peak (MiB) "
          "| step time median (min), ms |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for case in args.cases.split(","):
        label, batch, _ = CASES[case]
        rows = {flag: measure(case, flag, args.steps, args.warmup) for flag in (False, True)}
        for flag, row in rows.items():
            print(f"| {label} | {batch} | {'on' if flag else 'off'} | {row['activations']:.1f} | "
                  f"{row['forward_backward']:.1f} | {row['step']:.1f} | "
                  f"{row['step_ms']:.0f} ({row['step_ms_min']:.0f}) |")  # fmt: skip
        off, on = rows[False], rows[True]
        print(f"| {label}: on / off | | | {on['activations'] / off['activations']:.2f}x | "
              f"{on['forward_backward'] / off['forward_backward']:.2f}x | {on['step'] / off['step']:.2f}x | "
              f"{on['step_ms'] / off['step_ms']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
