"""Knobs of ``dimap`` and ``dimap-structured`` (the methods and what they decide beyond
docs/methods.md, section 2: :mod:`p3b_search.methods.dimap`)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from p3b_search.method_specs.base import MethodConfig, MethodSpec, register_spec

#: the modules DIMAP prunes, each with its own ratio: attention's QKV and PRJ, the MLP
MODULES = ("qkv", "prj", "mlp")
UnitGroup = Literal["in", "head_dim", "heads", "out", "hidden"]


class DIMAPConfig(MethodConfig):
    """Per-module parameter prune ratios in [0, 1); ``None``: derived from ``prune_ratio``
    (see :mod:`p3b_search.methods.dimap`)."""

    qkv_prune_ratio: float | None = Field(None, ge=0.0, lt=1.0, description="Fraction of QKV weights removed.")
    prj_prune_ratio: float | None = Field(None, ge=0.0, lt=1.0, description="Fraction of PRJ weights removed.")
    mlp_prune_ratio: float | None = Field(None, ge=0.0, lt=1.0, description="Fraction of MLP weights removed.")

    def given_ratios(self) -> dict[str, float | None]:
        """The module ratios as set (``None``: unset)."""
        return {m: getattr(self, f"{m}_prune_ratio") for m in MODULES}

    def with_share(self, share: float) -> dict[str, float]:
        """The module ratios with every unset one equal to ``share``."""
        return {m: share if r is None else r for m, r in self.given_ratios().items()}

    def module_ratios(self, sizes: dict[str, int], total_params: int) -> dict[str, float]:
        """Ratio per module given each module's weight count ``sizes`` and the model's
        parameter count ``total_params``: unset modules share evenly what removes
        ``prune_ratio x total_params`` weights (exactly the budget when only weights go)."""
        given = self.given_ratios()
        unset = [m for m in MODULES if given[m] is None]
        if not unset:
            return given
        fixed = sum(given[m] * sizes[m] for m in MODULES if given[m] is not None)
        share = (self.prune_ratio * total_params - fixed) / sum(sizes[m] for m in unset)
        share = 0.0 if -1e-9 < share < 0.0 else share  # rounding of an exactly met budget
        if not 0.0 <= share < 1.0:
            set_text = "".join(f" with {m}_prune_ratio={given[m]}" for m in MODULES if given[m] is not None)
            fix = "set every module ratio or pick ratios that fit in [0, 1)" if set_text else "lower prune_ratio"
            raise ValueError(
                f"dimap: prune_ratio={self.prune_ratio} of all {total_params} parameters{set_text} needs "
                f"{share:.3f} of the {'/'.join(unset)} weights removed: {fix}"
            )
        return self.with_share(share)


class DIMAPStructuredConfig(DIMAPConfig):
    """DIMAP aggregated per unit; ``unit_groups`` are the kinds of units it may remove."""

    unit_groups: tuple[UnitGroup, ...] = Field(
        ("heads", "head_dim", "hidden", "in", "out"),
        description="Unit groups that may be pruned: heads, head_dim, in, out (attention), hidden, in, out (MLP).",
    )

    @model_validator(mode="after")
    def _groups_given(self) -> "DIMAPStructuredConfig":
        if not self.unit_groups:
            raise ValueError(
                "dimap-structured.unit_groups is empty: name at least one of in, head_dim, heads, out, hidden")
        if len(set(self.unit_groups)) != len(self.unit_groups):
            raise ValueError(f"dimap-structured.unit_groups={list(self.unit_groups)} repeats a group: list each once")
        return self


DIMAP_SPEC = register_spec(MethodSpec("dimap", DIMAPConfig, structured=False))
DIMAP_STRUCTURED_SPEC = register_spec(MethodSpec("dimap-structured", DIMAPStructuredConfig, structured=True))
