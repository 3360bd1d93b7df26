"""Host-to-device copies that do not make the host wait for the GPU.

`cpu_tensor.to(cuda)` from pageable memory synchronises with the stream: the host waits until every
kernel queued before it has run. One such copy per prefill chunk kept the host from running ahead
into the next chunk, so the GPU sat idle while the host prepared each chunk's first layers. Staged
through pinned memory, the copy is queued like a kernel and the host goes on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device`; from the host to a GPU without a wait (a pinned staging copy, then an
    asynchronous copy that the pinned block outlives: torch keeps it until the copy has run)."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    if t.is_pinned():  # pin_memory() would return t itself, which the caller may change before the copy
        t = t.clone()
    return t.pin_memory().to(device, non_blocking=True)


def upload_values(values: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A Python list of numbers as a tensor on `device`, without a wait."""
    return upload(torch.tensor(values, dtype=dtype), device)
