"""What the aggregator service measures: its Prometheus metrics (served at GET /metrics) and
the process's peak resident memory (logged when it stops)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from fedcart import __version__
from fedcart.protocol.evaluation import Estimate

__all__ = ["ESTIMATED_VERSIONS", "ROUND_SECONDS", "Metrics", "peak_resident_mb"]

# a round's duration from its start to its end (bounds in seconds): a training round of a
# few devices takes seconds, a statistics round over thousands minutes
ROUND_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# model versions whose evaluation estimates /metrics shows (the newest): a label set per
# version, so the series stay few over a deployment's thousands of versions
ESTIMATED_VERSIONS = 10


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (not the process-global
    one: a process may hold several services, as the tests do), with the process's CPU,
    memory and open files, the Python platform, and the FedCart version serving."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        Info("fedcart_build", "The FedCart version this service runs",
             registry=self.registry).info({"version": __version__})
        self.round_seconds = Histogram(
            "fedcart_round_duration_seconds", "Rounds' durations, from the round notice to "
            "the published model (or the failure), by task and outcome", ["task", "status"],
            buckets=ROUND_SECONDS, registry=self.registry)
        self.rounds = Counter("fedcart_rounds", "Rounds by outcome", ["status"],
                              registry=self.registry)
        self.survivors = Gauge("fedcart_last_round_survivors", "Survivors of the last round",
                               registry=self.registry)
        self.dropouts = Counter("fedcart_dropouts", "Devices dropped from rounds",
                                registry=self.registry)
        self.epsilon = Gauge("fedcart_epsilon_spent", "Epsilon spent at the configured delta",
                             registry=self.registry)
        self.bytes_up = Counter("fedcart_bytes_received", "Protocol bytes from devices",
                                registry=self.registry)
        self.bytes_down = Counter("fedcart_bytes_sent", "Bytes sent to devices",
                                  registry=self.registry)
        self.late = Counter("fedcart_late_messages", "Messages that came after their round "
                            "or group stopped waiting for them (ignored)",
                            registry=self.registry)
        self.groups = Counter("fedcart_groups", "SecAgg+ groups by outcome", ["status"],
                              registry=self.registry)
        self.loop_stall = Gauge("fedcart_event_loop_stall_seconds", "The event loop's "
                                "longest stall in the last round (check-ins and keepalives "
                                "wait that long)", registry=self.registry)
        self.connected = Gauge("fedcart_connected_devices", "Checked-in devices",
                               registry=self.registry)
        self.model_version = Gauge("fedcart_model_version", "Published model version",
                                   registry=self.registry)
        self.serving_version = Gauge("fedcart_serving_model_version", "The model version "
                                     "every device that follows the model gets",
                                     registry=self.registry)
        self.estimate = Gauge("fedcart_evaluation", "Federated evaluation of a model version "
                              "on the devices' newest baskets: the estimate and its "
                              "confidence interval's bounds, and the queries it counts",
                              ["model_version", "metric", "bound"], registry=self.registry)
        # the (metric, bound) label pairs exported for each model version
        self._estimated: dict[int, list[tuple[str, str]]] = {}
        self.check_ins = Counter("fedcart_check_ins", "Check-ins by what the server did: "
                                 "kept the device connected, sent it away to come back "
                                 "later (pacing), or refused it", ["decision"],
                                 registry=self.registry)
        self.sockets_refused = Counter("fedcart_sockets_refused", "Connections closed as "
                                       "they were accepted: the server held its limit of "
                                       "sockets", registry=self.registry)
        self.downloads_cut = Counter("fedcart_downloads_cut", "Connections closed because "
                                     "the device did not take in a message by its deadline "
                                     "(10 s plus its size at min_download_rate), or a large "
                                     "bundle's pong in 60 s", registry=self.registry)
        self.released = Counter("fedcart_leases_ended", "Connections sent away after their "
                                "lease, to make room for devices waiting to check in",
                                registry=self.registry)

    def show_estimate(self, estimate: Estimate) -> None:
        """Export ``estimate``; only the ESTIMATED_VERSIONS newest versions stay."""
        version = str(estimate.model_version)
        values = {("queries", "estimate"): estimate.queries}
        for metric, interval in (("hr10", estimate.hr), ("ndcg10", estimate.ndcg),
                                 ("mrr", estimate.mrr), ("hr10_repeat", estimate.repeat_hr),
                                 ("hr10_explore", estimate.explore_hr)):
            values |= {(metric, "estimate"): interval.value, (metric, "low"): interval.low,
                       (metric, "high"): interval.high}
        for (metric, bound), value in values.items():
            self.estimate.labels(version, metric, bound).set(value)
        self._estimated[estimate.model_version] = list(values)
        for old in sorted(self._estimated)[:-ESTIMATED_VERSIONS]:
            for metric, bound in self._estimated.pop(old):
                self.estimate.remove(str(old), metric, bound)

def peak_resident_mb() -> float:
    """This process's peak resident set (VmHWM). Unlike getrusage's ru_maxrss, it is not
    inherited from the parent across fork and exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
