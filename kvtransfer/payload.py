"""Pages <-> the bytes a transport moves: [N, 2, page_size, head_dim] pool pages, raw, in travel order."""

from __future__ import annotations

import torch

from kvferry.kvtransfer.manifest import ModelSpec


def pages_to_bytes(pages: torch.Tensor) -> memoryview:
    """Host bytes of gathered pages (copied to CPU when they live on a GPU)."""
    host = pages.detach().to("cpu").contiguous()
    if host.numel() == 0:
        return memoryview(b"")
    return memoryview(host.view(torch.uint8).numpy()).cast("B")


def bytes_to_pages(buffer: bytearray, spec: ModelSpec, num_pages: int) -> torch.Tensor:
    """A [N, 2, page_size, head_dim] view over received bytes (no copy)."""
    shape = (num_pages, 2, spec.page_size, spec.head_dim)
    if num_pages == 0:
        return torch.empty(shape, dtype=spec.torch_dtype)
    return torch.frombuffer(buffer, dtype=torch.uint8).view(spec.torch_dtype).view(shape)
