"""The deploy/ artefacts against the server: the Prometheus alert rules are valid (promtool) and
fire on series shaped like the server's, the Grafana dashboard JSON is what its builder renders,
every metric they query is one the server exports, and every exported metric is documented in
docs/operations.md."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from inferd.app import InferenceServer
from inferd.config import ServerConfig
from inferd.core.observer import RejectReason
from inferd.core.types import ModelState
from inferd.demo_models import MLP_CONFIG, build_mlp, write_model
from inferd.observability.gpu import GpuCollector
from inferd.observability.worker_metrics import AnsweredHere, WorkerMetrics
from inferd_client import AsyncInferClient

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "inferd.json"
DASHBOARD_BUILDER = ROOT / "deploy" / "grafana" / "build_dashboard.py"
OPERATIONS = ROOT / "docs" / "operations.md"
INSTALL_HINT = "run scripts/install_test_deps.sh (Debian: apt-get install prometheus)"

METRIC_TOKEN = re.compile(r"\binferd_[a-z0-9_]+\b")
SELECTOR = re.compile(r"\b(inferd_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GRPC_CODES = {
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
}  # fmt: skip
# Label values the server can produce, where they come from a fixed set.
LABEL_VALUES = {
    "code": GRPC_CODES,
    "reason": {r.value for r in RejectReason},
    "state": {s.value for s in ModelState},
}


def promtool() -> str:
    path = shutil.which("promtool") or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
    )
    if path is None:
        pytest.fail(f"promtool is not installed: {INSTALL_HINT}", pytrace=False)
    return path


@dataclass(frozen=True)
class Family:
    """One exported metric family: its documented name, type and label names."""

    name: str
    type: str
    labels: frozenset[str]

    @property
    def documented_name(self) -> str:
        return f"{self.name}_total" if self.type == "counter" else self.name

    @property
    def series_names(self) -> set[str]:
        """The names its samples carry, i.e. what a PromQL query may select."""
        if self.type == "counter":
            return {f"{self.name}_total", f"{self.name}_created"}
        if self.type == "histogram":
            return {f"{self.name}_{s}" for s in ("bucket", "sum", "count", "created")}
        return {self.name}

    def labels_of(self, series: str) -> frozenset[str]:
        return self.labels | {"le"} if series.endswith("_bucket") else self.labels


class FakeNvml:
    """One GPU, just enough NVML for GpuCollector."""

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return "GPU-0000"

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return type("Rates", (), {"gpu": 50, "memory": 10})()

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return type("Memory", (), {"used": 1 << 30, "total": 16 << 30, "free": 15 << 30})()

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return 100_000


def families_of(registry: CollectorRegistry, wrappers: dict[str, frozenset[str]]) -> list[Family]:
    out = []
    for family in registry.collect():
        labels = wrappers.get(family.name)
        if labels is None:
            labels = frozenset(k for s in family.samples for k in s.labels if k != "le")
        out.append(Family(family.name, family.type, labels))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Family]:
    """Every family a started server exports after one request, plus the GPU families that
    GpuCollector exports when NVML reports a GPU (none here)."""
    import asyncio

    repository = tmp_path_factory.mktemp("mlp")
    write_model(build_mlp(), repository, "mlp", config_toml=MLP_CONFIG)

    async def run() -> InferenceServer:
        srv = InferenceServer(
            ServerConfig.load(None, model_repository=repository, port=0, metrics_port=-1)
        )
        await srv.start()
        try:
            async with AsyncInferClient(f"127.0.0.1:{srv.port}") as client:
                await client.infer("mlp", {"input": np.zeros((1, 64), np.float32)})
        finally:
            await srv.stop(1)
        return srv

    srv = asyncio.run(run())
    # Label names of the server's metrics, also of those without samples yet (rejections...).
    wrappers = {
        w._name: frozenset(w._labelnames)
        for w in vars(srv.metrics).values()
        if isinstance(w, MetricWrapperBase)
    }
    gpu = CollectorRegistry()
    gpu.register(GpuCollector(nvml=FakeNvml()))
    # The processes of `--workers N` (observability/worker_metrics.py), as one of them records.
    workers = CollectorRegistry()
    WorkerMetrics(workers).started("frontend", restarted=True)
    AnsweredHere(workers).request_finished("native", "mlp", 1, "OK", 0.001)
    families = (
        families_of(srv.metrics.registry, wrappers)
        + families_of(gpu, {})
        + families_of(workers, {})
    )
    assert len({f.name for f in families}) == len(families)
    return {f.name: f for f in families}


def series_index(exported: dict[str, Family]) -> dict[str, Family]:
    return {series: f for f in exported.values() for series in f.series_names}


# --- alert rules --------------------------------------------------------------------------------


def test_promtool_checks_the_alert_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout, result.stdout


# Input series for `promtool test rules`, labelled as the server labels them.
MLP = 'protocol="native",model="mlp",version="1"'
CNN = 'protocol="native",model="cnn",version="1"'
ALERT_INPUT = [
    # mlp: half of its requests fail (INVALID_ARGUMENT); p99 ~ 0.99 s; queue 900 of 1024.
    (f'inferd_requests_total{{{MLP},code="OK"}}', "0+60x30"),
    (
        'inferd_requests_total{protocol="native",model="mlp",version="",code="INVALID_ARGUMENT"}',
        "0+60x30",
    ),
    (f'inferd_request_duration_seconds_bucket{{{MLP},le="0.1"}}', "0+6x30"),
    (f'inferd_request_duration_seconds_bucket{{{MLP},le="1.0"}}', "0+60x30"),
    (f'inferd_request_duration_seconds_bucket{{{MLP},le="+Inf"}}', "0+60x30"),
    ('inferd_queue_depth{model="mlp",version="1"}', "900x30"),
    ('inferd_queue_capacity{model="mlp",version="1"}', "1024x30"),
    # cnn: all OK and fast; version 1 rejects (queue full), version 2 failed to load.
    (f'inferd_requests_total{{{CNN},code="OK"}}', "0+60x30"),
    (f'inferd_request_duration_seconds_bucket{{{CNN},le="0.1"}}', "0+60x30"),
    (f'inferd_request_duration_seconds_bucket{{{CNN},le="+Inf"}}', "0+60x30"),
    ('inferd_queue_depth{model="cnn",version="1"}', "0x30"),
    ('inferd_queue_capacity{model="cnn",version="1"}', "256x30"),
    ('inferd_rejections_total{model="cnn",version="1",reason="queue_full"}', "0+3x30"),
    ('inferd_model_state{model="cnn",version="1",state="READY"}', "1x30"),
    ('inferd_model_state{model="cnn",version="2",state="FAILED"}', "1x30"),
    ('inferd_model_state{model="cnn",version="2",state="READY"}', "0x30"),
    # GPU a is 95 % full, GPU b 10 %.
    ('inferd_gpu_memory_used_bytes{gpu_uuid="GPU-a"}', "95x30"),
    ('inferd_gpu_memory_total_bytes{gpu_uuid="GPU-a"}', "100x30"),
    ('inferd_gpu_memory_used_bytes{gpu_uuid="GPU-b"}', "10x30"),
    ('inferd_gpu_memory_total_bytes{gpu_uuid="GPU-b"}', "100x30"),
]
ALERT_TESTS = """\
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
{series}
    alert_rule_test:
      - eval_time: 3m
        alertname: InferdHighErrorRatio
        exp_alerts: []
      - eval_time: 15m
        alertname: InferdHighErrorRatio
        exp_alerts:
          - exp_labels: {{severity: warning, model: mlp}}
            exp_annotations: {{summary: "inferd model mlp: 50% of requests fail"}}
      - eval_time: 15m
        alertname: InferdHighP99Latency
        exp_alerts:
          - exp_labels: {{severity: warning, model: mlp}}
            exp_annotations: {{summary: "inferd model mlp: p99 latency 990ms"}}
      - eval_time: 15m
        alertname: InferdQueueNearlyFull
        exp_alerts:
          - exp_labels: {{severity: warning, model: mlp, version: "1"}}
            exp_annotations: {{summary: "inferd model mlp version 1: queue near full"}}
          - exp_labels: {{severity: warning, model: cnn, version: "1"}}
            exp_annotations: {{summary: "inferd model cnn version 1: queue near full"}}
      - eval_time: 15m
        alertname: InferdModelFailed
        exp_alerts:
          - exp_labels: {{severity: critical, model: cnn, version: "2"}}
            exp_annotations: {{summary: "inferd model cnn version 2 failed to load"}}
      - eval_time: 15m
        alertname: InferdGpuMemoryHigh
        exp_alerts:
          - exp_labels: {{severity: warning, gpu_uuid: GPU-a}}
            exp_annotations: {{summary: "GPU GPU-a memory 95% used"}}
