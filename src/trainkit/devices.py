"""The host/device boundary: where a run's tensors live, and the per-device state around them.

trainkit keeps one rule at this boundary: **what is read from or written to a file lives on the
host** (``HOST``, the CPU), and the run places it on its device explicitly. A checkpoint is
always loaded to the host; ``load_state_dict`` then moves weights, optimizer moments and averages
to where their parameters live, while the optimizer's ``step`` counters stay host scalars
(non-fused AdamW reads them on the host every step: a device scalar would cost a sync per
parameter). RNG states are host tensors by definition (``torch.set_rng_state`` refuses anything
else), and the one CUDA generator a run draws from is saved with its device index and restored
onto the run's own device, whatever index that is now.

Also here: choosing and activating the run's device, the numerics switches that make runs
reproducible (``settle_cpu_vector_math`` at import, ``configure_numerics`` for CUDA), and whether
bf16 pays on a device (``fast_bf16``).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import numpy as np
import torch

from trainkit.errors import ConfigError, first_line
from trainkit.data.runtime import map_tensors

HOST = torch.device("cpu")  # checkpoints, RNG states, snapshots and exported weights live here
TRAINING_DEVICE_TYPES = ("cpu", "cuda", "mps")
# cuBLAS needs a fixed workspace to be deterministic (PyTorch's reproducibility notes); it is read
# when cuBLAS starts, so it is set before any CUDA work of the process.
CUBLAS_DETERMINISTIC = ":4096:8"
# bf16 is chosen on a CPU only when its matmuls measure at least this much faster than fp32:
# native bf16 (AMX, AVX-512 BF16) is 2-10x, emulated bf16 well below 1x, so noise cannot flip it.
CPU_BF16_MIN_SPEEDUP = 1.3


def settle_cpu_vector_math() -> None:
    """Let Intel MKL's vector math initialise on one thread, before any op can split across threads.

    ATen computes sqrt, exp, log, tanh, erf... of float tensors with MKL's VML, which initialises
    itself at its first call in a process. When two OpenMP threads make that first call at once (an
    elementwise op on a tensor big enough to split, such as AdamW's ``sqrt`` of its second moment),
    one of them can compute its half on a less accurate path: the same seed then gives other weights
    in a few fresh processes in a hundred on a busy machine (docs/reliability.md, "Determinism on a
    CPU"). One single-element call, too small to split, initialises VML first; it costs microseconds.
    """
    torch.sqrt(torch.ones(1))


settle_cpu_vector_math()  # at import: before the first op of any run, recipe or user model


# ------------------------------------------------------------------ the device
def require_device(name: str) -> None:
    """'auto' or a device trainkit can train on (cpu, cuda, cuda:N, mps): 'meta' or 'tpu' are refused here."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in TRAINING_DEVICE_TYPES:
        raise ConfigError(f"--device {name!r} is not a device trainkit can train on; use auto, cpu, cuda or cuda:N")


def resolve_device(name: str) -> torch.device:
    """'auto' means CUDA when available, else CPU; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    require_device(name)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for but MPS is not available here; use --device cpu")
    return device


def run_device(name: str, *, deterministic: bool = True, tf32: bool = False) -> torch.device:
    """The run's device (``resolve_device``), made the current one, with its numerics switches set
    (``configure_numerics``): called before any CUDA work of the run, so cuBLAS starts with them."""
    device = use_device(resolve_device(name))
    configure_numerics(device, deterministic=deterministic, tf32=tf32)
    return device


def use_device(device: torch.device) -> torch.device:
    """Make ``device`` this process's current CUDA device (a bare ``cuda`` becomes ``cuda:<current>``).

    Without it a run on ``cuda:1`` still opens a context on GPU 0 (pinned-memory threads, library
    handles) and asks GPU 0 what it supports. Other devices are returned as they are.
    """
    if device.type != "cuda":
        return device
    index = torch.cuda.current_device() if device.index is None else device.index
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's first parameter (or buffer) lives; the host for a module without tensors."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return HOST


def free_cached_device_memory(device: torch.device) -> None:
    """Give the caching allocator's free blocks back (after running out of memory, before a retry)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def host_copy(tree: Any) -> Any:
    """A copy of every tensor in ``tree`` (dicts, lists, tuples) in host memory: snapshots kept for a
    whole run (rollback's fallback state) must not hold device memory the run needs."""
    return map_tensors(lambda tensor: tensor.detach().to(HOST, copy=True), tree)


def to_host(tree: Any) -> Any:
    """Every tensor of ``tree`` on the host (no copy for those already there)."""
    return map_tensors(lambda tensor: tensor.detach().to(HOST), tree)


# ------------------------------------------------------------------ RNG states
def rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG a run on ``device`` draws from, as host tensors and numbers (loads with weights_only).

    ``cuda``: the generator of the run's own device with its index, or None off CUDA (asking
    every GPU, as ``get_rng_state_all`` does, would start the CUDA runtime in CPU runs).
    """
    cuda = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        cuda = {"index": index, "state": torch.cuda.get_rng_state(index)}
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate(), "numpy": numpy_rng_state()}


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Restore ``rng_state``'s output; the saved CUDA stream continues on ``device`` (resuming a
    ``cuda:0`` run on ``cuda:1``, or on fewer GPUs, keeps its dropout stream)."""
    torch.set_rng_state(state["torch"].to(HOST))
    random.setstate(state["python"])
    set_numpy_rng_state(state["numpy"])
    if device.type == "cuda" and (cuda := saved_cuda_state(state.get("cuda"), device)) is not None:
        torch.cuda.set_rng_state(cuda.to(HOST), device)


def saved_cuda_state(saved: Any, device: torch.device) -> torch.Tensor | None:
    """The saved CUDA generator state to continue on ``device``: the run's own (new format: a dict
    with its index), or from an older checkpoint's list of every GPU's, the entry of this device's index."""
    if isinstance(saved, dict):
        return saved["state"]
    if isinstance(saved, (list, tuple)) and saved:
        index = device.index or 0
        return saved[index] if index < len(saved) else saved[0]
    return None


def numpy_rng_state() -> dict[str, Any]:
    """NumPy's global RNG state as tensors and numbers, so it loads with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
            "has_gauss": has_gauss, "cached_gaussian": cached}  # fmt: skip


def set_numpy_rng_state(state: dict[str, Any]) -> None:
    keys = state["keys"].to(HOST).numpy().astype(np.uint32)
    np.random.set_state((state["kind"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


# ------------------------------------------------------------------ numerics
def configure_numerics(device: torch.device, *, deterministic: bool, tf32: bool) -> None:
    """The process-wide switches a run on ``device`` needs (they only matter on CUDA).

    ``deterministic`` (the default): the same seed gives the same weights and a resumed run the
    uninterrupted one's, bit for bit: cuBLAS' fixed workspace, ``use_deterministic_algorithms``
    (strict: SDPA's flash backward only turns deterministic then) and cuDNN without autotuning.
    ``tf32``: fp32 matmuls and convolutions in TF32 (faster on Ampere and later; rounds them).
    """
    if device.type != "cuda":
        return
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = deterministic
    set_tf32(tf32)


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions, on or off (PyTorch's defaults differ: matmul off,
    cuDNN on). torch >= 2.9 has per-backend ``fp32_precision``; older releases the allow_tf32 flags."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        precision = "tf32" if enabled else "ieee"
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


@contextmanager
def explaining_nondeterministic_ops() -> Iterator[None]:
    """torch's error for an op without a deterministic CUDA kernel (under use_deterministic_algorithms)
    becomes one line that names the op and the way out."""
    try:
        yield
    except RuntimeError as exc:
        if "does not have a deterministic implementation" not in str(exc):
            raise
        raise ConfigError(f"{first_line(exc)}; pass --no-deterministic (TrainConfig(deterministic=False)) to "
                          f"train with it: the same seed may then give different weights") from None


# ------------------------------------------------------------------ bf16
def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast pays on ``device``: a GPU with native bf16 (Ampere or later; emulated
    bf16 on a V100 or T4 counts as no), or a CPU whose bf16 matmuls measure faster than fp32."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_bf16_speedup() >= CPU_BF16_MIN_SPEEDUP


@cache
def cpu_bf16_speedup(size: int = 512, repeats: int = 8) -> float:
    """fp32 matmul time over bf16's on this CPU (once per process, ~0.1 s): AMX and AVX-512 BF16
    make bf16 2-10x faster, CPUs without them emulate it at a fraction of fp32's speed. A feature
    flag alone misses AVX-512 BF16 (docs/benchmarks.md, "Text")."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    a16, b16 = a.bfloat16(), b.bfloat16()
    return best_time(lambda: a @ b, repeats) / best_time(lambda: a16 @ b16, repeats)


def best_time(work: Callable[[], Any], repeats: int) -> float:
    """The fastest of ``repeats`` runs after one warm-up (the minimum resists a busy machine)."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)
