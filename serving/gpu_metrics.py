"""GPU memory and utilisation gauges, read through NVML (`pynvml`, from nvidia-ml-py) when it is
installed and a GPU is present; on a CPU machine nothing is registered and nothing is imported."""

from __future__ import annotations

import logging
from typing import Any

from kvferry.serving.metrics import Registry

log = logging.getLogger(__name__)


def _nvml() -> Any | None:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() < 1:
            return None
    except Exception:  # no driver, no device
        return None
    return pynvml


def register_gpu_metrics(registry: Registry) -> bool:
    """Add kvferry_gpu_* gauges (one series per visible GPU); False when NVML is not available."""
    nvml = _nvml()
    if nvml is None:
        return False
    used = registry.gauge("kvferry_gpu_memory_used_bytes", "GPU memory in use (NVML)", ["gpu"])
    total = registry.gauge("kvferry_gpu_memory_total_bytes", "GPU memory in all (NVML)", ["gpu"])
    util = registry.gauge(
        "kvferry_gpu_utilization_ratio", "fraction of the last sample period the GPU was busy (NVML)", ["gpu"]
    )

    def collect() -> None:
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            used.set(memory.used, gpu=i)
            total.set(memory.total, gpu=i)
            util.set(nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0, gpu=i)

    registry.add_collector(collect)
    log.info("GPU metrics through NVML enabled")
    return True
