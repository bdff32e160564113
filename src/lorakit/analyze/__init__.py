"""The LoRA paper's Section 7 analyses as tools: spectrum and effective rank of each update ``ΔW = s·B·A``,
subspace similarity φ between two adapters (Figure 3), amplification of W0's directions (Table 7).

    import lorakit.analyze as la
    result = la.run_analysis(["runs/r8/adapter", "runs/r64/adapter"], model="path/to/base", output_dir="out")
"""

from .measures import (
    amplification,
    delta_weight,
    effective_rank,
    energy_rank,
    left_singular_basis,
    random_similarity,
    right_singular_basis,
    singular_values,
    subspace_similarity,
)
from .report import analyze_adapter, base_matrix, compare_adapters, read_updates, run_analysis, summary_rows

__all__ = [
    "amplification", "analyze_adapter", "base_matrix", "compare_adapters", "delta_weight", "effective_rank",
    "energy_rank", "left_singular_basis", "random_similarity", "read_updates", "right_singular_basis",
    "run_analysis", "singular_values", "subspace_similarity", "summary_rows",
]
