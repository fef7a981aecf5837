"""GPU memory and utilisation through NVML, for the agent's /metrics.

NVML (`nvidia-ml-py`, imported as `pynvml`) is optional: where the binding is not
installed, or no NVIDIA driver answers (the CPU demo, a laptop), the collector
yields nothing and the `sglang_ha_gpu_*` families are simply absent. Read at
scrape time, like the HA metrics, so the numbers are never stale.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


def load_nvml() -> ModuleType | None:
    """pynvml with NVML initialised, or None where there is no usable GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() < 1:
            return None
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        log.debug("NVML unavailable, no GPU metrics: %s", exc)
        return None
    return pynvml


class GpuCollector(Collector):
    """`sglang_ha_gpu_*` for every GPU this container sees (NVIDIA_VISIBLE_DEVICES)."""

    def __init__(self, node: str, nvml: ModuleType | None) -> None:
        self.node = node
        self.nvml = nvml
        self.read_errors = 0

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        nvml = self.nvml
        if nvml is None:
            return
        labels = ["node", "gpu"]
        used = GaugeMetricFamily(
            "sglang_ha_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=labels
        )
        total = GaugeMetricFamily(
            "sglang_ha_gpu_memory_total_bytes", "GPU memory installed (NVML).", labels=labels
        )
        util = GaugeMetricFamily(
            "sglang_ha_gpu_utilization_ratio",
            "Share of the last sample period in which a kernel ran (NVML), 0 to 1.",
            labels=labels,
        )
        info = GaugeMetricFamily(
            "sglang_ha_gpu_info",
            "1 per GPU, naming its model and UUID.",
            labels=[*labels, "name", "uuid"],
        )
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception as exc:
            count = 0
            self._failed(exc)
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                name, uuid = (
                    _text(nvml.nvmlDeviceGetName(handle)),
                    _text(nvml.nvmlDeviceGetUUID(handle)),
                )
            except Exception as exc:  # a GPU that fell off the bus must not break /metrics
                self._failed(exc)
                continue
            key = [self.node, str(index)]
            used.add_metric(key, float(memory.used))
            total.add_metric(key, float(memory.total))
            util.add_metric(key, float(rates.gpu) / 100.0)
            info.add_metric([*key, name, uuid], 1.0)
        yield used
        yield total
        yield util
        yield info
        errors = CounterMetricFamily(
            "sglang_ha_gpu_read_errors", "NVML reads that failed at scrape time.", labels=["node"]
        )
        errors.add_metric([self.node], float(self.read_errors))
        yield errors

    def _failed(self, exc: Exception) -> None:
        self.read_errors += 1
        log.warning("NVML read failed: %s", exc)


def _text(value: Any) -> str:
    # Older pynvml versions return bytes, newer ones str.
    return value.decode() if isinstance(value, bytes) else str(value)
