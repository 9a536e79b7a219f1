"""Writes deploy/grafana/inferd.json, the Grafana dashboard (run this file to rebuild it).

Kept as code so panels stay consistent; tests/unit/test_deploy.py checks the JSON is current and
that every query names a metric the server exports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("inferd.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'model=~"$model"'


def panel(
    title: str,
    targets: list[tuple[str, str]],
    unit: str,
    x: int,
    y: int,
    w: int = 12,
    kind: str = "timeseries",
) -> dict[str, Any]:
    return {
        "type": kind,
        "title": title,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend, "datasource": DS}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def quantile(q: float, metric: str) -> str:
    return (
        f"histogram_quantile({q}, sum by (model, le) "
        f"(rate({metric}_bucket{{{SEL}}}[$__rate_interval])))"
    )


def dashboard() -> dict[str, Any]:
    panels = [
        panel(
            "Requests/s by model",
            [
                (
                    f"sum by (model) (rate(inferd_requests_total{{{SEL}}}[$__rate_interval]))",
                    "{{model}}",
                )
            ],
            "reqps",
            0,
            0,
        ),
        panel(
            "Error ratio by code",
            [
                (
                    f'sum by (model, code) (rate(inferd_requests_total{{{SEL},code!="OK"}}'
                    f"[$__rate_interval])) / ignoring(code) group_left sum by (model) "
                    f"(rate(inferd_requests_total{{{SEL}}}[$__rate_interval]))",
                    "{{model}} {{code}}",
                )
            ],
            "percentunit",
            12,
            0,
        ),
        panel(
            "Request latency p50 / p95 / p99",
            [
                (quantile(q, "inferd_request_duration_seconds"), f"{{{{model}}}} p{int(q * 100)}")
                for q in (0.5, 0.95, 0.99)
            ],
            "s",
            0,
            8,
        ),
        panel(
            "Queue vs compute time (p95)",
            [
                (quantile(0.95, "inferd_queue_duration_seconds"), "{{model}} queue"),
                (quantile(0.95, "inferd_compute_duration_seconds"), "{{model}} compute"),
            ],
            "s",
            12,
            8,
        ),
        panel(
            "Executed batch size distribution",
            [
                (
                    f"sum by (le) (increase(inferd_batch_size_bucket{{{SEL}}}[$__rate_interval]))",
                    "{{le}}",
                )
            ],
            "short",
            0,
            16,
            kind="heatmap",
        ),
        panel(
            "Mean batch size (rows per execution)",
            [
                (
                    f"sum by (model) (rate(inferd_inference_count_total{{{SEL}}}"
                    f"[$__rate_interval])) / sum by (model) "
                    f"(rate(inferd_execution_count_total{{{SEL}}}[$__rate_interval]))",
                    "{{model}}",
                )
            ],
            "short",
            12,
            16,
        ),
        panel(
            "Queue depth and capacity",
            [
                (
                    f"sum by (model, version) (inferd_queue_depth{{{SEL}}})",
                    "{{model}} v{{version}}",
                ),
                (
                    f"sum by (model, version) (inferd_queue_capacity{{{SEL}}})",
                    "{{model}} v{{version}} capacity",
                ),
            ],
            "short",
            0,
            24,
        ),
        panel(
            "Batches in flight",
            [(f"sum by (model) (inferd_batches_in_flight{{{SEL}}})", "{{model}}")],
            "short",
            12,
            24,
        ),
        panel(
            "Model states",
            [(f"inferd_model_state{{{SEL}}} == 1", "{{model}} v{{version}} {{state}}")],
            "short",
            0,
            32,
            kind="table",
        ),
        panel(
            "Rejections by reason",
            [
                (
                    f"sum by (model, reason) (rate(inferd_rejections_total{{{SEL}}}"
                    f"[$__rate_interval]))",
                    "{{model}} {{reason}}",
                )
            ],
            "reqps",
            12,
            32,
        ),
        panel(
            "GPU utilisation",
            [("inferd_gpu_utilization", "{{gpu_uuid}}")],
            "percentunit",
            0,
            40,
        ),
        panel(
            "GPU memory",
            [
                ("inferd_gpu_memory_used_bytes", "{{gpu_uuid}} used"),
                ("inferd_gpu_memory_total_bytes", "{{gpu_uuid}} total"),
            ],
            "bytes",
            12,
            40,
        ),
    ]
    for i, p in enumerate(panels, start=1):
        p["id"] = i
    return {
        "title": "inferd",
        "uid": "inferd",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "tags": ["inferd", "inference"],
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {
                    "name": "model",
                    "type": "query",
                    "datasource": DS,
                    "query": "label_values(inferd_requests_total, model)",
                    "includeAll": True,
                    "multi": True,
                    "current": {"text": "All", "value": "$__all"},
                },
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
