"""A trained model out of trainkit: safetensors weights, a torch.export program, an ONNX file.

``trainkit export CHECKPOINT --format safetensors|torch-export|onnx`` writes one file, and only
reports it written once it is verified: the artefact is loaded back and run on a batch of the
run's own validation inputs, and its outputs must equal the model's (safetensors: the same
weights, so bit for bit; the compiled formats within ``OUTPUT_TOLERANCE``, since they may fuse
or reorder floating-point work). The batch dimension stays dynamic in both compiled formats.
ONNX needs the optional extra ``pip install 'trainkit[export]'`` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from trainkit.checkpoint.file import model_sha256
from trainkit.devices import HOST, module_device, to_host
from trainkit.errors import ConfigError, OutputError, TrainkitError, first_line
from trainkit.checkpoint.rundir import replacing_atomically, write_atomically

EXPORT_FORMATS = ("safetensors", "torch-export", "onnx")
SUFFIXES = {"safetensors": ".safetensors", "torch-export": ".pt2", "onnx": ".onnx"}
OUTPUT_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
ONNX_HINT = "--format onnx needs ONNX: pip install 'trainkit[export]' (onnx, onnxscript, onnxruntime)"


# ---------------------------------------------------------------- safetensors
def export_safetensors(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Weights in safetensors: loadable anywhere without unpickling anything.

    A tied weight (a language model's head and token embedding) is stored once; the metadata's
    ``tied`` maps the other names to it, and ``load_safetensors`` puts them back.
    """
    state: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first_name: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for key, value in state_dict.items():
        where = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if where in first_name:
            tied[key] = first_name[where]
            continue
        first_name[where] = key
        state[key] = value.detach().cpu().contiguous()
    metadata = {"model_sha256": model_sha256({**state, **{key: state[name] for key, name in tied.items()}})}
    if tied:
        metadata["tied"] = json.dumps(tied)
    # the bytes, written by trainkit: safetensors' save_file writes its own .tmpXXXXXX (left behind by a
    # kill, unknown to the temp clean-up) with mode 0600, unlike every other file of a run
    write_atomically(path, save(state, metadata=metadata))


def load_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A state_dict from ``export_safetensors``' file, tied weights under all their names."""
    with safe_open(str(path), framework="pt", device=device) as file:
        state = {key: file.get_tensor(key) for key in file.keys()}
        tied = json.loads((file.metadata() or {}).get("tied", "{}"))
    return {**state, **{key: state[name] for key, name in tied.items()}}


# ---------------------------------------------------------------- any format
def export_model(model: nn.Module, inputs: Any, format: str, path: Path, *, rebuild: Callable[[], nn.Module]) -> dict:
    """Write ``model`` in ``format`` to ``path``, verify it on ``inputs``, and say what was checked.

    ``inputs``: one batch of model inputs (a tensor or a tuple of tensors); ``rebuild``: a fresh,
    untrained model of the same architecture (the safetensors file is loaded into it).
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    model, args = on_host(model, example_args(inputs), rebuild)
    with torch.no_grad():
        expected = model(*args)
    writers = {"safetensors": write_safetensors, "torch-export": write_torch_export, "onnx": write_onnx}
    try:
        outputs = writers[format](model, args, path, rebuild)
    except OSError as exc:
        raise OutputError(f"could not write {path}: {exc.strerror or exc}; choose a writable --out") from None
    difference = max_difference(expected, outputs)
    exact = format == "safetensors"
    if (difference != 0.0) if exact else not all_close(expected, outputs):
        path.unlink(missing_ok=True)
        raise TrainkitError(f"the {format} export of this model does not reproduce its outputs (largest difference "
                            f"{difference:.3g}); nothing was written")  # fmt: skip
    return {"path": str(path), "format": format, "verified_on_rows": rows(args), "max_abs_difference": difference}


def on_host(model: nn.Module, args: tuple[torch.Tensor, ...], rebuild: Callable[[], nn.Module]
            ) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:  # fmt: skip
    """The model in eval mode and its inputs on the CPU, where every format is verified (ONNX Runtime
    runs there; a torch.export program would bake in the GPU). A model on another device is exported
    from a CPU copy (``rebuild`` with its weights), so the caller's model stays where it is."""
    if module_device(model) != HOST:
        copy = rebuild()
        copy.load_state_dict(to_host(model.state_dict()))
        model = copy
    return model.eval(), to_host(args)


