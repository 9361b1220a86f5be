"""How ``search.py bench`` runs a model: the way exports are deployed.

* ``eager``: the PyTorch module as it is (``torch.inference_mode``);
* ``compile``: ``torch.compile(model)`` (Inductor; the first pass at each batch size compiles,
  inside the warm-up, never timed);
* ``onnxruntime``: the model exported with ``torch.onnx.export(dynamo=True)`` and run by an
  ONNX Runtime CPU session with torch's thread count (needs ``pip install 'p3b-search[onnx]'``).

:func:`prepare` returns a callable ``x -> output`` over CPU/CUDA tensors of the model's input.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import torch
from torch import nn

from p3b_search.export.load import ExportError
from p3b_search.timing import Forward

RUNTIMES = ("eager", "compile", "onnxruntime")


def check_runtime(runtime: str, devices: list[str]) -> None:
    """One-line :class:`ExportError` before any compute when ``runtime`` cannot run on ``devices``."""
    if runtime not in RUNTIMES:
        raise ExportError(f"--runtime {runtime}: use one of {', '.join(RUNTIMES)}")
    if runtime != "onnxruntime":
        return
    missing = [m for m in ("onnxruntime", "onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"--runtime onnxruntime: {', '.join(missing)} not installed: "
                                 "pip install 'p3b-search[onnx]', or use --runtime eager or compile")
    if any(not d.startswith("cpu") for d in devices):
        raise ExportError("--runtime onnxruntime: runs on the CPU here: add --device cpu")


def _eager(model: nn.Module) -> Forward:
    return model


def _compiled(model: nn.Module) -> Forward:
    return torch.compile(model, dynamic=False)


def _onnx_session(model: nn.Module, example: torch.Tensor, workdir: Path) -> Forward:
    import onnxruntime

    path = workdir / f"{type(model).__name__}-{id(model)}.onnx"
    batch = torch.export.Dim("batch", min=1, max=4096)
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        torch.onnx.export(model.cpu(), (example.cpu(),), str(path), dynamo=True, dynamic_shapes={"x": {0: batch}},
                          verbose=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.cpu().numpy()})


def prepare(model: nn.Module, runtime: str, example: torch.Tensor, workdir: str | Path) -> Forward:
    """``model`` (eval mode, on its device) as a callable under ``runtime``; ``example``: an
    input of the model's shape; ``workdir``: where the ONNX runtime keeps its graph."""
    if runtime == "onnxruntime":
        return _onnx_session(model, example, Path(workdir))
    return _compiled(model) if runtime == "compile" else _eager(model)
