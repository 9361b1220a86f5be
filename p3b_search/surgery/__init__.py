"""Model surgery on timm vision transformers: sub-blocks, gates, shrinking, arch specs."""
from p3b_search.surgery.adapters import BranchSizes, ModelAdapter, SubBlock, get_adapter
from p3b_search.surgery.arch_spec import ArchSpec
from p3b_search.surgery.gates import (
    BlockMasks,
    GateSet,
    ResidualMasks,
    attach_gates,
    canonical_masks,
    full_masks,
    random_masks,
    random_residual,
)
from p3b_search.surgery.shrink import SlicedLinear, shrink_model

__all__ = [
    "ArchSpec", "BlockMasks", "BranchSizes", "GateSet", "ModelAdapter", "ResidualMasks", "SlicedLinear", "SubBlock",
    "attach_gates", "canonical_masks", "full_masks", "get_adapter", "random_masks", "random_residual", "shrink_model",
]
