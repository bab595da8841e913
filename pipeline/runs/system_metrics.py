"""System metrics (CPU, memory, disk, network, GPU) sampled into the run's journal, so that they
reach MLflow by the same resilient path as the training metrics.

The measuring is MLflow's own (its CPU, disk, network and GPU monitors, the same names under
`system/`); only the logging is ours: MLflow's monitor thread stops for good at the first
failed call to the server, and would lose the metrics of an outage.
"""

from __future__ import annotations

import threading

from pipeline.runs.journal import Journal


def _monitors() -> list:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    found = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        found.append(GPUMonitor())
    except Exception:  # no pynvml or no NVIDIA driver: no GPU metrics
        pass
    return found


class SystemSampler(threading.Thread):
    """Every `interval` s, one `system/...` metrics entry in the journal (step = sample number,
    continued from the journal's last one on resume)."""

    def __init__(self, journal: Journal, interval: float) -> None:
        super().__init__(name="system-metrics", daemon=True)
        self.journal, self.interval = journal, interval
        self._stopping = threading.Event()
        history = journal.history("system/cpu_utilization_percentage")
        self.step = history[-1][0] + 1 if history else 0

    def run(self) -> None:
        monitors = _monitors()
        while not self._stopping.wait(self.interval):
            values: dict[str, float] = {}
            for monitor in monitors:
                try:
                    monitor.collect_metrics()
                    values.update(monitor.aggregate_metrics())
                    monitor.clear_metrics()
                except Exception:  # a monitor that fails once is left out of this sample
                    continue
            if values:
                self.journal.append(
                    "metrics", step=self.step, values={f"system/{k}": v for k, v in values.items()}
                )
                self.step += 1

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=5)
