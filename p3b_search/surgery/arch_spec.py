"""``ArchSpec``: a shrunk architecture as plain JSON, rebuilt from timm plus a state dict.

::

    {"format": "p3b-search/arch-spec", "version": 1,
     "model_name": "deit_small_patch16_224", "model_kwargs": {"num_classes": 100},
     "sub_blocks": [{"index": 0, "kind": "attn", "skipped": false,
                     "kept": {"in": null, "head_dim": [0, 3, ...], "heads": null, "out": [...]}},
                    ...]}

``kept[group]`` lists the kept unit indices of the dense model (``null``: all kept); a
skipped sub-block has ``"kept": null``. Rebuilding needs only torch and timm: no pickle.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from p3b_search.surgery.adapters import ModelAdapter, get_adapter
from p3b_search.surgery.gates import BlockMasks

FORMAT = "p3b-search/arch-spec"
VERSION = 1


@dataclass
class ArchSpec:
    """Model name, timm kwargs and the kept units of every sub-block."""

    model_name: str
    model_kwargs: dict[str, Any]
    sub_blocks: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)

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
        return cls(model_name, dict(model_kwargs), rows, dict(extra or {}))

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
                    continue
                kept = row["kept"].get(group)
                mask = torch.ones(size, dtype=torch.bool)
                if kept is not None:
                    mask = torch.zeros(size, dtype=torch.bool)
                    mask[torch.as_tensor(kept, dtype=torch.long)] = True
                groups[group] = mask
            masks[sb.index] = groups
        return masks

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "model_name": self.model_name,
                "model_kwargs": self.model_kwargs, "sub_blocks": self.sub_blocks, "extra": self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ArchSpec":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a p3b-search arch spec (format={data.get('format')!r})")
        if data.get("version") != VERSION:
            raise ValueError(f"arch spec version {data.get('version')} is not supported (expected {VERSION})")
        return cls(data["model_name"], data["model_kwargs"], data["sub_blocks"], data.get("extra", {}))

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
        model = shrink_model(dense, self.masks(get_adapter(dense)), inplace=True)
        if state_dict is not None:
            model.load_state_dict(state_dict, strict=True)
        return model
