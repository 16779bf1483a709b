"""Nearest-row search with bfloat16 products: candidates in bfloat16, the choice in float32.

On a CPU with AVX-512 BF16 or AMX a bfloat16 matrix product runs 2 to 4 times faster than
a float32 one, but its output is rounded to bfloat16 (8 bits: 0.004 near 1), so its
largest entry is only probably the nearest row. The few largest are therefore kept and
their float32 products compared: the row chosen is the float32 nearest unless more than
``candidates`` rows lie within the rounding of it, and then one almost as near. A
distance computed from the chosen row can only grow, and only at such near-ties. Used by
AnomalyCLIP's reference search when its model runs in bfloat16 (MuSc keeps float32 products
on a CPU: see :func:`anomalyclip.methods.musc.model._rounded`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from anomalyclip.utils.precision import native_bfloat16

__all__ = ["BFLOAT16_CANDIDATES", "bfloat16_pays", "nearest_rows"]

BFLOAT16_CANDIDATES = 2


def bfloat16_pays(device: torch.device) -> bool:
    """Whether bfloat16 products are native (faster than float32) on ``device``."""
    return native_bfloat16("cuda" if device.type == "cuda" else "cpu")


def nearest_rows(
    queries: Tensor, references: Tensor, candidates: int = BFLOAT16_CANDIDATES
) -> tuple[Tensor, Tensor]:
    """(n,) float32 largest product of each query with a reference row, and (n,) its row.

    ``queries`` (n, C) and ``references`` (m, C) in float32; ``references`` may also be
    given already rounded to bfloat16 as ``references.bfloat16()`` is reused by callers
    looping over queries. The products run in bfloat16, the ``candidates`` largest are
    recomputed in float32 and the largest of those returned.
    """
    queries = queries.float()
    rough = queries.bfloat16() @ references.bfloat16().T
    kept = min(candidates, references.shape[0])
    rows = rough.topk(kept, dim=1).indices  # (n, kept)
    exact = torch.einsum("nc,nkc->nk", queries, references[rows].float())
    best, where = exact.max(dim=1)
    return best, rows.gather(1, where[:, None])[:, 0]
