"""The operations endpoint: /healthz, /readyz naming the failing check, /metrics scraped by a
real Prometheus while storescu sends a study."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from tests.conftest import PG_BASE, _postgres_url
from tests.helpers import Node, free_port, make_study, missing, shared_file, storescu

PROMETHEUS = "/usr/bin/prometheus"


def get(port: int, path: str) -> tuple[int, str]:
    """GET ``path`` on loopback: the status and the body, also for 4xx/5xx answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for(port: int, path: str, status: int, timeout: float = 30) -> str:
    """Poll until ``path`` answers ``status``; its body."""
    deadline, last = time.monotonic() + timeout, (0, "")
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # not listening yet
            last = get(port, path)
        if last[0] == status:
            return last[1]
        time.sleep(0.2)
    raise AssertionError(f"{path} not {status} within {timeout}s: {last}")


def ops_node(node_factory: type[Node], tmp_path: Path, **env: str) -> tuple[Node, int]:
    port = free_port()
    extra = {"DICOMAI_HTTP__PORT": str(port), **{f"DICOMAI_{k.upper()}": v for k, v in env.items()}}
    node = node_factory(data_dir=tmp_path / "data", env_extra=extra)
    node.start()
    wait_for(port, "/healthz", 200)
    return node, port


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Any]:
    """Start Debian's Prometheus scraping a loopback target every second; yields a starter."""
    if not Path(PROMETHEUS).exists():
        missing("prometheus (apt-get install prometheus)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(target_port: int) -> int:
        port = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "dicomai",
                                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
        }))
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(
            [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT))
        wait_for(port, "/-/ready", 200)
        return port

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)
    shutil.rmtree(tmp_path / "tsdb", ignore_errors=True)


def query(prom_port: int, expr: str) -> list[dict[str, Any]]:
    """Instant query through Prometheus's HTTP API."""
    status, body = get(prom_port, "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert status == 200, body
    return json.loads(body)["data"]["result"]  # type: ignore[no-any-return]


def wait_value(prom_port: int, expr: str, expected: float, timeout: float = 30) -> None:
    deadline, last = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        last = query(prom_port, expr)
        if last and float(last[0]["value"][1]) == expected:
            return
        time.sleep(0.5)
    raise AssertionError(f"{expr} != {expected} within {timeout}s: {last}")


@pytest.mark.integration
def test_prometheus_reads_the_counters_of_a_study(node_factory: type[Node], tmp_path: Path,
                                                   prometheus: Any) -> None:
    """A study sent by storescu shows in Prometheus: instances, bytes, studies, model, latency."""
    node, port = ops_node(node_factory, tmp_path)
    prom = prometheus(port)
    study_uid, files = make_study([shared_file("RG2_JPLL.dcm")], tmp_path / "s", copies=3)
    assert storescu(node.port, files).returncode == 0
    node.wait_state(study_uid, "processed", timeout=120)

    wait_value(prom, "dicomai_instances_received_total", 3)
    wait_value(prom, 'sum(dicomai_studies{state="processed"})', 1)
    wait_value(prom, 'dicomai_associations_total{result="accepted"}', 1)
    wait_value(prom, "dicomai_instances_duplicate_total", 0)
    wait_value(prom, "dicomai_classify_seconds_count", 3)
    (received,) = query(prom, "dicomai_received_bytes_total")
    assert float(received["value"][1]) >= sum(f.stat().st_size for f in files) * 0.9
    (model,) = query(prom, "dicomai_model_info")
    assert model["metric"]["name"] and model["metric"]["version"]
    # The drift watch of the shipped model (it has a reference): three images, too few to say.
    wait_value(prom, 'dicomai_model_drift_images{group="all"}', 3)
    wait_value(prom, 'dicomai_model_drift_images{group="body_part=HIP"}', 3)
    wait_value(prom, 'dicomai_model_drifted{group="all"}', 0)
    (free,) = query(prom, "dicomai_disk_free_bytes")
    assert float(free["value"][1]) > 0
    (up,) = query(prom, 'up{job="dicomai"}')
    assert up["value"][1] == "1"

    # The same study again: duplicates, not new instances.
    assert storescu(node.port, files).returncode == 0
    wait_value(prom, "dicomai_instances_duplicate_total", 3)
    wait_value(prom, "dicomai_instances_received_total", 3)

    body = wait_for(port, "/readyz", 200)
    assert body.splitlines()[0] == "ready"
    assert {line.split(":")[0] for line in body.splitlines()[1:]} == {
        "ok database", "ok model", "ok disk", "ok scheduler"}
    assert get(port, "/nope")[0] == 404


def test_readyz_names_the_disk_floor(node_factory: type[Node], tmp_path: Path) -> None:
    """storage.min_free_mb above the free space: /readyz is 503 and names the disk; /healthz 200."""
    node, port = ops_node(node_factory, tmp_path, storage__min_free_mb=str(2**40))
    status, body = get(port, "/readyz")
    assert status == 503, body
    assert body.splitlines()[0] == "not ready: disk"
    assert "storage.min_free_mb" in body.splitlines()[1]
    assert get(port, "/healthz") == (200, "ok\n")


@pytest.mark.postgres
def test_readyz_names_the_database_when_it_goes(node_factory: type[Node], tmp_path: Path) -> None:
    """A node whose PostgreSQL database is dropped under it: /readyz is 503 naming the database."""
    import psycopg
    from sqlalchemy.engine import make_url

    urls = cast(Generator[str, None, None], _postgres_url())  # closed: the database is dropped
    url = next(urls)
    try:
        node, port = ops_node(node_factory, tmp_path, database__url=url)
        wait_for(port, "/readyz", 200)
        base = make_url(PG_BASE)
        with psycopg.connect(f"host={base.host} port={base.port or 5432} user={base.username} "
                             f"dbname={base.database}", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{make_url(url).database}" WITH (FORCE)')
        body = wait_for(port, "/readyz", 503)
        assert body.splitlines()[0] == "not ready: database"
        assert "cannot connect to postgresql" in body.splitlines()[1]
        assert get(port, "/healthz")[0] == 200
        node.stop()
    finally:
        urls.close()
