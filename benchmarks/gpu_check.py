"""One call that checks trainkit's promises on a CUDA GPU (docs/reliability.md, "On a GPU").

    bash benchmarks/gpu_check.sh                 # on a machine with a CUDA GPU: every check
    bash benchmarks/gpu_check.sh --device cpu    # the dry run: the same checks minus the CUDA-only ones

Needs no dataset (the synthetic images, and a text corpus made of the .py files torch ships)
and no install (it runs trainkit from src/); works with torch 2.11 and 2.13. Prints one line per
check: PASS/FAIL/SKIP, its name, what it must show and what it measured; the same as JSON in
OUT/gpu_check.json. Exits 1 when any check fails. Sized for under ~8 minutes on one H100.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

# Small runs: one epoch of the synthetic images is 4,000 rows; a kill lands mid-epoch 2.
IMAGE_RUN = ["--dataset", "synthetic", "--epochs", "2", "--batch-size", "64", "--patience", "0",
             "--checkpoint-every-steps", "10", "--no-plots"]  # fmt: skip
KILL_STEP = 80  # of 126 (63 a epoch): after the step-70 checkpoint, so the resume replays 10 steps
TEXT_RUN = ["--dataset", "text", "--max-steps", "60", "--batch-size", "16", "--block-size", "64", "--width", "64",
            "--layers", "2", "--heads", "2", "--checkpoint-every-steps", "20", "--val-every-steps", "30",
            "--no-plots"]  # fmt: skip
TEXT_KILL_STEP = 50


@dataclass
class Result:
    name: str
    status: str  # PASS, FAIL or SKIP
    must: str  # what the check must show
    detail: str = ""

    def line(self) -> str:
        return f"{self.status:4}  {self.name:24} {self.must}" + (f": {self.detail}" if self.detail else "")


class GpuCheck:
    def __init__(self, device: str, out: Path) -> None:
        self.device, self.out = device, out
        self.cuda = device.startswith("cuda")
        self.results: list[Result] = []
        self.corpus = out / "corpus.txt"
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                    "TRAINKIT_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip

    # ------------------------------------------------------------------ running
    def check(self, name: str, must: str, function: Callable[[], str], *, cuda_only: bool = False) -> None:
        """Run one check (``function`` returns what it measured, or raises) and print its line."""
        if cuda_only and not self.cuda:
            result = Result(name, "SKIP", must, "needs CUDA")
        else:
            started = time.perf_counter()
            try:
                detail = function()
                result = Result(name, "PASS", must, f"{detail} ({time.perf_counter() - started:.0f} s)")
            except Exception as exc:  # noqa: BLE001 - a check's failure is its line; the next check runs
                lines = str(exc).strip().splitlines() or [type(exc).__name__]
                result = Result(name, "FAIL", must, f"{type(exc).__name__}: {lines[-1][:300]}")
                traceback.print_exc(file=sys.stderr)
        self.results.append(result)
        print(result.line(), flush=True)

    def trainkit(self, *args: str, env: dict[str, str] | None = None, killed: bool = False) -> str:
        """``python -m trainkit ARGS``; its stdout. ``killed``: it must die by SIGKILL (a crash point)."""
        done = subprocess.run([sys.executable, "-m", "trainkit", *args], capture_output=True, text=True,
                              env={**self.env, **(env or {})}, timeout=600)  # fmt: skip
        return self._outcome(done, args, killed)

    def torchrun(self, processes: int, *args: str, env: dict[str, str] | None = None, killed: bool = False) -> str:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(free_port()), "-m", "trainkit", *args]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env={**self.env, **(env or {})}, timeout=600)
        return self._outcome(done, args, killed, torchrun=True)

    @staticmethod
    def _outcome(done: subprocess.CompletedProcess, args: tuple, killed: bool, torchrun: bool = False) -> str:
        if killed:
            if done.returncode == 0:
                raise AssertionError(f"`trainkit {' '.join(args[:2])}` was not killed at its crash point")
            return done.stdout
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            raise AssertionError(f"`trainkit {' '.join(args[:2])}` exited {done.returncode}: {error_line(done.stderr)}")
        return done.stdout

    def summary(self, run: Path) -> dict:
        return json.loads((run / "summary.json").read_text())

    def launcher(self, processes: int) -> Callable[..., str]:
        """``trainkit`` in this process's interpreter, or under torchrun with ``processes`` processes."""
        return (lambda *args, **options: self.torchrun(processes, *args, **options)) if processes else self.trainkit

    def killed_and_resumed(self, run: Path, args: list[str], step: int, *, processes: int = 0) -> dict:
        """Kill a run by SIGKILL after optimizer step ``step``, resume it with the same command; its summary."""
        launch = self.launcher(processes)
        launch("train", *args, "--out", str(run), env={"TRAINKIT_KILL_AT": f"step:{step}"}, killed=True)
        launch("train", *args, "--out", str(run), "--resume")
        return self.summary(run)

    def uninterrupted(self, run: Path, args: list[str], *, processes: int = 0) -> dict:
        self.launcher(processes)("train", *args, "--out", str(run))
        return self.summary(run)

    # ------------------------------------------------------------------ the checks
    def run_all(self) -> None:
        write_corpus(self.corpus)
        device = ["--device", self.device]
        mlp = [*IMAGE_RUN, "--model", "mlp", "--precision", "bf16", *device]
        cnn = [*IMAGE_RUN, "--model", "cnn", "--channels", "8,16", *device]
        transformer = [*TEXT_RUN, "--model", "transformer", "--data-file", str(self.corpus), *device]
        lstm = [*TEXT_RUN, "--model", "lstm", "--dropout", "0.2", "--data-file", str(self.corpus), *device]
        runs = {"mlp": mlp, "cnn": cnn, "transformer": transformer, "lstm": lstm}
        for name, args in runs.items():
            step = TEXT_KILL_STEP if name in ("transformer", "lstm") else KILL_STEP
            self.check(f"resume-{name}", "SIGKILL + --resume = the uninterrupted run, bit for bit",
                       lambda name=name, args=args, step=step: self.exact_resume(name, args, step))  # fmt: skip
        self.check("seed-deterministic", "the same seed twice gives the same weights", lambda: self.same_seed(runs))
        self.check("seed-nondeterministic", "--no-deterministic: the same seed twice (reported) and its cost",
                   lambda: self.nondeterministic(runs), cuda_only=True)  # fmt: skip
        self.check("resume-cuda-on-cpu", "a CUDA run's checkpoint resumes with --device cpu",
                   self.cuda_checkpoint_on_cpu, cuda_only=True)  # fmt: skip
        self.check("fp16-overflow", "GradScaler overflows: finite grad_norm, counted as scaler-skipped steps",
                   self.fp16_overflow)  # fmt: skip
        self.check("fp16-evaluate-on-cpu", "`trainkit evaluate --device cpu` of an fp16 CUDA checkpoint",
                   self.fp16_evaluate_on_cpu, cuda_only=True)  # fmt: skip
        self.check("loggers-clip-off", "--logger tensorboard (mlflow if installed) with --clip-norm 0", self.loggers)
        self.check("process-group-cpu-tensor", "the default group all-reduces a host tensor (FSDP offload's)",
                   self.process_group_host_tensor)  # fmt: skip
        self.check("ddp-syncbn-resume", "DDP + --sync-batchnorm: SIGKILL + --resume = uninterrupted", self.ddp)
        self.check("fsdp", "--strategy fsdp trains, finite loss", lambda: self.fsdp(offload=False))
        self.check("fsdp-offload", "--strategy fsdp --fsdp-offload trains, finite loss",
                   lambda: self.fsdp(offload=True), cuda_only=True)  # fmt: skip
        self.check("oom-backoff", "out of memory at a micro-batch: halve it and finish", self.oom_backoff)
        self.check("batch-size-auto", "--batch-size auto, then an epoch without running out", self.auto_batch)
        self.check("compile", "--compile trains", lambda: self.compiled(mlp), cuda_only=True)
        self.check("profile", "`trainkit profile` splits a step into phases", self.profile)
        self.check("export", "torch-export and ONNX of a checkpoint verify; export_model of a model on the device",
                   self.export)  # fmt: skip
        self.check("generate-twice", "`trainkit generate` twice with one seed: the same text", self.generate_twice)
        self.check("lr-find", "`trainkit lr-find` in fp16 (CUDA) or bf16 (CPU)", self.lr_find)

    def exact_resume(self, name: str, args: list[str], step: int) -> str:
        whole = self.uninterrupted(self.out / f"{name}-whole", args)
        resumed = self.killed_and_resumed(self.out / f"{name}-killed", args, step)
        assert_equal(resumed["model_sha256"], whole["model_sha256"], "model_sha256 of resumed vs uninterrupted")
        return f"model_sha256 {whole['model_sha256'][:12]} both"

    def same_seed(self, runs: dict[str, list[str]]) -> str:
        found = []
        for name in ("cnn", "transformer"):
            again = self.uninterrupted(self.out / f"{name}-again", runs[name])
            first = self.summary(self.out / f"{name}-whole")
            assert_equal(again["model_sha256"], first["model_sha256"], f"{name}: model_sha256 of two runs")
            found.append(f"{name} {first['wall_seconds']:.1f} s")
        return "same model_sha256 twice (deterministic on); " + ", ".join(found)

    def compiled(self, mlp: list[str]) -> str:
        summary = self.uninterrupted(self.out / "compiled", [*mlp, "--compile", "--epochs", "1"])
        return f"test accuracy {summary['test_accuracy']:.3f}"

    def nondeterministic(self, runs: dict[str, list[str]]) -> str:
        found = []
        for name in ("cnn", "transformer"):
            args = [*runs[name], "--no-deterministic"]
            if name == "transformer":
                args = [*args, "--block-size", "256"]  # SDPA's flash backward: atomics once there are several key blocks
            first = self.uninterrupted(self.out / f"{name}-nondet-1", args)
            second = self.uninterrupted(self.out / f"{name}-nondet-2", args)
            same = "same" if first["model_sha256"] == second["model_sha256"] else "different"
            deterministic = self.summary(self.out / f"{name}-whole")["wall_seconds"]
            found.append(f"{name}: {same} model_sha256, {first['wall_seconds']:.1f} s vs {deterministic:.1f} s "
                         f"deterministic (whole process)")  # fmt: skip
        return "; ".join(found)

    def cuda_checkpoint_on_cpu(self) -> str:
        run = self.out / "mlp-killed-on-cpu"
        mlp = [*IMAGE_RUN, "--model", "mlp", "--precision", "bf16", "--device", self.device]
        self.trainkit("train", *mlp, "--out", str(run), env={"TRAINKIT_KILL_AT": f"step:{KILL_STEP}"}, killed=True)
        self.trainkit("train", *mlp, "--out", str(run), "--resume", "--device", "cpu")
        summary = self.summary(run)
        return f"finished on the CPU: test accuracy {summary['test_accuracy']:.3f}"

    def fp16_overflow(self) -> str:
        from trainkit.config.schema import TrainConfig
        from trainkit.data.device import DeviceBatches
        from trainkit.loop.trainer import Trainer

        device = torch.device(self.device)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(512, 12, generator=gen) * 10
        y = (x[:, 0] > 0).long()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 2))
        # CUDA: fp16 autocast with a scale far above its range; CPU: fp32 with a scale near fp32's top
        precision, scale = ("fp16", 2.0**40) if self.cuda else ("fp32", 2.0**127)
        scaler = torch.amp.GradScaler(device.type, init_scale=scale)
        config = TrainConfig(batch_size=32, epochs=2, patience=0, device=self.device, precision=precision, lr=1e-2)
        history = Trainer(model, config, scaler=scaler).fit(DeviceBatches(x.to(device), y.to(device), 32, seed=1))
        skipped = sum(row["scaler_skipped_steps"] for row in history)
        norms = [row["grad_norm"] for row in history]
        if skipped < 1 or not all(math.isfinite(norm) for norm in norms):
            raise AssertionError(f"scaler-skipped {skipped}, grad_norm {norms}")
        return f"{skipped} scaler-skipped step(s), grad_norm {', '.join(f'{n:.3g}' for n in norms)}"

    def fp16_evaluate_on_cpu(self) -> str:
        run = self.out / "fp16"
        self.trainkit("train", *IMAGE_RUN, "--model", "mlp", "--precision", "fp16", "--epochs", "1", "--device",
                      self.device, "--out", str(run))  # fmt: skip
        printed = self.trainkit("evaluate", str(run / "checkpoints" / "best.pt"), "--device", "cpu")
        return f"evaluated on the CPU: {printed.strip().splitlines()[-1][:120]}"

    def loggers(self) -> str:
        run = self.out / "logged"
        loggers = "tensorboard,mlflow" if importable("mlflow") else "tensorboard"
        self.trainkit("train", *IMAGE_RUN, "--model", "mlp", "--epochs", "1", "--clip-norm", "0", "--logger", loggers,
                      "--log-every-steps", "1", "--device", self.device, "--out", str(run))  # fmt: skip
        events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
        if not events:
            raise AssertionError(f"no TensorBoard events under {run / 'tensorboard'}")
        return f"{loggers}: {len(events)} event file(s)"

    def process_group_host_tensor(self) -> str:
        script = (
            "import torch\nimport torch.distributed as dist\nfrom trainkit import distributed\n"
            f"device = torch.device({self.device!r})\n"
            "with distributed.process_group(distributed.ddp_device(device)):\n"
            "    host = torch.ones(3)\n    dist.all_reduce(host)\n"
            "    on_device = torch.ones(3, device=device)\n    dist.all_reduce(on_device)\n"
            "    print(distributed.backend_for(device), host.tolist(), on_device.tolist())\n"
        )
        path = self.out / "process_group.py"
        path.write_text(script)
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                   str(free_port()), str(path)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=300)
        if done.returncode != 0:
            raise AssertionError(error_line(done.stderr))
        return done.stdout.strip()

    def processes(self) -> int:
        """Two processes when there are two GPUs (or on CPU), else one: NCCL needs a GPU per process."""
        return 2 if not self.cuda or torch.cuda.device_count() >= 2 else 1

    def ddp(self) -> str:
        processes = self.processes()
        args = [*IMAGE_RUN, "--model", "cnn", "--channels", "8,16", "--strategy", "ddp", "--sync-batchnorm",
                "--device", "cuda" if self.cuda else "cpu"]  # fmt: skip
        whole = self.uninterrupted(self.out / "ddp-whole", args, processes=processes)
        resumed = self.killed_and_resumed(self.out / "ddp-killed", args, KILL_STEP // processes, processes=processes)
        assert_equal(resumed["model_sha256"], whole["model_sha256"], "DDP model_sha256 of resumed vs uninterrupted")
        return f"{processes} process(es), model_sha256 {whole['model_sha256'][:12]} both"

    def fsdp(self, *, offload: bool) -> str:
        processes = self.processes()
        run = self.out / ("fsdp-offload" if offload else "fsdp")
        args = [*IMAGE_RUN, "--model", "mlp", "--strategy", "fsdp", "--epochs", "1", "--clip-norm", "0.5",
                "--device", "cuda" if self.cuda else "cpu", *(["--fsdp-offload"] if offload else [])]  # fmt: skip
        summary = self.uninterrupted(run, args, processes=processes)
        if not math.isfinite(summary["test_loss"]):
            raise AssertionError(f"test loss {summary['test_loss']}")
        return f"{processes} process(es), test loss {summary['test_loss']:.4f}"

    def oom_backoff(self) -> str:
        from trainkit.config.schema import TrainConfig
        from trainkit.data.device import DeviceBatches
        from trainkit.loop.trainer import Trainer

        device = torch.device(self.device)
        torch.manual_seed(0)
        if self.cuda:  # a real out-of-memory: 8 layers of 4096 (1.6 GiB with gradients and momentum) and
            # 2 GiB of activations at batch 8192, under a 3.5 GiB cap
            layers = [module for _ in range(8) for module in (nn.Linear(4096, 4096), nn.ReLU())]
            model, features, rows, batch = nn.Sequential(*layers, nn.Linear(4096, 10)), 4096, 16384, 8192
            torch.cuda.set_per_process_memory_fraction(3.5 * 2**30 / torch.cuda.get_device_properties(device).total_memory)
        else:  # simulated: the forward raises above 64 rows, as a GPU would
            model, features, rows, batch = OutOfMemoryAbove(64), 12, 512, 256
        try:
            x = torch.randn(rows, features, device=device)
            y = torch.randint(0, 10, (rows,), device=device)
            config = TrainConfig(batch_size=batch, epochs=1, patience=0, device=self.device, optimizer="sgd",
                                 clip_norm=None)  # fmt: skip
            trainer = Trainer(model, config)
            history = trainer.fit(DeviceBatches(x, y, batch, seed=0))
        finally:
            if self.cuda:
                torch.cuda.set_per_process_memory_fraction(1.0)
                torch.cuda.empty_cache()
        if trainer.micro_batch_size is None or not math.isfinite(history[-1]["train_loss"]):
            raise AssertionError(f"micro-batch {trainer.micro_batch_size}, loss {history[-1]['train_loss']}")
        return f"batch {batch} ran in micro-batches of {trainer.micro_batch_size}, loss {history[-1]['train_loss']:.3f}"

    def auto_batch(self) -> str:
        from trainkit.recipes.components import seeded_data_and_model, training_batches
        from trainkit.config.schema import TrainConfig
        from trainkit.loop.trainer import Trainer

        device = torch.device(self.device)
        config = TrainConfig(dataset="synthetic", model="cnn", batch_size="auto", epochs=1, patience=5, ema=0.99,
                             device=self.device, memory_budget=None if self.cuda else 0.25).resolved()  # fmt: skip
        if self.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0 * 2**30 / torch.cuda.get_device_properties(device).total_memory)
        try:
            config, data, model = seeded_data_and_model(config, device)
            trainer = Trainer(model, config)
            trainer.fit(training_batches(config, data))
        finally:
            if self.cuda:
                torch.cuda.set_per_process_memory_fraction(1.0)
                torch.cuda.empty_cache()
        if trainer.micro_batch_size is not None:
            raise AssertionError(f"batch {config.batch_size} ran out of memory in training (backed off to "
                                 f"{trainer.micro_batch_size})")  # fmt: skip
        cap = " under a 1 GiB cap" if self.cuda else ""
        return f"batch {config.batch_size}{cap}, with an EMA and best weights held, trained without a back-off"

    def profile(self) -> str:
        printed = self.trainkit("profile", "--dataset", "synthetic", "--model", "cnn", "--channels", "8,16",
                                "--device", self.device, "--steps", "10", "--skip-steps", "3",
                                "--out", str(self.out / "profile"))  # fmt: skip
        wanted = ("forward", "backward", "optimizer")
        missing = [phase for phase in wanted if phase not in printed]
        if missing:
            raise AssertionError(f"phases {missing} missing from the split")
        return "phases " + ", ".join(wanted) + " reported"

    def export(self) -> str:
        from trainkit.checkpoint.export import export_model

        checkpoint = self.out / "cnn-whole" / "checkpoints" / "best.pt"
        formats = ["torch-export"] + (["onnx"] if importable("onnxruntime") and importable("onnxscript") else [])
        for name in formats:
            self.trainkit("export", str(checkpoint), "--format", name, "--out", str(self.out / f"cnn.{name}"))
        device = torch.device(self.device)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10)).to(device)
        inputs = torch.randn(4, 1, 8, 8, device=device)
        model(inputs)

        def rebuild() -> nn.Module:
            fresh = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
            fresh(torch.randn(1, 1, 8, 8))
            return fresh

        result = export_model(model, inputs, "torch-export", self.out / "api.pt2", rebuild=rebuild)
        return f"{', '.join(formats)} verified; export_model from {self.device}: max diff {result['max_abs_difference']:.2g}"

    def generate_twice(self) -> str:
        run = self.out / "transformer-whole"
        texts = [self.trainkit("generate", str(run), "--prompt", "def ", "--tokens", "80", "--seed", "3",
                               "--device", self.device) for _ in range(2)]  # fmt: skip
        assert_equal(texts[0], texts[1], "the two texts")
        return f"{len(texts[0])} characters, identical"

    def lr_find(self) -> str:
        precision = "fp16" if self.cuda else "bf16"
        printed = self.trainkit("lr-find", "--dataset", "synthetic", "--model", "mlp", "--precision", precision,
                                "--device", self.device, "--num-iter", "30", "--out", str(self.out / "lr-find"))  # fmt: skip
        return f"{precision}: suggested lr {json.loads(printed)['suggested_lr']:.3g}"


