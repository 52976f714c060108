"""`fxforge::linear_sparse`: y = x @ Sᵀ for a sparse weight S (N, K) given as COO entries.

Emitted by `quantize(method=easyquant)` next to the quantized linear: the few outlier weights
(beyond n·σ of their row) are kept in full precision as S = W - Ŵ at their positions and added
back at run time, y = linear_wq(x, ...) + linear_sparse(x, ...).

    indices  int64 (2, nnz)   rows (output features) and columns (input features)
    values   float (nnz,)
    out_features: N

The reference scatters S densely and multiplies in float32 (the emulated path).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fxforge.ir.ops.registry import SampleInput, define_op


def check_sparse_args(k: int, indices: Tensor, values: Tensor, out_features: int) -> None:
    """Raise a ValueError naming the problem if the COO entries do not fit an (N, K) matrix."""
    if indices.dim() != 2 or indices.shape[0] != 2 or indices.dtype != torch.int64:
        raise ValueError(f"fxforge::linear_sparse: indices must be int64 (2, nnz), got {indices.dtype} "
                         f"{tuple(indices.shape)}")
    if values.dim() != 1 or values.shape[0] != indices.shape[1]:
        raise ValueError(f"fxforge::linear_sparse: values must be (nnz,) = ({indices.shape[1]},), got "
                         f"{tuple(values.shape)}")


def dense_weight(indices: Tensor, values: Tensor, out_features: int, in_features: int) -> Tensor:
    """S as a dense float32 (N, K) matrix."""
    weight = torch.zeros(out_features, in_features, dtype=torch.float32, device=values.device)
    return weight.index_put((indices[0], indices[1]), values.to(torch.float32), accumulate=True)


@define_op("linear_sparse")
def linear_sparse(x: Tensor, indices: Tensor, values: Tensor, out_features: int) -> Tensor:
    """Reference: x @ Sᵀ in float32, returned in x's dtype."""
    check_sparse_args(x.shape[-1], indices, values, out_features)
    return F.linear(x.to(torch.float32), dense_weight(indices, values, out_features, x.shape[-1])).to(x.dtype)


@linear_sparse.register_fake
def _(x: Tensor, indices: Tensor, values: Tensor, out_features: int) -> Tensor:
    check_sparse_args(x.shape[-1], indices, values, out_features)
    return x.new_empty((*x.shape[:-1], out_features))


def sample_inputs() -> list[SampleInput]:
    """A few COO entries including a repeated position (entries add up) and a single token."""
    indices = torch.tensor([[0, 3, 5, 3, 7], [1, 0, 15, 0, 9]])
    return [
        SampleInput("nnz=5 repeated entry", (torch.randn(2, 3, 16), indices, torch.randn(5), 8)),
        SampleInput("nnz=1 one token", (torch.randn(1, 4), torch.tensor([[2], [3]]), torch.randn(1), 3)),
    ]