"""


def test_alert_rules_fire_on_series_shaped_like_the_servers(tmp_path: Path) -> None:
    tests = tmp_path / "alerts_test.yml"
    series = "\n".join(
        f"      - series: {json.dumps(name)}\n        values: {json.dumps(values)}"
        for name, values in ALERT_INPUT
    )
    tests.write_text(ALERT_TESTS.format(rules=json.dumps(str(ALERTS)), series=series))
    result = subprocess.run(
        [promtool(), "test", "rules", str(tests)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


# --- dashboard ----------------------------------------------------------------------------------


def load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("inferd_build_dashboard", DASHBOARD_BUILDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dashboard_json_is_what_the_builder_renders() -> None:
    rendered = load_builder().render()
    assert DASHBOARD.read_text() == rendered, (
        "deploy/grafana/inferd.json is stale: run python deploy/grafana/build_dashboard.py"
    )
    dashboard = json.loads(rendered)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def dashboard_queries() -> Iterator[tuple[str, str, str]]:
    """(where, PromQL, legend) for every query of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    for var in dashboard["templating"]["list"]:
        if var.get("type") == "query":
            yield f"variable {var['name']}", var["query"], ""
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield f"panel {panel['title']!r}", target["expr"], target.get("legendFormat", "")


def alert_exprs() -> Iterator[tuple[str, str]]:
    """(alert, expr) for every rule of alerts.yml, read without a YAML parser: an expr is
    either on its line or the indented block below `expr: |`."""
    lines = ALERTS.read_text().splitlines()
    alert = ""
    for i, line in enumerate(lines):
        if m := re.match(r"\s*- alert:\s*(\S+)", line):
            alert = m.group(1)
        if m := re.match(r"(\s*)expr:\s*(.*)$", line):
            indent, rest = len(m.group(1)), m.group(2).strip()
            if rest not in ("|", ">", "|-", ">-"):
                yield alert, rest
                continue
            block = []
            for following in lines[i + 1 :]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            yield alert, " ".join(b for b in block if b)


