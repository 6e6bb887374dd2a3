"""Prometheus metrics of the node (optional HTTP endpoint, `metrics.port`; 0 = off).

Why a private registry: tests start several nodes and services in one process; a registry per
service keeps counters separate and avoids "duplicated timeseries" errors.
No patient identifiers in labels: only outcomes.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LAT_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


class Metrics:
    """All node metrics in one registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.instances = Counter(
            "molre_instances_received_total",
            "C-STORE requests by outcome (stored, duplicate, conflict, "
            "ignored, rejected, out_of_resources, error)",
            ["outcome"],
            registry=r,
        )
        self.store_seconds = Histogram(
            "molre_store_seconds",
            "Time to handle one C-STORE",
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5),
            registry=r,
        )
        self.associations = Counter("molre_associations_total", "Associations accepted", registry=r)
        self.associations_rejected = Counter(
            "molre_associations_rejected_total",
            "Associations rejected by access control",
            registry=r,
        )
        self.disk_full = Counter(
            "molre_disk_full_total",
            "Instances refused because free disk was below the watermark",
            registry=r,
        )
        self.series = Counter(
            "molre_series_total", "Series decisions (selected, skipped)", ["outcome"], registry=r
        )
        self.jobs = Counter(
            "molre_jobs_total",
            "Inference jobs (reported, retried, failed)",
            ["outcome"],
            registry=r,
        )
        self.queue_depth = Gauge("molre_queue_depth", "Series queued for inference", registry=r)
        self.inference_seconds = Histogram(
            "molre_inference_seconds",
            "Model time per series (read + preprocess + forward)",
            buckets=_LAT_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "molre_end_to_end_seconds",
            "First instance received -> report ready",
            buckets=_LAT_BUCKETS,
            registry=r,
        )
        self.exports = Counter(
            "molre_exports_total", "Export attempts (delivered, failed)", ["outcome"], registry=r
        )
        self.inference_ready = Gauge(
            "molre_inference_ready",
            "1 when every worker's inference engine has loaded the "
            "checkpoint, 0 while one is loading or failed to load "
            "(completed series wait in the queue meanwhile)",
            registry=r,
        )
        self.inference_load_seconds = Gauge(
            "molre_inference_load_seconds",
            "Start -> ready of the last checkpoint load of an "
            "inference engine (import torch, build, load)",
            registry=r,
        )
        self._server: Any = None

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose /metrics over HTTP on a daemon thread."""
        self._server = start_http_server(port, addr=host, registry=self.registry)

    def stop(self) -> None:
        if self._server is not None:
            try:
                server, thread = self._server
                server.shutdown()
                thread.join(5)
            except Exception:  # noqa: BLE001 - older prometheus_client returns no handle
                pass
            self._server = None


__all__ = ["Metrics"]
