"""Export a trial's pruned model to a self-contained folder, load it back, benchmark it.

An exported folder holds ``model.safetensors`` + ``arch.json`` (all :func:`load_pruned`
needs: torch, timm and safetensors, no pickle), a model card ``README.md``, and where the
model allows it ``model.pt2`` (torch.export) and ``model.onnx``. Only :mod:`.load` is light:
the writer, picks and bench modules import the search stack and are imported on use.
"""
from p3b_search.export.load import load_pruned

__all__ = ["load_pruned"]