def check_query(where: str, expr: str, index: dict[str, Family]) -> list[str]:
    problems = []
    names = METRIC_TOKEN.findall(expr)
    if not names:
        problems.append(f"{where}: no inferd metric in {expr!r}")
    for name in names:
        if name not in index:
            problems.append(f"{where}: {name} is not exported")
    for name, matchers in SELECTOR.findall(expr):
        family = index.get(name)
        if family is None:
            continue
        for label, op, value in MATCHER.findall(matchers):
            if label not in family.labels_of(name):
                problems.append(f"{where}: {name} has no label {label!r}")
            elif op in ("=", "!=") and label in LABEL_VALUES and value not in LABEL_VALUES[label]:
                problems.append(f"{where}: {label}={value!r} never occurs")
    known = frozenset().union(*(index[n].labels_of(n) for n in names if n in index))
    for group in re.findall(r"\b(?:by|ignoring|on)\s*\(([^)]*)\)", expr):
        for label in (g.strip() for g in group.split(",")):
            if label and label not in known:
                problems.append(f"{where}: grouping label {label!r} is on none of {names}")
    return problems


def test_dashboard_and_alerts_query_only_exported_metrics(exported: dict[str, Family]) -> None:
    index = series_index(exported)
    problems: list[str] = []
    queries = list(dashboard_queries())
    assert len(queries) > 10
    for where, expr, legend in queries:
        problems += check_query(where, expr, index)
        names = METRIC_TOKEN.findall(expr)
        labels = frozenset().union(*(index[n].labels_of(n) for n in names if n in index))
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            if label not in labels:
                problems.append(f"{where}: legend label {label!r} is on none of {names}")
    alerts = list(alert_exprs())
    assert [a for a, _ in alerts] == [
        "InferdHighErrorRatio",
        "InferdHighP99Latency",
        "InferdQueueNearlyFull",
        "InferdModelFailed",
        "InferdGpuMemoryHigh",
    ]
    for alert, expr in alerts:
        problems += check_query(f"alert {alert}", expr, index)
    assert not problems, "\n".join(problems)