def example_args(inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(x, torch.Tensor) for x in inputs):
        return tuple(inputs)
    raise ConfigError(f"trainkit export runs models on a tensor or a tuple of tensors; this model's inputs are "
                      f"{type(inputs).__name__} (export it yourself with torch.export)")  # fmt: skip


def rows(args: tuple[torch.Tensor, ...]) -> int:
    return int(args[0].shape[0])


def write_safetensors(model: nn.Module, args: tuple, path: Path, rebuild: Callable[[], nn.Module]) -> Any:
    export_safetensors(model.state_dict(), path)
    fresh = rebuild().eval()
    fresh.load_state_dict(load_safetensors(path))
    with torch.no_grad():
        return fresh(*args)


def batch_dims(args: tuple[torch.Tensor, ...]) -> tuple[dict[int, Any], ...]:
    """Dimension 0 of every input is the batch, of any size (the exported file serves any batch)."""
    batch = torch.export.Dim("batch", min=1)
    return tuple({0: batch} for _ in args)


def write_torch_export(model: nn.Module, args: tuple, path: Path, rebuild: Callable[[], nn.Module]) -> Any:
    try:
        with quiet_exporter():  # e.g. nn.LSTM's flat weights, reassigned while tracing: verified below instead
            program = torch.export.export(model, args, dynamic_shapes=batch_dims(args))
    except Exception as exc:  # noqa: BLE001 - torch.export's many ways to refuse a model
        raise TrainkitError(f"torch.export cannot trace this model: {first_line(exc)}") from None
    buffer = io.BytesIO()  # torch.export.save wants a name ending in .pt2 or a buffer; the file is written atomically
    torch.export.save(program, buffer)
    write_atomically(path, buffer.getvalue())
    with torch.no_grad():
        return torch.export.load(str(path)).module()(*args)


def write_onnx(model: nn.Module, args: tuple, path: Path, rebuild: Callable[[], nn.Module]) -> Any:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401 - torch.onnx's dynamo exporter needs it
    except ImportError:
        raise TrainkitError(ONNX_HINT) from None
    names = [f"input_{index}" for index in range(len(args))]
    with replacing_atomically(path) as tmp, quiet_exporter():
        try:  # the weights inside the one file (external data would name the temp file): models under 2 GB
            torch.onnx.export(model, args, str(tmp), dynamo=True, input_names=names, dynamic_shapes=batch_dims(args),
                              external_data=False, verbose=False)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the exporter's errors are many and deep
            raise TrainkitError(f"torch.onnx.export cannot export this model: {first_line(exc)}") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: arg.detach().cpu().numpy() for name, arg in zip(names, args)}
    outputs = session.run(None, feeds)
    return torch.from_numpy(outputs[0]) if len(outputs) == 1 else tuple(torch.from_numpy(o) for o in outputs)


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Errors only from the exporters' loggers, and no warnings: the ONNX passes log at INFO, the
    exporters warn about optional libraries and traced attributes; the verification is what counts."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def tensors_of(outputs: Any) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [t for item in outputs for t in tensors_of(item)] if isinstance(outputs, (tuple, list)) else []


def max_difference(expected: Any, actual: Any) -> float:
    pairs = list(zip(tensors_of(expected), tensors_of(actual)))
    if not pairs or len(tensors_of(expected)) != len(tensors_of(actual)):
        return float("inf")
    return max(float((e.detach().cpu().float() - a.detach().cpu().float()).abs().max()) for e, a in pairs)


def all_close(expected: Any, actual: Any) -> bool:
    pairs = list(zip(tensors_of(expected), tensors_of(actual)))
    return bool(pairs) and all(e.shape == a.shape and torch.allclose(e.detach().cpu().float(), a.detach().cpu().float(),
                                                                    **OUTPUT_TOLERANCE) for e, a in pairs)  # fmt: skip
