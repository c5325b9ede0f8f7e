"""The ``/metrics`` collector: Prometheus metrics read from the audit database at scrape time.

Totals come from the audit rows (see :mod:`dicomai.store.metrics`) rather than from counters
kept in each stage, so they survive restarts and no stage needs instrumenting. The cost is
a few aggregate queries per scrape.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from dicomai.model.drift import MIN_IMAGES, PSI_WARN, Drift, judged
from dicomai.model.package import Manifest
from dicomai.ops.checks import free_bytes
from dicomai.ops.drift import DriftWatch
from dicomai.store import metrics as store

__all__ = ["AuditCollector"]

#: Upper bounds, in seconds, of the latency histograms.
CLASSIFY_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DELIVERY_BOUNDS = (0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0)


def _histogram(name: str, doc: str, b: store.Buckets) -> HistogramMetricFamily:
    buckets = [(repr(float(le)), float(n)) for le, n in zip(b.bounds, b.cumulative, strict=True)]
    return HistogramMetricFamily(name, doc, buckets=[*buckets, ("+Inf", float(b.count))], sum_value=b.total)


class AuditCollector(Collector):
    """Yields the node's metrics; registered once on the endpoint's own registry."""

    def __init__(self, sessions: sessionmaker[Session], data_dir: Path, started: dt.datetime,
                 manifest: Manifest | None, drift: DriftWatch | None = None) -> None:
        self.sessions = sessions
        self.data_dir = data_dir
        self.started = started
        self.manifest = manifest
        self.drift = drift

    def collect(self) -> Iterator[Metric]:
        with self.sessions() as s:
            c = store.counts(s, self.started)
            classify = store.classify_seconds(s, CLASSIFY_BOUNDS)
            delivery = store.delivery_seconds(s, DELIVERY_BOUNDS)
        assoc = CounterMetricFamily("dicomai_associations", "DICOM associations requested",
                                    labels=["result"])
        for accepted in (True, False):
            assoc.add_metric(["accepted" if accepted else "rejected"], c.associations.get(accepted, 0))
        yield assoc
        yield GaugeMetricFamily("dicomai_associations_open", "Associations in progress",
                                value=c.associations_open)
        yield CounterMetricFamily("dicomai_instances_received", "Instances stored in the spool",
                                  value=c.instances)
        yield CounterMetricFamily("dicomai_instances_duplicate",
                                  "Instances received again with the same content", value=c.duplicates)
        rejected = CounterMetricFamily("dicomai_instances_rejected", "Instances refused, by DIMSE status",
                                       labels=["status"])
        for status, n in sorted(c.rejected.items()):
            rejected.add_metric([status], n)
        yield rejected
        yield CounterMetricFamily("dicomai_received_bytes", "Bytes of stored instances",
                                  value=c.received_bytes)
        studies = GaugeMetricFamily("dicomai_studies", "Studies by state and grade",
                                    labels=["state", "grade"])
        for (state, grade), n in sorted(c.studies.items()):
            studies.add_metric([state, grade], n)
        yield studies
        outbox = GaugeMetricFamily("dicomai_outbox", "Outbox rows by destination and state",
                                   labels=["destination", "state"])
        for (dest, state), n in sorted(c.outbox.items()):
            outbox.add_metric([dest, state], n)
        yield outbox
        yield GaugeMetricFamily("dicomai_disk_free_bytes", "Free bytes on the data directory's file system",
                                value=free_bytes(self.data_dir))
        yield _histogram("dicomai_classify_seconds", "Per analysed image: decode to Grad-CAM", classify)
        yield _histogram("dicomai_delivery_seconds", "Per delivered object: queued to confirmed", delivery)
        if self.manifest is not None:
            m = self.manifest
            info = InfoMetricFamily("dicomai_model", "The model package the node runs")
            info.add_metric([], {"name": m.name, "version": m.version, "sha256": m.sha256})
            yield info
        if self.drift is not None:
            yield from _drift_metrics(self.drift.groups())


def _drift_metrics(groups: dict[str, Drift]) -> Iterator[Metric]:
    """Per group ("all", "body_part=HAND", "manufacturer=ACME"): images, PSI of the scores and
    of the intensities, flagged rates; for all images and each manufacturer, whether it counts
    as drifted (enough images)."""
    images = GaugeMetricFamily("dicomai_model_drift_images", "Analysed images in the drift window",
                               labels=["group"])
    psi = GaugeMetricFamily("dicomai_model_drift_psi", "Population stability index against validation",
                            labels=["group", "statistic"])
    rate = GaugeMetricFamily("dicomai_model_flagged_rate", "Share of images at or above an operating point",
                             labels=["group", "point"])
    drifted = GaugeMetricFamily("dicomai_model_drifted",
                                f"1 when the scores' PSI passes {PSI_WARN} on at least {MIN_IMAGES} images",
                                labels=["group"])
    for name, d in sorted(groups.items()):
        images.add_metric([name], d.images)
        for statistic, value in (("score", d.psi), ("intensity", d.intensity_psi)):
            if value is not None:
                psi.add_metric([name, statistic], value)
        for point, value in (("high_sensitivity", d.high_sensitivity_rate),
                             ("high_specificity", d.high_specificity_rate)):
            if value is not None:
                rate.add_metric([name, point], value)
        if judged(name):  # a body part's reference is all regions': shown, not judged
            drifted.add_metric([name], 1.0 if d.drifted else 0.0)
    yield from (images, psi, rate, drifted)
