"""The allocation-row schema, the one definition every table and figure reads (the rows are
built by :mod:`p3b_search.methods.allocation`).

One row per sub-block per mask decision, with the fields of :data:`ALLOCATION_KEYS` in that
order: ``step`` (micro-batch of the decision), ``epoch``, ``layer``, ``kind``, ``sub_block`` (j),
``benefit_cls``/``benefit_patch`` (window-mean block benefit, NaN when not measured),
``importance`` (combined I_j, NaN when not used), ``keep_ratio_target`` (the keep ratio the
decision aimed at, NaN for a global ranking), ``keep_ratio`` (kept / dense parameters of the
sub-block, in [0, 1]), ``kept_params`` and ``kept_macs`` (per image). The fields of
:data:`OPTIONAL_ALLOCATION_KEYS` are left out by methods without block benefits (DIMAP,
SViTE, S²ViTE).
"""
from __future__ import annotations

ALLOCATION_KEYS: tuple[str, ...] = (
    "step", "epoch", "layer", "kind", "sub_block", "benefit_cls", "benefit_patch", "importance",
    "keep_ratio_target", "keep_ratio", "kept_params", "kept_macs",
)
OPTIONAL_ALLOCATION_KEYS: tuple[str, ...] = ("benefit_cls", "benefit_patch", "importance", "keep_ratio_target")
#: Fields every row must carry (for the tables and the keep-ratio heatmap).
REQUIRED_ALLOCATION_KEYS: tuple[str, ...] = ("step", "layer", "kind", "keep_ratio")
