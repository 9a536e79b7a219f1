"""A real Prometheus scrapes a real `inferd serve` subprocess, with deploy/prometheus/alerts.yml
loaded: the request rate and the PromQL p99 come out of its HTTP API, its stored counters equal
what the client sent, and the inferd alert group evaluates without errors.

Needs /usr/bin/prometheus (scripts/install_test_deps.sh installs it); fails, never skips,
without it.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from integration_support import PROJECT_ROOT, ServerFactory, add_summary_line, free_port, mlp_input

from inferd_client import InferClient, InferError

ALERTS = PROJECT_ROOT / "deploy" / "prometheus" / "alerts.yml"
INSTALL_HINT = "run scripts/install_test_deps.sh (Debian: apt-get install prometheus)"
TRAFFIC_SECONDS = 5.0
QUERY_WAIT = 60.0
READY_WAIT = 30.0
RATE = "sum(rate(inferd_requests_total[30s]))"
P99 = "histogram_quantile(0.99, sum by (le) (rate(inferd_request_duration_seconds_bucket[30s])))"
ALERT_NAMES = {
    "InferdHighErrorRatio",
    "InferdHighP99Latency",
    "InferdQueueNearlyFull",
    "InferdModelFailed",
    "InferdGpuMemoryHigh",
}


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None and Path("/usr/bin/prometheus").exists():
        path = "/usr/bin/prometheus"
    if path is None:
        pytest.fail(f"prometheus is not installed: {INSTALL_HINT}", pytrace=False)
    return path


@dataclass
class Prometheus:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as response:
            return json.loads(response.read())

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector of `promql` now: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        answer = self.get("/api/v1/query", query=promql)
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def scalar(self, promql: str) -> float | None:
        """The single value of `promql`, or None while it has none."""
        result = self.query(promql)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


def start_prometheus(workdir: Path, metrics_port: int) -> Prometheus:
    binary = prometheus_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        f"rule_files: [{json.dumps(str(ALERTS))}]\n"
        "scrape_configs:\n"
        "  - job_name: inferd\n"
        "    static_configs:\n"
        f'      - targets: ["127.0.0.1:{metrics_port}"]\n'
    )
    port = free_port()
    log_path = workdir / "prometheus.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=info",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    prometheus = Prometheus(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + READY_WAIT
    while True:
        if process.poll() is not None:
            raise AssertionError(
                f"prometheus exited with {process.returncode}:\n{prometheus.log_tail()}"
            )
        try:
            with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return prometheus
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            prometheus.stop()
            raise AssertionError(
                f"prometheus not ready after {READY_WAIT} s:\n{prometheus.log_tail()}"
            )
        time.sleep(0.2)


@dataclass
class Traffic:
    """mlp requests from a thread until stopped; one in 50 is invalid (INVALID_ARGUMENT)."""

    target: str
    codes: Counter[str] = field(default_factory=Counter)
    rows: int = 0
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        rng = np.random.default_rng(7)
        bad = {"no_such_input": np.zeros((1, 64), np.float32)}
        try:
            with InferClient(self.target) as client:
                i = 0
                while not self._stop.is_set():
                    i += 1
                    rows = 1 + i % 4
                    try:
                        if i % 50 == 0:
                            client.infer("mlp", bad, timeout=10)
                        else:
                            client.infer("mlp", mlp_input(rng, rows), timeout=10)
                            self.rows += rows
                        self.codes["OK"] += 1
                    except InferError as exc:
                        self.codes[exc.code.name] += 1
        except BaseException as exc:  # reported by the test
            self.error = exc


def wait_for(what: str, check: Any, prometheus: Prometheus, limit: float = QUERY_WAIT) -> Any:
    deadline = time.monotonic() + limit
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(
        f"{what}: not after {limit} s (last: {last!r})\nprometheus log:\n{prometheus.log_tail()}"
    )


def test_prometheus_scrapes_inferd(
    start_server: ServerFactory,
    demo_repository: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    prometheus_binary()  # fail first, before starting anything, if it is missing
    server = start_server(demo_repository)
    assert server.metrics_port > 0, server.describe()
    prometheus = start_prometheus(tmp_path / "prometheus", server.metrics_port)
    traffic = Traffic(server.target)
    try:
        wait_for(
            "prometheus scraping inferd (up == 1)",
            lambda: prometheus.scalar('up{job="inferd"}') == 1,
            prometheus,
        )
        traffic.start()
        time.sleep(TRAFFIC_SECONDS)
        assert traffic.error is None, traffic.error

        rate = wait_for(
            f"{RATE} > 0", lambda: (v := prometheus.scalar(RATE)) and v > 0 and v, prometheus
        )
        p99 = wait_for(
            f"{P99} finite",
            lambda: (v := prometheus.scalar(P99)) is not None and math.isfinite(v) and (v,),
            prometheus,
        )[0]

        def rules_evaluated() -> list[dict[str, Any]] | None:
            groups = prometheus.get("/api/v1/rules")["data"]["groups"]
            rules = [r for g in groups if g["name"] == "inferd" for r in g["rules"]]
            if {r["name"] for r in rules} != ALERT_NAMES:
                return None
            return rules if all(r["health"] == "ok" for r in rules) else None

        rules = wait_for(
            "the inferd alert group evaluated without errors", rules_evaluated, prometheus
        )
    finally:
        traffic.stop()
    assert traffic.error is None, traffic.error
    try:
        sent = sum(traffic.codes.values())
        # After the last scrape, Prometheus holds exactly what the client sent.
        wait_for(
            f"sum(inferd_requests_total) == {sent}",
            lambda: prometheus.scalar("sum(inferd_requests_total)") == sent,
            prometheus,
            limit=20,
        )
        stored = {
            name: prometheus.query(name)
            for name in (
                "inferd_requests_total",
                "inferd_request_duration_seconds_count",
                "inferd_inference_count_total",
                "inferd_execution_count_total",
                'inferd_model_state{state="READY"}',
                "inferd_queue_capacity",
            )
        }
    finally:
        prometheus.stop()
        assert prometheus.process.returncode is not None

    def value(name: str, **labels: str) -> float:
        return sum(
            float(s["value"][1])
            for s in stored[name]
            if all(s["metric"].get(k) == v for k, v in labels.items())
        )

    assert value("inferd_requests_total", model="mlp", code="OK") == traffic.codes["OK"]
    assert (
        value("inferd_requests_total", model="mlp", code="INVALID_ARGUMENT")
        == (traffic.codes["INVALID_ARGUMENT"])
    )
    assert value("inferd_request_duration_seconds_count", model="mlp") == sent
    assert value("inferd_inference_count_total", model="mlp") == traffic.rows
    assert {s["metric"]["model"] for s in stored['inferd_model_state{state="READY"}']} == {
        "cnn",
        "echo_bytes",
        "mlp",
        "text_encoder",
    }
    assert {r["name"]: r["state"] for r in rules}.keys() == ALERT_NAMES
    assert all(r["state"] == "inactive" for r in rules), [(r["name"], r["state"]) for r in rules]

    lines = [
        f"client sent {sent} mlp requests ({dict(traffic.codes)}), {traffic.rows} rows",
        f"PromQL {RATE} = {rate:.2f} req/s",
        f"PromQL {P99} = {p99 * 1e3:.3f} ms",
        "scraped samples (Prometheus /api/v1/query, after the last scrape):",
    ]
    for name, result in stored.items():
        for s in sorted(result, key=lambda s: sorted(s["metric"].items())):
            metric = s["metric"].get("__name__", name)
            labels = ",".join(
                f'{k}="{v}"'
                for k, v in sorted(s["metric"].items())
                if k not in ("__name__", "job", "instance")
            )
            lines.append(f"  {metric}{{{labels}}} {s['value'][1]}")
    print("\n" + "\n".join(lines))
    for line in lines[:3]:
        add_summary_line(request.config, f"prometheus: {line}")
