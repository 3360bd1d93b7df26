"""Leverage scores of keys: the sketched estimate compactor streams, and the exact QR reference.

The leverage of token i in a block K (b x d) is the i-th diagonal entry of the hat matrix
K (KᵀK)⁻¹ Kᵀ: how much of the block's key space only that token spans. Sketching K on the right
with a Gaussian Φ (d x k, entries N(0, 1/k)) gives X = KΦ, and o_i = x_iᵀ (XᵀX + ridge)⁻¹ x_i.
"""

from __future__ import annotations

import torch

SKETCH_SEED = 0x5EED  # Φ is fixed: the same keys always get the same scores


def gaussian_sketch(
    head_dim: int, sketch_size: int, device: torch.device | str = "cpu", seed: int = SKETCH_SEED
) -> torch.Tensor:
    """Φ [D, k] with i.i.d. N(0, 1/k) entries, drawn from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    phi = torch.randn(head_dim, sketch_size, generator=gen) / sketch_size**0.5
    return phi.to(device)


def sketched_leverage(
    keys: torch.Tensor, sketch: torch.Tensor, ridge: float = 1e-4, center: bool = True
) -> torch.Tensor:
    """keys [H, b, D] (one block per head), sketch [D, k] -> approximate leverage [H, b]."""
    k = keys.float()
    if center:
        k = k - k.mean(dim=1, keepdim=True)
    x = k @ sketch.float()  # [H, b, k]
    gram = x.transpose(1, 2) @ x  # [H, k, k]
    size = gram.shape[-1]
    # A ridge relative to the Gram's scale keeps a block with fewer tokens than k invertible.
    lift = ridge * gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp(min=1e-12)  # [H]
    gram = gram + lift[:, None, None] * torch.eye(size, device=gram.device)
    gram_inv = torch.cholesky_inverse(torch.linalg.cholesky(gram))  # [H, k, k], G is SPD
    return ((x @ gram_inv) * x).sum(dim=-1)  # [H, b]


def exact_leverage(keys: torch.Tensor, center: bool = True) -> torch.Tensor:
    """keys [b, D] with b >= D, full column rank -> exact leverage [b] (squared row norms of Q)."""
    k = keys.double()
    if center:
        k = k - k.mean(dim=0, keepdim=True)
    q, _ = torch.linalg.qr(k, mode="reduced")  # [b, D]
    return (q * q).sum(dim=-1).float()
