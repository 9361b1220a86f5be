"""Inside a sub-block: which units go, and the soft masks while pruning.

Units are the elements of P3B's gates (:data:`P3B_GROUPS`): attention ``in``, ``head_dim``,
``out`` and MLP ``in``, ``hidden``, ``out`` (the whole-head gate stays at 1). A
:class:`UnitLayout` lays the units of some sub-blocks end to end, so scores, ranks and masks
are flat vectors.

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
from p3b_search.surgery import BranchSizes, GateSet, ModelAdapter, SubBlock

#: The gates P3B prunes, per sub-block kind, in concatenation order.
P3B_GROUPS: dict[str, tuple[str, ...]] = {"attn": ("in", "head_dim", "out"), "mlp": ("in", "hidden", "out")}
MAX_WALK_ROUNDS = 30
#: memoised sub-block costs per layout (see :meth:`UnitLayout.params_at`); cleared when full
PARAMS_CACHE_SIZE = 65536
SOFT_MASK_LOGIT = math.log(9.0)


@dataclass(frozen=True)
class Segment:
    """One gate's units inside a flat layout: ``[start, start + size)``."""

    sub_block: SubBlock
    group: str
    start: int
    size: int

    @property
    def gate_type(self) -> str:
        """``attn.in``, ``mlp.hidden``, ... (the key of the gate scales)."""
        return f"{self.sub_block.kind}.{self.group}"

    @property
    def span(self) -> slice:
        return slice(self.start, self.start + self.size)


class UnitLayout:
    """The P3B gate units of ``sub_blocks`` laid end to end (sub-block order, then
    :data:`P3B_GROUPS` order), with the cost accounting of their kept widths."""

    def __init__(self, adapter: ModelAdapter, sub_blocks: list[SubBlock]):
        self.adapter = adapter
        self.sub_blocks = list(sub_blocks)
        self._params_cache: dict[tuple[int, BranchSizes], float] = {}
        self.segments: list[Segment] = []
        start = 0
        for sb in self.sub_blocks:
            for group in P3B_GROUPS[sb.kind]:
                size = sb.groups[group]
                self.segments.append(Segment(sb, group, start, size))
                start += size
        self.size = start

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    def block_span(self, index: int) -> slice:
        """The flat range of sub-block ``index``'s units."""
        own = [s for s in self.segments if s.sub_block.index == index]
        return slice(own[0].start, own[-1].start + own[-1].size)

    def segment_ids(self, by_gate_type: bool = False) -> torch.Tensor:
        """Per unit, the id of its gate (or of its gate type across sub-blocks) (N,) long."""
        keys = [s.gate_type if by_gate_type else (s.sub_block.index, s.group) for s in self.segments]
        ids = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        return torch.cat([torch.full((s.size,), ids[key], dtype=torch.long) for s, key in zip(self.segments, keys)])

    def per_unit(self, per_gate_type: dict[str, float]) -> torch.Tensor:
        """A per-gate-type value broadcast to every unit (N,) float64."""
        return torch.cat([torch.full((s.size,), float(per_gate_type[s.gate_type]), dtype=torch.float64)
                          for s in self.segments])

    def split(self, flat: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
        """A flat per-unit vector as ``{sub-block: {group: vector}}``."""
        out: dict[int, dict[str, torch.Tensor]] = {}
        for s in self.segments:
            out.setdefault(s.sub_block.index, {})[s.group] = flat[s.span]
        return out

    def gather(self, per_gate: dict[int, dict[str, torch.Tensor]]) -> torch.Tensor:
        """Inverse of :meth:`split` (float64, on the CPU)."""
        return torch.cat([per_gate[s.sub_block.index][s.group].detach().cpu().to(torch.float64) for s in self.segments])

    def kept_params_and_costs(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For a hard mask ``kept`` (N,) bool: parameters each sub-block keeps (its
        ``shrink`` size: 0 when a group is emptied) (len(sub_blocks),) float64, and the
        parameters each unit removes at these widths (N,) float64."""
        params, costs = [], torch.empty(self.size, dtype=torch.float64)
        by_block: dict[int, list[Segment]] = {}
        for s in self.segments:
            by_block.setdefault(s.sub_block.index, []).append(s)
        for sb in self.sub_blocks:
            own = by_block[sb.index]
            counts = {s.group: int(kept[s.span].sum()) for s in own}
            sizes = _sizes(sb, counts)
            dead = any(n == 0 for n in counts.values())
            full = self.params_at(sb, sizes)
            params.append(0.0 if dead else full)
            for s in own:
                costs[s.span] = full - self.params_at(sb, _one_less(sizes, s.group))
        return torch.tensor(params, dtype=torch.float64), costs

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


def _sizes(sb: SubBlock, counts: dict[str, int]) -> BranchSizes:
    """Widths of ``sb`` with ``counts`` kept units per P3B group (whole heads always kept)."""
    dense = sb.dense_sizes()
    if sb.kind == "attn":
        return replace(dense, c_in=counts["in"], head_dim=counts["head_dim"], c_out=counts["out"])
    return replace(dense, c_in=counts["in"], hidden=counts["hidden"], c_out=counts["out"])


_SIZE_FIELD = {"in": "c_in", "out": "c_out", "head_dim": "head_dim", "hidden": "hidden", "heads": "heads"}


def _one_less(sizes: BranchSizes, group: str) -> BranchSizes:
    """``sizes`` with one unit fewer in ``group``: the parameters a unit removes are the cost
    difference. The cost is bilinear in the widths, so this is exact: e.g. a qkv head-dim unit
    removes 3H rows of qkv (``c_in`` weights + bias each) and H columns of proj (``c_out`` each)."""
    return replace(sizes, **{_SIZE_FIELD[group]: sizes.group_size(group) - 1})


def taylor_terms(gates: GateSet, layout: UnitLayout) -> torch.Tensor:
    """``(m dL/dm)^2`` for every unit of ``layout`` from the gates' current gradients
    (zero where a gate has no gradient) (N,) float64 on the gates' device."""
    parts = []
    for s in layout:
        gate = gates.values[s.sub_block.index][s.group]
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
    ``kept`` hard mask (N,) bool, ``kept_params`` per sub-block of the layout."""

    order: torch.Tensor
    removed: int
    kept: torch.Tensor
    kept_params: torch.Tensor


def walk_threshold(layout: UnitLayout, ranks: torch.Tensor, target_params: float,
                   max_rounds: int = MAX_WALK_ROUNDS) -> Selection:
    """Remove the ``k`` lowest-ranked units of ``layout`` so that the kept parameters of its
    sub-blocks come closest to ``target_params`` (see module docstring)."""
    order = torch.sort(ranks, stable=True).indices

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
        k_next = min(int(torch.searchsorted(relative, torch.tensor([deficit], dtype=torch.float64))), layout.size)
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
            if 0 <= k <= layout.size and rounds < max_rounds:
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