# --- docs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DocRow:
    line: int
    name: str
    type: str
    labels: frozenset[str]


def metrics_section() -> list[tuple[int, str]]:
    lines = OPERATIONS.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "## Metrics")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return [(i + 1, lines[i]) for i in range(start + 1, end)]


def doc_row(number: int, line: str) -> DocRow | None:
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) < 3 or not re.fullmatch(r"`inferd_\w+`", cells[0]):
        return None
    labels = frozenset(label.strip() for label in cells[2].split(",") if label.strip())
    return DocRow(number, cells[0].strip("`"), cells[1], labels)


def documented_rows() -> list[DocRow]:
    """Every row of the Metrics section that describes a metric, wherever it stands."""
    return [row for n, line in metrics_section() if (row := doc_row(n, line))]


def metric_table_rows() -> list[DocRow]:
    """The rows of the metric table as Markdown renders it: the header, its delimiter row,
    then the `|` lines that follow without a break."""
    section = metrics_section()
    start = next(k for k, (_, line) in enumerate(section) if line.startswith("| metric |"))
    assert re.fullmatch(r"\|(\s*-+\s*\|)+", section[start + 1][1].replace(":", ""))
    rows = []
    for number, line in section[start + 2 :]:
        if not line.startswith("|"):
            break
        row = doc_row(number, line)
        assert row is not None, f"docs/operations.md:{number}: not a metric row: {line!r}"
        rows.append(row)
    return rows


def test_every_exported_metric_is_documented(exported: dict[str, Family]) -> None:
    rows = {row.name: row for row in documented_rows()}
    by_doc_name = {f.documented_name: f for f in exported.values()}
    missing = sorted(set(by_doc_name) - set(rows))
    stale = sorted(set(rows) - set(by_doc_name))
    assert not missing, f"exported but not in docs/operations.md: {missing}"
    assert not stale, f"in docs/operations.md but not exported: {stale}"
    wrong = [
        f"docs/operations.md:{row.line}: {name} documented as {row.type} {sorted(row.labels)}, "
        f"exported as {by_doc_name[name].type} {sorted(by_doc_name[name].labels)}"
        for name, row in rows.items()
        if (row.type, row.labels) != (by_doc_name[name].type, by_doc_name[name].labels)
    ]
    assert not wrong, "\n".join(wrong)


def test_metric_table_has_a_row_for_each_metric(exported: dict[str, Family]) -> None:
    """The table itself, as Markdown renders it, not just lines that look like its rows."""
    in_table = {row.name for row in metric_table_rows()}
    missing = sorted({f.documented_name for f in exported.values()} - in_table)
    assert not missing, f"not in the metric table of docs/operations.md: {missing}"
