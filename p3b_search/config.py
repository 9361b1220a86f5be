"""Validated configuration of what one trial trains: the model, the data, the two stages.

These sections are shared by the objective (``objectives/``) and the study schema
(``p3b_search.study.sections``), which composes them with the method and the search space.
Every model forbids unknown keys, so a typo fails before any compute is spent.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Data kinds generated from what the installed packages ship (no ``root``; a source domain for pretraining).
EMBEDDED_TASKS = ("digits", "glyphs")


class StrictModel(BaseModel):
    """A frozen pydantic model that refuses unknown fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(StrictModel):
    """A timm model: ``name`` as in ``timm.list_models()``, ``overrides`` passed to
    ``timm.create_model`` (e.g. ``img_size``, ``depth``, ``drop_path_rate``).

    ``weights``: ``null`` (random init), ``"source-pretrained"`` (the embedded digits task's
    deterministic source-domain pretraining), ``"hub"`` (timm's pretrained tag, needs network),
    or a local ``.pth``/``.safetensors`` path (timm or DeiT checkpoint layout).
    """

    name: str = "vit_tiny_patch16_224"
    overrides: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None
    num_classes: int | None = Field(None, ge=2, description="None: taken from the data set.")


class DataConfig(StrictModel):
    """Where images come from. ``digits``: the embedded scikit-learn digits transfer task
    (source classes 0-4, target classes 5-9). ``glyphs``: the embedded glyphs transfer task
    (source: capitals A-Z in sans-serif faces on plain grey; target: lower-case a-z in serif
    faces, coloured, cluttered and noisy; see :mod:`p3b_search.data.glyphs`). ``imagefolder``: ``root/train/<class>/*`` and
    ``root/val/<class>/*``. ``cifar10``/``cifar100``: torchvision's python-pickle folder at
    ``root``. ``image_size`` None: the model's pretrained config input size."""

    kind: Literal["digits", "glyphs", "imagefolder", "cifar10", "cifar100"] = "digits"
    root: Path | None = None
    image_size: int | None = Field(None, ge=8)
    num_workers: int = Field(0, ge=0)
    max_train_samples: int | None = Field(None, ge=1, description="Subsample for quick runs.")

    @property
    def source_task(self) -> str:
        """The embedded task whose source domain ``model.weights: source-pretrained`` trains on:
        this one where ``kind`` is embedded, else ``digits``."""
        return self.kind if self.kind in EMBEDDED_TASKS else "digits"

    @model_validator(mode="after")
    def _root_needed(self) -> "DataConfig":
        if self.kind not in EMBEDDED_TASKS and self.root is None:
            raise ValueError(f"data.root is required for data.kind={self.kind!r}: set it to the data set folder")
        return self


class StageConfig(StrictModel):
    """One training stage. ``lr`` is the base LR for a batch of 512 (scaled linearly by the
    effective batch, as in DeiT); ``schedule`` cosine decays to ``min_lr`` after ``warmup_epochs``."""

    epochs: int = Field(ge=0)
    lr: float = Field(5e-4, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)


class TrainingConfig(StrictModel):
    """Both stages of a trial (prune, then fine-tune of the pruned model) and what they share."""

    prune: StageConfig = StageConfig(epochs=10, schedule="constant")
    finetune: StageConfig = StageConfig(epochs=5, schedule="cosine")
    batch_size: int = Field(64, ge=1, description="Images per step and data-parallel rank.")
    grad_accum: int = Field(1, ge=1)
    weight_decay: float = Field(0.05, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    mixup: float = Field(0.0, ge=0)
    cutmix: float = Field(0.0, ge=0)
    drop_path: float = Field(0.0, ge=0, lt=1)
    seed: int = 0
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'.")
    amp: bool = Field(True, description="bf16 autocast on CUDA; ignored on CPU.")


class TrialConfig(StrictModel):
    """Everything one trial needs: what ``objectives.prune_finetune.run_trial`` runs.

    ``method_config`` holds the method's knobs; it is validated by the method's own
    ``config_cls`` (see ``p3b_search.method_specs.method_spec``)."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    method: str = "p3b"
    method_config: dict[str, Any] = Field(default_factory=dict)