class OutOfMemoryAbove(nn.Module):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"simulated: {x.shape[0]} rows")
        return self.net(x)


def error_line(stderr: str) -> str:
    """The line of a failed process's stderr that names its error (torchrun ends with a banner)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^(\w+\.)*\w+(Error|Exception): ", line) or line.startswith("trainkit")]
    return (errors or lines or ["(no output)"])[-1][:240]


def assert_equal(got: object, want: object, what: str) -> None:
    if got != want:
        raise AssertionError(f"{what} differ: {str(got)[:40]} vs {str(want)[:40]}")


def importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_corpus(path: Path, limit: int = 400_000) -> None:
    """Text to train on without a dataset: the .py files of torch.nn, as ASCII, up to ``limit`` characters."""
    source = Path(torch.__file__).parent / "nn"
    text = "".join(file.read_text(errors="ignore") for file in sorted(source.rglob("*.py")))
    path.write_text(text.encode("ascii", "ignore").decode()[:limit])


def describe_machine(device: str) -> str:
    card = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU only"
    return f"{card}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (default when there is one) or cpu: the dry run")  # fmt: skip
    parser.add_argument("--out", default=None, help="where the runs and gpu_check.json go (default: a temp folder)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --device cpu for the dry run", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="trainkit-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    machine = describe_machine(args.device)
    print(f"trainkit GPU check on {machine}; runs in {out}", flush=True)
    checker = GpuCheck(args.device, out)
    started = time.perf_counter()
    checker.run_all()
    failed = [result.name for result in checker.results if result.status == "FAIL"]
    counts = {status: sum(r.status == status for r in checker.results) for status in ("PASS", "FAIL", "SKIP")}
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in "
          f"{time.perf_counter() - started:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))  # fmt: skip
    report = {"machine": machine, "device": args.device, "results": [asdict(r) for r in checker.results]}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
