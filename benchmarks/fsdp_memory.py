"""--strategy fsdp vs ddp on this machine: what each process holds, and the time of a step.

    python benchmarks/fsdp_memory.py [--width 2048] [--depth 4] [--steps 40] [--repeats 3] [--processes 2]

Each run is `torchrun --nproc_per_node P` of this file's worker: trainkit's Trainer on an MLP
of ``depth`` hidden layers of ``width`` units (784 inputs, 10 classes, AdamW) for ``steps``
optimizer steps of a global batch of 64 random images. FSDP and DDP runs alternate,
``repeats`` times each, on the same machine (one thread per process); a third variant runs FSDP
with glibc's dynamic mmap threshold (what trainkit.distributed.fsdp.keep_large_allocations_out_of_the_heap
turns off on CPU) to show why it is off.

Per process, after the last step:
* the bytes of the parameters, gradients and optimizer state it holds (exact: the local shards
  of DTensors under FSDP, whole tensors under DDP): the goal is FSDP close to 1/P of DDP;
* its peak resident memory (``ru_maxrss``) and its growth from the moment before the model
  was built (what training added; allocator caching and the DDP buckets show here).
Step time: the median wall time between consecutive optimizer steps after the first 5.
Results: benchmarks/results/fsdp_memory.json and docs/scaling.md ("FSDP").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP_STEPS = 5
BATCH = 64
GLIBC_DEFAULT = "fsdp-glibc-default"  # FSDP with glibc's dynamic mmap threshold left alone


def tensor_bytes(tensors) -> int:
    from trainkit.distributed.fsdp import local_value

    return sum(local_value(t).numel() * local_value(t).element_size() for t in tensors if t is not None)


def worker(variant: str, width: int, depth: int, steps: int, out: str) -> None:
    import torch
    from torch import nn

    import trainkit.distributed.fsdp
    from trainkit import distributed
    from trainkit.loop.callbacks import Callback
    from trainkit.config.schema import TrainConfig
    from trainkit.data.device import DeviceBatches
    from trainkit.loop.trainer import Trainer

    class StepClock(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_batch_end(self, state, loss) -> None:
            self.times.append(time.perf_counter())

    strategy = variant.split("-")[0]
    if variant == GLIBC_DEFAULT:  # what trainkit.distributed.fsdp's fixed mmap threshold avoids: measured, not used
        trainkit.distributed.fsdp.keep_large_allocations_out_of_the_heap = lambda: None
    with distributed.process_group(torch.device("cpu")):
        rank, world = distributed.rank(), distributed.world_size()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Flatten()]
        for inputs in [784] + [width] * (depth - 1):
            layers += [nn.Linear(inputs, width), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Linear(width, 10))
        config = TrainConfig(strategy=strategy, batch_size=BATCH, max_steps=steps, device="cpu", patience=0,
                             lr=1e-3, schedule="constant")  # fmt: skip
        clock = StepClock()
        trainer = Trainer(model, config, callbacks=[clock])
        generator = torch.Generator().manual_seed(1)
        images, labels = torch.randn(BATCH * steps, 1, 28, 28, generator=generator), torch.randint(0, 10, (BATCH * steps,))
        trainer.fit(DeviceBatches(images, labels, BATCH, seed=0, rank=rank, world_size=world))
        params = list(trainer.model.parameters())
        optimizer_state = [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        gaps = [b - a for a, b in zip(clock.times[WARMUP_STEPS:], clock.times[WARMUP_STEPS + 1 :])]
        mine = {
            "rank": rank,
            "parameters_bytes": tensor_bytes(params),
            "gradients_bytes": tensor_bytes(p.grad for p in params),
            "optimizer_state_bytes": tensor_bytes(optimizer_state),
            "peak_rss_bytes": peak,
            "rss_growth_bytes": peak - before,
            "step_seconds": statistics.median(gaps),
        }
        everyone = distributed.gather_objects(mine)
        if rank == 0:
            Path(out).write_text(json.dumps(everyone))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(variant: str, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "ranks.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
                   "--master-port", str(free_port()), __file__, "--worker", variant, str(args.width),
                   str(args.depth), str(args.steps), str(out)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            sys.exit(f"{variant} run failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def summarise(runs: dict[str, list[list[dict]]]) -> dict:
    """Per variant: the median over repeats of the largest value over ranks, for each measure."""
    measures = ("parameters_bytes", "gradients_bytes", "optimizer_state_bytes", "peak_rss_bytes",
                "rss_growth_bytes", "step_seconds")  # fmt: skip
    table = {variant: {m: statistics.median(max(rank[m] for rank in ranks) for ranks in repeats) for m in measures}
             for variant, repeats in runs.items()}  # fmt: skip
    for row in table.values():
        row["state_bytes"] = row["parameters_bytes"] + row["gradients_bytes"] + row["optimizer_state_bytes"]
    ratios = {variant: {m: table[variant][m] / table["ddp"][m] for m in (*measures, "state_bytes")}
              for variant in table if variant != "ddp"}  # fmt: skip
    return {"per_process": table, "over_ddp": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "fsdp_memory.json"))
    args = parser.parse_args()
    runs: dict[str, list[list[dict]]] = {"ddp": [], "fsdp": [], GLIBC_DEFAULT: []}
    for _ in range(args.repeats):
        for variant in runs:  # alternated: all see the same machine state
            runs[variant].append(launch(variant, args))
    result = {"settings": vars(args), "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores",
              **summarise(runs), "runs": runs}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("per_process", "over_ddp")}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        main()
