"""Inside a sub-block: which units go, and the soft masks while pruning.

Units are the elements of P3B's gates (:data:`P3B_GROUPS`): attention ``in``, ``head_dim``,
``out`` and MLP ``in``, ``hidden``, ``out`` (the whole-head gate stays at 1). With a shared
residual (:data:`SHARED_GROUPS`) the sub-blocks keep their inner gates (``head_dim``,
``hidden``) and one residual gate per stage serves every input and output; its channels are
units too, each costing every row, column and norm parameter it touches across the model
(the sub-blocks' linears and norms, and outside them the embeddings, merging layers, final
norm and heads). A :class:`UnitLayout` lays the units of some sub-blocks (and the residual's)
end to end, so scores, ranks and masks are flat vectors.

* Score: squared Taylor ``(m dL/dm)^2`` per optimizer step (:func:`taylor_terms`), averaged over
  a window by the caller.
* Rank: within each gate, ``r = s_g (rank(S) + 1) / |g|`` (:func:`normalised_ranks`).
* Threshold: sort ascending and walk the cumulative parameter cost of the units (a channel
  costs the rows/columns it removes in the neighbouring linear layers, so x3H for the qkv
  head dim and xH for proj) until the removed count reaches ``kept_now - target``. Costs
  depend on the other gates' kept widths, so the walk is repeated from the new threshold with
  new costs, stopping when the distance to the target stops shrinking; as each walk removes
  units until the target is passed, the neighbouring thresholds are then tried while they come
  closer (at most 30 evaluations in all). The closest threshold wins (:func:`walk_threshold`). ``kept_now`` starts from the dense
  sub-block: masks are rebuilt from scratch at every update, so pruned units can come back.
* Soft mask: ``m = sigmoid(ln 9 (pos - t*) / (N tau))``, ``pos`` = sorted position 1..N and
  ``t* = k + 1/2`` for ``k`` removed units, so exactly the ``k`` lowest fall below 0.5 and
  a unit ``N tau`` positions above the threshold has ``m = 0.9``; ``tau = 0`` gives hard masks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator

import torch

from p3b_search.cost import sub_block_cost
from p3b_search.method_specs.gated import RESIDUAL
from p3b_search.surgery import BranchSizes, GateSet, ModelAdapter, SubBlock
from p3b_search.surgery.gates import ResidualMode

#: The gates P3B prunes, per sub-block kind, in concatenation order.
P3B_GROUPS: dict[str, tuple[str, ...]] = {"attn": ("in", "head_dim", "out"), "mlp": ("in", "hidden", "out")}
#: The sub-blocks' gates with a shared residual (their inputs and outputs are the residual's).
SHARED_GROUPS: dict[str, tuple[str, ...]] = {"attn": ("head_dim",), "mlp": ("hidden",)}
MAX_WALK_ROUNDS = 30
#: memoised sub-block costs per layout (see :meth:`UnitLayout.params_at`); cleared when full
PARAMS_CACHE_SIZE = 65536
SOFT_MASK_LOGIT = math.log(9.0)


@dataclass(frozen=True)
class Segment:
    """One gate's units inside a flat layout: ``[start, start + size)``; ``sub_block`` None for
    the shared residual of stream ``stage``."""

    sub_block: SubBlock | None
    group: str
    start: int
    size: int
    stage: int = 0

    @property
    def gate_type(self) -> str:
        """``attn.in``, ``mlp.hidden``, ..., ``residual`` (the key of the gate scales)."""
        return RESIDUAL if self.sub_block is None else f"{self.sub_block.kind}.{self.group}"

    @property
    def gate_key(self) -> tuple[int | str, str | int]:
        """Which gate the units belong to: (sub-block index, group), or (``residual``, stage)."""
        return (RESIDUAL, self.stage) if self.sub_block is None else (self.sub_block.index, self.group)

    @property
    def span(self) -> slice:
        return slice(self.start, self.start + self.size)


class UnitLayout:
    """The gate units of ``sub_blocks`` laid end to end, with the cost accounting of their kept widths.

    ``residual="per-block"``: each sub-block's :data:`P3B_GROUPS` (sub-block order, then group
    order). ``"shared"``: first the residual's channels, one segment per stage of the model,
    then each sub-block's :data:`SHARED_GROUPS`; the cost of a residual channel is every
    parameter it holds, in the sub-blocks and outside them. With ``residual_units=False`` the
    residual's channels are no units of the layout: its widths are fixed by :meth:`fix_widths`.
    """

    def __init__(self, adapter: ModelAdapter, sub_blocks: list[SubBlock], residual: ResidualMode = "per-block",
                 residual_units: bool = True):
        self.adapter = adapter
        self.sub_blocks = list(sub_blocks)
        self.shared = residual == "shared"
        #: stage -> residual width when the residual's channels are no units here (:meth:`fix_widths`)
        self.widths: dict[int, int] | None = None
        self._params_cache: dict[tuple[int, BranchSizes], float] = {}
        self._outside_cache: dict[tuple[tuple[int, int], ...], float] = {}
        self.segments: list[Segment] = []
        start = 0
        if self.shared and residual_units:
            for stage, width in adapter.stream_widths().items():
                self.segments.append(Segment(None, RESIDUAL, start, width, stage))
                start += width
        for sb in self.sub_blocks:
            for group in (SHARED_GROUPS if self.shared else P3B_GROUPS)[sb.kind]:
                size = sb.groups[group]
                self.segments.append(Segment(sb, group, start, size, sb.stage))
                start += size
        self.size = start

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    @property
    def residual_segments(self) -> list[Segment]:
        """The shared residual's segments (one per stage; none per block or at fixed widths)."""
        return [s for s in self.segments if s.sub_block is None]

    def fix_widths(self, widths: dict[int, int]) -> "UnitLayout":
        """Fix the shared residual at ``widths`` (stage -> kept channels) for a layout whose units
        are the sub-blocks' inner ones only; returns the layout."""
        if not self.shared or self.residual_segments:
            raise ValueError("fix_widths: only a shared residual layout without residual units has fixed widths")
        self.widths = dict(widths)
        return self

    def block_span(self, index: int) -> slice:
        """The flat range of sub-block ``index``'s units."""
        own = [s for s in self.segments if s.sub_block is not None and s.sub_block.index == index]
        return slice(own[0].start, own[-1].start + own[-1].size)

    def segment_ids(self, by_gate_type: bool = False) -> torch.Tensor:
        """Per unit, the id of its gate (or of its gate type across sub-blocks) (N,) long."""
        keys = [s.gate_type if by_gate_type else s.gate_key for s in self.segments]
        ids = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        return torch.cat([torch.full((s.size,), ids[key], dtype=torch.long) for s, key in zip(self.segments, keys)])

    def per_unit(self, per_gate_type: dict[str, float]) -> torch.Tensor:
        """A per-gate-type value broadcast to every unit (N,) float64."""
        return torch.cat([torch.full((s.size,), float(per_gate_type[s.gate_type]), dtype=torch.float64)
                          for s in self.segments])

    def split(self, flat: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
        """A flat per-unit vector as ``{sub-block: {group: vector}}`` (the residual's aside)."""
        out: dict[int, dict[str, torch.Tensor]] = {}
        for s in self.segments:
            if s.sub_block is not None:
                out.setdefault(s.sub_block.index, {})[s.group] = flat[s.span]
        return out

    def split_residual(self, flat: torch.Tensor) -> dict[int, torch.Tensor]:
        """The residual's part of a flat per-unit vector, ``{stage: vector}``."""
        return {s.stage: flat[s.span] for s in self.residual_segments}

    def gather(self, per_gate: dict[int, dict[str, torch.Tensor]],
               residual: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Inverse of :meth:`split` (and :meth:`split_residual`) (float64, on the CPU)."""
        return torch.cat([(residual[s.stage] if s.sub_block is None else per_gate[s.sub_block.index][s.group])
                          .detach().cpu().to(torch.float64) for s in self.segments])

    def kept_widths(self, kept: torch.Tensor) -> dict[int, int] | None:
        """The residual widths (stage -> kept channels) under hard mask ``kept`` (N,) bool: its
        residual units', or the fixed widths; None per block."""
        if not self.shared:
            return None
        if self.residual_segments:
            return {s.stage: int(kept[s.span].sum()) for s in self.residual_segments}
        if self.widths is None:
            raise ValueError("the shared residual's widths are not fixed: call fix_widths first")
        return self.widths

    def kept_params_and_costs(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For a hard mask ``kept`` (N,) bool: parameters each sub-block keeps (its ``shrink``
        size: 0 when a group is emptied) (len(sub_blocks),) float64 -- followed, when the
        layout holds the residual's units, by the parameters outside the sub-blocks that the
        residual widths cut -- and the parameters each unit removes at these widths (N,) float64."""
        params, costs = [], torch.empty(self.size, dtype=torch.float64)
        widths = self.kept_widths(kept)
        residual_units = self.residual_segments
        residual_costs = {s.stage: 0.0 for s in residual_units}
        by_block: dict[int, list[Segment]] = {}
        for s in self.segments:
            if s.sub_block is not None:
                by_block.setdefault(s.sub_block.index, []).append(s)
        for sb in self.sub_blocks:
            own = by_block[sb.index]
            counts = {s.group: int(kept[s.span].sum()) for s in own}
            sizes = _sizes(sb, counts, widths)
            dead = any(n == 0 for n in counts.values()) or (widths is not None and widths[sb.stage] == 0)
            full = self.params_at(sb, sizes)
            params.append(0.0 if dead else full)
            for s in own:
                costs[s.span] = full - self.params_at(sb, _one_less(sizes, s.group))
            if residual_units and not dead:
                residual_costs[sb.stage] += full - self.params_at(sb, _one_less(sizes, RESIDUAL))
        if residual_units:
            outside = self.outside_params(widths)
            params.append(outside)
            for s in residual_units:
                fewer = {**widths, s.stage: widths[s.stage] - 1}
                costs[s.span] = residual_costs[s.stage] + outside - self.outside_params(fewer)
        return torch.tensor(params, dtype=torch.float64), costs

    def block_params(self, widths: dict[int, int] | None = None) -> torch.Tensor:
        """W_j: parameters of each sub-block with its units all kept -- with a shared residual
        at ``widths`` (stage -> kept channels) (len(sub_blocks),) float64."""
        groups = SHARED_GROUPS if widths is not None else P3B_GROUPS
        return torch.tensor([self.params_at(sb, _sizes(sb, {g: sb.groups[g] for g in groups[sb.kind]}, widths))
                             for sb in self.sub_blocks], dtype=torch.float64)

    def params_at(self, sb: SubBlock, sizes: BranchSizes) -> float:
        """Parameters of ``sb`` at widths ``sizes`` (``sub_block_cost``), memoised: threshold walks
        revisit the same widths within and across mask updates, and during the prune stage the
        modules (hence the cost of given widths) do not change. At most
        :data:`PARAMS_CACHE_SIZE` entries are kept."""
        key = (sb.index, sizes)
        value = self._params_cache.get(key)
        if value is None:
            if len(self._params_cache) >= PARAMS_CACHE_SIZE:
                self._params_cache.clear()
            value = self._params_cache[key] = float(sub_block_cost(self.adapter, sb, sizes).params)
        return value

    def outside_params(self, widths: dict[int, int]) -> float:
        """Parameters outside the sub-blocks that residual ``widths`` (stage -> channels) keep, memoised."""
        key = tuple(sorted(widths.items()))
        value = self._outside_cache.get(key)
        if value is None:
            if len(self._outside_cache) >= PARAMS_CACHE_SIZE:
                self._outside_cache.clear()
            value = self._outside_cache[key] = float(self.adapter.outside_params(widths))
        return value


def _sizes(sb: SubBlock, counts: dict[str, int], widths: dict[int, int] | None = None) -> BranchSizes:
    """Widths of ``sb`` with ``counts`` kept units per gate group (whole heads always kept);
    ``widths``: a shared residual's kept channels by stage (input, output and norm widths)."""
    dense = sb.dense_sizes()
    if widths is None:
        base = replace(dense, c_in=counts["in"], c_out=counts["out"])
    else:
        width = widths[sb.stage]
        base = replace(dense, c_in=width, c_out=width, norm=width)
    if sb.kind == "attn":
        return replace(base, head_dim=counts["head_dim"])
    return replace(base, hidden=counts["hidden"])


_SIZE_FIELD = {"in": "c_in", "out": "c_out", "head_dim": "head_dim", "hidden": "hidden", "heads": "heads"}


def _one_less(sizes: BranchSizes, group: str) -> BranchSizes:
    """``sizes`` with one unit fewer in ``group``: the parameters a unit removes are the cost
    difference. The cost is bilinear in the widths, so this is exact: e.g. a qkv head-dim unit
    removes 3H rows of qkv (``c_in`` weights + bias each) and H columns of proj (``c_out`` each);
    a shared residual channel one input, one output and one norm channel."""
    if group == RESIDUAL:
        return replace(sizes, c_in=sizes.c_in - 1, c_out=sizes.c_out - 1, norm=sizes.norm - 1)
    return replace(sizes, **{_SIZE_FIELD[group]: sizes.group_size(group) - 1})


def segment_gate(gates: GateSet, segment: Segment) -> torch.Tensor:
    """The gate tensor whose units ``segment`` lays out."""
    if segment.sub_block is None:
        return gates.residual[segment.stage]
    return gates.values[segment.sub_block.index][segment.group]


def taylor_terms(gates: GateSet, layout: UnitLayout) -> torch.Tensor:
    """``(m dL/dm)^2`` for every unit of ``layout`` from the gates' current gradients
    (zero where a gate has no gradient) (N,) float64 on the gates' device."""
    parts = []
    for s in layout:
        gate = segment_gate(gates, s)
        grad = gate.grad
        parts.append(torch.zeros_like(gate) if grad is None else (gate.detach() * grad).square())
    return torch.cat(parts).to(torch.float64)


def normalised_ranks(scores: torch.Tensor, segment_ids: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``s_g (rank(S_e) + 1) / |g|`` with ranks 0.. (ascending score) within each segment id.

    ``scores`` (N,), ``segment_ids`` (N,) long, ``scales`` (N,) the gate scale of each unit.
    Ties keep layout order (stable sort)."""
    scores = scores.detach().cpu().to(torch.float64)
    segment_ids = segment_ids.cpu()
    ranks = torch.empty_like(scores)
    for sid in torch.unique(segment_ids):
        where = (segment_ids == sid).nonzero().flatten()
        order = torch.sort(scores[where], stable=True).indices
        rank = torch.empty(len(where), dtype=torch.float64)
        rank[order] = torch.arange(1, len(where) + 1, dtype=torch.float64)
        ranks[where] = rank / len(where)
    return ranks * scales.cpu().to(torch.float64)


@dataclass(frozen=True)
class Selection:
    """Result of a threshold walk: ``order`` (units ascending by rank), ``removed`` k,
    ``kept`` hard mask (N,) bool, ``kept_params`` per sub-block of the layout (then, when the
    layout holds a shared residual's units, its parameters outside the sub-blocks)."""

    order: torch.Tensor
    removed: int
    kept: torch.Tensor
    kept_params: torch.Tensor


def walk_threshold(layout: UnitLayout, ranks: torch.Tensor, target_params: float,
                   max_rounds: int = MAX_WALK_ROUNDS) -> Selection:
    """Remove the ``k`` lowest-ranked units of ``layout`` so that the kept parameters of its
    sub-blocks come closest to ``target_params`` (see module docstring). Units ranked ``inf``
    are never removed."""
    order = torch.sort(ranks, stable=True).indices
    removable = layout.size - int(torch.isinf(ranks).sum())

    def evaluate(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kept = torch.ones(layout.size, dtype=torch.bool)
        kept[order[:k]] = False
        params, costs = layout.kept_params_and_costs(kept)
        return kept, params, costs[order]

    k = 0
    kept, params, costs = evaluate(k)
    best = Selection(order, k, kept, params)
    best_gap = abs(float(params.sum()) - target_params)
    rounds = 0
    while rounds < max_rounds:  # walk the cumulative cost with the costs of the current widths
        rounds += 1
        deficit = float(params.sum()) - target_params
        cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), costs.cumsum(0)])
        relative = cumulative - cumulative[k]
        k_next = min(int(torch.searchsorted(relative, torch.tensor([deficit], dtype=torch.float64))), removable)
        if k_next == k:
            break
        k = k_next
        kept, params, costs = evaluate(k)
        gap = abs(float(params.sum()) - target_params)
        if gap >= best_gap:
            break
        best, best_gap = Selection(order, k, kept, params), gap
    moved = True
    while moved and rounds < max_rounds:  # the walk stops past the target: try the neighbours
        moved = False
        for k in (best.removed - 1, best.removed + 1):
            if 0 <= k <= removable and rounds < max_rounds:
                rounds += 1
                kept, params, _ = evaluate(k)
                gap = abs(float(params.sum()) - target_params)
                if gap < best_gap:
                    best, best_gap, moved = Selection(order, k, kept, params), gap, True
                    break
    return best


def soft_mask(selection: Selection, tau: float) -> torch.Tensor:
    """Gate values ``sigmoid(ln 9 (pos - t*) / (N tau))`` (N,) float32 for ``t* = k + 1/2``;
    ``tau = 0``: the hard mask as 0/1."""
    n = selection.order.numel()
    if tau <= 0:
        return selection.kept.to(torch.float32)
    positions = torch.empty(n, dtype=torch.float64)
    positions[selection.order] = torch.arange(1, n + 1, dtype=torch.float64)
    values = torch.sigmoid(SOFT_MASK_LOGIT * (positions - (selection.removed + 0.5)) / (n * tau))
    return values.to(torch.float32)


@dataclass(frozen=True)
class TauSchedule:
    """``tau = tau_max`` until ``sparse_step``, then linear to ``tau_min`` at ``final_step``."""

    sparse_step: int
    final_step: int
    tau_max: float
    tau_min: float

    def __call__(self, step: int) -> float:
        if self.final_step > self.sparse_step:
            progress = min(1.0, max(0.0, (step - self.sparse_step) / (self.final_step - self.sparse_step)))
        else:
            progress = 1.0
        return progress * self.tau_min + (1.0 - progress) * self.tau_max
