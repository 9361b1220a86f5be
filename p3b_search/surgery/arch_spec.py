"""``ArchSpec``: a shrunk architecture as plain JSON, rebuilt from timm plus a state dict.

::

    {"format": "p3b-search/arch-spec", "version": 2,
     "model_name": "deit_small_patch16_224", "model_kwargs": {"num_classes": 100},
     "residual": {"mode": "per-block"},
     "sub_blocks": [{"index": 0, "kind": "attn", "skipped": false,
                     "kept": {"in": null, "head_dim": [0, 3, ...], "heads": null, "out": [...]}},
                    ...]}

``kept[group]`` lists the kept unit indices of the dense model (``null``: all kept); a
skipped sub-block has ``"kept": null``. ``residual`` says how the model was cut: per block
(each sub-block's ``in``/``out`` listed), or ``{"mode": "shared", "kept": [[...], ...]}``:
one shared residual width per stage (the kept channels of each stage's stream, ``null``:
all), which every sub-block's input and output use (their rows then list only the inner
groups). Version 1 files (before shared residuals) are read as per block. Rebuilding needs
only torch and timm: no pickle.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from p3b_search.surgery.adapters import ModelAdapter, get_adapter
from p3b_search.surgery.gates import RESIDUAL_GROUPS, BlockMasks, ResidualMasks

FORMAT = "p3b-search/arch-spec"
VERSION = 2
#: versions this code reads (1: per-block residual only)
READABLE_VERSIONS = (1, 2)


def _kept_mask(size: int, kept: list[int] | None) -> torch.Tensor:
    """A bool mask of ``size`` units, True at ``kept`` (all when None)."""
    if kept is None:
        return torch.ones(size, dtype=torch.bool)
    mask = torch.zeros(size, dtype=torch.bool)
    mask[torch.as_tensor(kept, dtype=torch.long)] = True
    return mask


@dataclass
class ArchSpec:
    """Model name, timm kwargs, the kept units of every sub-block and, with a shared residual,
    the kept channels of each stage's stream (``residual[stage]``, None = all; ``residual``
    None: per block)."""

    model_name: str
    model_kwargs: dict[str, Any]
    sub_blocks: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)
    residual: list[list[int] | None] | None = None

    @property
    def residual_mode(self) -> str:
        """``"shared"`` or ``"per-block"``: how the model's residual width was cut."""
        return "per-block" if self.residual is None else "shared"

    @classmethod
    def from_model(cls, model: nn.Module, model_name: str, model_kwargs: dict[str, Any],
                   extra: dict[str, Any] | None = None) -> "ArchSpec":
        """Describe ``model`` (dense, or the output of ``shrink_model``)."""
        adapter = get_adapter(model)
        rows = []
        for sb in adapter.sub_blocks:
            kept_units = getattr(adapter.block(sb), "kept_units", {})
            kept = kept_units.get(sb.kind, {g: None for g in sb.groups})
            rows.append({"index": sb.index, "kind": sb.kind, "skipped": kept is None, "kept": kept})
        kept_residual = getattr(model, "kept_residual", None)
        residual = None if kept_residual is None else [kept_residual[stage] for stage in sorted(kept_residual)]
        return cls(model_name, dict(model_kwargs), rows, dict(extra or {}), residual)

    def masks(self, adapter: ModelAdapter) -> BlockMasks:
        """The hard masks (over the dense model of ``adapter``) that produce this architecture."""
        by_index = {row["index"]: row for row in self.sub_blocks}
        masks: BlockMasks = {}
        for sb in adapter.sub_blocks:
            row = by_index.get(sb.index)
            if row is None or row["kind"] != sb.kind:
                raise ValueError(f"arch spec does not match {self.model_name}: sub-block {sb.index} ({sb.name})")
            groups = {}
            for group, size in sb.groups.items():
                if row["skipped"]:
                    groups[group] = torch.zeros(size, dtype=torch.bool)
                elif not (self.residual is not None and group in RESIDUAL_GROUPS):  # the residual's
                    groups[group] = _kept_mask(size, row["kept"].get(group))
            masks[sb.index] = groups
        return masks

    def residual_masks(self, adapter: ModelAdapter) -> ResidualMasks | None:
        """The shared residual's masks by stage (over the dense model of ``adapter``); None per block."""
        if self.residual is None:
            return None
        widths = adapter.stream_widths()
        if len(self.residual) != len(widths):
            raise ValueError(f"arch spec does not match {self.model_name}: residual widths for "
                             f"{len(self.residual)} stages, the model has {len(widths)}")
        return {stage: _kept_mask(widths[stage], kept) for stage, kept in zip(sorted(widths), self.residual)}

    def to_dict(self) -> dict[str, Any]:
        residual = {"mode": "per-block"} if self.residual is None else {"mode": "shared", "kept": self.residual}
        return {"format": FORMAT, "version": VERSION, "model_name": self.model_name,
                "model_kwargs": self.model_kwargs, "residual": residual, "sub_blocks": self.sub_blocks,
                "extra": self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ArchSpec":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a p3b-search arch spec (format={data.get('format')!r})")
        if data.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"arch spec version {data.get('version')} is not supported (expected one of "
                             f"{', '.join(map(str, READABLE_VERSIONS))})")
        residual = data.get("residual", {"mode": "per-block"})
        if not isinstance(residual, dict) or residual.get("mode") not in ("per-block", "shared"):
            raise ValueError('residual must be {"mode": "per-block"} or {"mode": "shared", "kept": [...]} '
                             f"(got {residual!r})")
        kept = residual.get("kept") if residual["mode"] == "shared" else None
        if residual["mode"] == "shared" and not isinstance(kept, list):
            raise ValueError(f"residual.kept must list the kept channels of each stage (got {kept!r})")
        return cls(data["model_name"], data["model_kwargs"], data["sub_blocks"], data.get("extra", {}), kept)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "ArchSpec":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{path}: corrupt arch spec ({err})") from None

    def build(self, state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """The shrunk model: timm's dense model, cut to this spec, then ``state_dict`` loaded
        strictly (random init when None)."""
        import timm

        from p3b_search.surgery.shrink import shrink_model

        dense = timm.create_model(self.model_name, pretrained=False, **self.model_kwargs)
        adapter = get_adapter(dense)
        model = shrink_model(dense, self.masks(adapter), self.residual_masks(adapter), inplace=True)
        if state_dict is not None:
            model.load_state_dict(state_dict, strict=True)
        return model
