"""GPU memory and utilisation gauges, read through NVML (`pynvml`, from nvidia-ml-py) when it is
installed and a GPU is present; on a CPU machine nothing is registered and nothing is imported."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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


class GpuCollector(Collector):
    """One series per visible GPU, read through NVML at scrape time."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml

    def collect(self) -> Iterator[Metric]:
        nvml = self.nvml
        used = GaugeMetricFamily("kvferry_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["gpu"])
        total = GaugeMetricFamily(
            "kvferry_gpu_memory_total_bytes", "GPU memory in all (NVML)", labels=["gpu"]
        )
        util = GaugeMetricFamily(
            "kvferry_gpu_utilization_ratio",
            "fraction of the last sample period the GPU was busy (NVML)",
            labels=["gpu"],
        )
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            used.add_metric([str(i)], memory.used)
            total.add_metric([str(i)], memory.total)
            util.add_metric([str(i)], nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
        yield from (used, total, util)


def register_gpu_metrics(registry: CollectorRegistry) -> bool:
    """Add the kvferry_gpu_* gauges; False when NVML is not available."""
    nvml = _nvml()
    if nvml is None:
        return False
    registry.register(GpuCollector(nvml))
    log.info("GPU metrics through NVML enabled")
    return True
