"""``make dashboard-screenshot``: the on-call dashboard, drawn from a real run, as a PNG.

Grafana is not packaged in Debian and cannot be downloaded here, so this draws the dashboard
itself, honestly: every panel of ``dashboard.json`` is its own PromQL, evaluated by a real
Prometheus (Debian's ``prometheus`` package) that scraped the three running services and
evaluated ``alerts.yml``; the results are plotted as inline SVG in a static HTML page, which
headless Chromium screenshots. The layout is the dashboard's grid; the look is not Grafana's.

What runs, in order (stopped again in the same order reversed, also on Ctrl-C or an error):

1. a fake Slack Web API (``tests/support/fake_slack.py``) that answers some posts with 429
   ``Retry-After`` and 5xx, and one owner's DM with ``channel_not_found``;
2. the local stack (Kafka KRaft + Apicurio Registry, ``deploy/local/stack.sh``), seeded with
   the demo's lookup data and warehouse (``deploy/local/demo.py``'s own functions);
3. producer, enricher and notifier as processes, posting to the fake Slack;
4. Prometheus scraping their ``/metrics`` every 2 s, with ``alerts.yml`` loaded;
5. ``--seconds`` of synthetic traffic: connector status changes (the demo's stream, over and
   over), an undecodable record now and then (dead letters), new warehouse rows.

Then it checks that every metric the rules and the dashboard use appears in a running
service's ``/metrics`` (exit 1 otherwise), queries each panel over the run, and writes the HTML
and the PNG (``--out``, default ``deploy/observability/dashboard.png``).
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# Run as a script: the repository root (tests.support) and the demo's folder are not on the
# path; the demo's seeding code is reused rather than copied.
sys.path[:0] = [str(ROOT), str(ROOT / "deploy" / "local")]

import demo  # noqa: E402
from confluent_kafka import Producer  # noqa: E402

from deploy.observability.promnames import (  # noqa: E402
    PROMETHEUS_OWN,
    exported_series_names,
    used_metric_names,
)
from libs.kafka import KafkaSettings, ensure_topics  # noqa: E402
from libs.serde import AvroSerializer, ConfluentSchemaRegistry, ConnectorStatusChanged  # noqa: E402
from services.common.settings import TopicSettings  # noqa: E402
from tests.support.fake_slack import FakeSlack  # noqa: E402

STATE = HERE / ".state"
TOKEN = "xoxb-dashboard-screenshot"
SCRAPE_S = 2
#: what Grafana's $__rate_interval becomes at this scrape interval and step (4 scrapes, at least)
RATE_INTERVAL = "30s"
COLORS = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#fade2a"]


def log(msg: str) -> None:
    print(f"[dashboard {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- processes ---------------------------------------------------------------------------------


def start_prometheus(ports: dict[str, int], state: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus not found: apt-get install -y prometheus")
    port = demo.free_port()
    (state / "prometheus").mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "rule_files": [str(HERE / "alerts.yml")],
        "scrape_configs": [
            {
                "job_name": f"field-alerts-{name}",
                "static_configs": [{"targets": [f"127.0.0.1:{p}"]}],
            }
            for name, p in ports.items()
        ],
    }
    # JSON is YAML: no YAML writer needed
    (state / "prometheus.yml").write_text(json.dumps(config, indent=2))
    with (state / "logs" / "prometheus.log").open("ab") as logfile:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={state / 'prometheus.yml'}",
                f"--storage.tsdb.path={state / 'prometheus'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start; see {state / 'logs'}") from None
            time.sleep(0.5)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def traffic(
    bootstrap: str,
    registry: ConfluentSchemaRegistry,
    topics: TopicSettings,
    warehouse: Path,
    fake: FakeSlack,
    stop: threading.Event,
    seconds: float,
) -> None:
    """Connector events about every 0.7 s, with the faults an on-call should see."""
    rng = random.Random(7)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    encode = AvroSerializer(registry, ConnectorStatusChanged)
    topic = topics.data_notifications_pipeline
    started = time.monotonic()
    i = 0
    while not stop.wait(rng.uniform(0.3, 1.1)) and time.monotonic() - started < seconds:
        org, name, kind, old, new, error = demo.CONNECTOR_STREAM[i % len(demo.CONNECTOR_STREAM)]
        event = ConnectorStatusChanged(
            event_id=f"dash-{int(time.time())}-{i}",
            org_id=org,
            environment_id="env-" + org[4:],
            cluster_id="lkc-" + org[4:],
            connector_id=f"lcc-{i % 40:04d}",  # a new connector now and then: new alerts
            connector_name=f"{name}-{i % 40}",
            connector_type=kind,
            old_status=old,
            new_status=new,
            occurred_at=datetime.now(UTC),
            error_message=error,
        )
        producer.produce(topic, key=org.encode(), value=encode(topic, event))
        if i % 25 == 12:
            producer.produce(topic, key=b"org-bad", value=b"not an Avro record")  # poison
        if i % 40 == 20:
            fake.rate_limit(None, retry_after_s=2, times=4)  # a burst of 429s
            fake.server_error(None, status=503, error="service_unavailable", times=2)
        if i % 60 == 30:
            at = datetime.now(UTC)
            demo.write_warehouse(warehouse, demo.ONBOARDING_LATER, at, create=False)
        producer.poll(0)
        i += 1
    producer.flush(10)


# -- checks and queries -------------------------------------------------------------------------


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def check_exported(ports: dict[str, int]) -> None:
    """Every metric the rules and the dashboard use is on a running service's /metrics."""
    exported = set(PROMETHEUS_OWN)
    for port in ports.values():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            exported |= exported_series_names(resp.read().decode())
    used = used_metric_names(HERE / "alerts.yml", HERE / "dashboard.json")
    missing = sorted(set(used) - exported)
    if missing:
        raise RuntimeError(f"used but exported by no running service: {missing}")
    log(f"all {len(used)} metrics the rules and the dashboard use are exported")


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[Any]:
    params = urllib.parse.urlencode(
        {
            "query": expr.replace("$__rate_interval", RATE_INTERVAL),
            "start": start,
            "end": end,
            "step": step,
        }
    )
    doc = get_json(f"{url}/api/v1/query_range?{params}")
    result: list[Any] = doc["data"]["result"]
    return result


def query(url: str, expr: str, at: float) -> list[Any]:
    params = urllib.parse.urlencode(
        {"query": expr.replace("$__rate_interval", RATE_INTERVAL), "time": at}
    )
    result: list[Any] = get_json(f"{url}/api/v1/query?{params}")["data"]["result"]
    return result


def legend(fmt: str, labels: dict[str, str]) -> str:
    out = fmt
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return " ".join(out.replace("{{", "").replace("}}", "").split()) or "value"


# -- rendering -----------------------------------------------------------------------------------


def fmt_value(value: float, unit: str) -> str:
    if math.isnan(value):
        return "-"
    if unit == "percentunit":
        return f"{value * 100:.0f}%"
    if unit == "s":
        if value >= 3600:
            return f"{value / 3600:.1f} h"
        if value >= 60:
            return f"{value / 60:.1f} min"
        return f"{value:.0f} s"
    suffix = "/s" if unit == "ops" else ""
    if abs(value) >= 1000:
        return f"{value / 1000:.1f}k{suffix}"
    return f"{value:.2g}{suffix}" if abs(value) < 10 else f"{value:.0f}{suffix}"


def svg_timeseries(
    series: list[tuple[str, list[tuple[float, float]]]],
    unit: str,
    start: float,
    end: float,
    width: int,
    height: int,
) -> str:
    left, right, top, bottom = 56, 8, 8, 20
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for _, points in series for _, v in points if not math.isnan(v)]
    top_value = max(values, default=1.0)
    top_value = top_value * 1.1 if top_value > 0 else 1.0
    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">']
    for k in range(4):
        y = top + plot_h * k / 3
        label = fmt_value(top_value * (3 - k) / 3, unit)
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" class="axis" text-anchor="end">{label}</text>'
        )
    for k in range(5):
        t = start + (end - start) * k / 4
        x = left + plot_w * k / 4
        stamp = datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S")
        anchor = "start" if k == 0 else "end" if k == 4 else "middle"
        parts.append(
            f'<text x="{x:.1f}" y="{height - 4}" class="axis" text-anchor="{anchor}">{stamp}</text>'
        )
    for n, (_, points) in enumerate(series):
        coords = " ".join(
            f"{left + plot_w * (t - start) / (end - start):.1f},"
            f"{top + plot_h * (1 - v / top_value):.1f}"
            for t, v in points
            if not math.isnan(v)
        )
        color = COLORS[n % len(COLORS)]
        parts.append(f'<polyline points="{coords}" stroke="{color}"/>')
    parts.append("</svg>")
    return "".join(parts)


def render_panel(panel: dict[str, Any], url: str, start: float, end: float, step: float) -> str:
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
    series: list[tuple[str, list[tuple[float, float]]]] = []
    for target in panel["targets"]:
        if panel["type"] == "stat":
            # a stat shows the value now: an instant query, not the last point of every
            # series the range ever had (a table's "loading" series ends when it caught up)
            items = query(url, target["expr"], end)
            pairs = [(item["metric"], [item["value"]]) for item in items]
        else:
            items = query_range(url, target["expr"], start, end, step)
            pairs = [(item["metric"], item["values"]) for item in items]
        for labels, values in pairs:
            points = [(float(t), float(v)) for t, v in values]
            series.append((legend(target.get("legendFormat", ""), labels), points))
    series.sort(key=lambda s: s[0])
    title = html.escape(panel["title"])
    if panel["type"] == "stat":
        rows = []
        for name, points in series:
            last = points[-1][1] if points else float("nan")
            bad = panel["targets"][0]["expr"].startswith("up") and last < 1
            cls = "bad" if bad else "ok"
            rows.append(
                f'<div class="stat"><span class="{cls}">{fmt_value(last, unit)}</span> '
                f"{html.escape(name)}</div>"
            )
        body = "".join(rows) or '<div class="empty">no data</div>'
    else:
        width = panel["gridPos"]["w"] * 62 - 24
        body = svg_timeseries(series, unit, start, end, width, 150)
        items = []
        for n, (name, points) in enumerate(series[:8]):
            last = next((v for _, v in reversed(points) if not math.isnan(v)), float("nan"))
            items.append(
                f'<span class="key"><i style="background:{COLORS[n % len(COLORS)]}"></i>'
                f"{html.escape(name)} <b>{fmt_value(last, unit)}</b></span>"
            )
        more = f'<span class="key">+{len(series) - 8} more</span>' if len(series) > 8 else ""
        body += (
            f'<div class="legend">{"".join(items)}{more}</div>'
            if series
            else ('<div class="empty">no data</div>')
        )
    span = panel["gridPos"]["w"]
    return f'<div class="panel" style="grid-column: span {span}"><h3>{title}</h3>{body}</div>'


def alert_name(alert: dict[str, Any]) -> str:
    labels = alert["labels"]
    skip = ("alertname", "severity", "job", "instance")
    detail = ",".join(v for k, v in sorted(labels.items()) if k not in skip)
    return f"{labels['alertname']}({detail})" if detail else str(labels["alertname"])


def render_page(
    dashboard: dict[str, Any], url: str, start: float, end: float, alerts: list[Any], note: str
) -> str:
    step = max(2.0, (end - start) / 120)
    sections = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            sections.append(f"<h2>{html.escape(panel['title'])}</h2>")
        else:
            sections.append(render_panel(panel, url, start, end, step))
    alert_rows = (
        "".join(
            f'<span class="alert {html.escape(a["state"])}">{html.escape(alert_name(a))}'
            f" {html.escape(a['state'])}</span>"
            for a in sorted(alerts, key=alert_name)
        )
        or '<span class="alert">none pending or firing</span>'
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><style>
body {{ background:#111217; color:#ccccdc; font:13px sans-serif; margin:16px; width:1456px }}
h1 {{ font-size:18px; margin:0 0 4px }} .note {{ color:#8e8e9e; margin-bottom:8px }}
h2 {{ grid-column: span 24; font-size:14px; margin:10px 0 0; color:#d8d9da }}
.grid24 {{ display:grid; grid-template-columns:repeat(24, 1fr); gap:8px }}
.panel {{ background:#181b1f; border:1px solid #2c2f35; border-radius:3px; padding:6px 8px }}
h3 {{ font-size:12px; margin:0 0 4px; color:#d8d9da }}
.grid {{ stroke:#2c2f35; shape-rendering:crispEdges }}
/* no anti-aliasing: a third smaller PNG, and 2 px lines stay solid */
polyline {{ fill:none; stroke-width:2; shape-rendering:crispEdges }}
.axis {{ fill:#8e8e9e; font-size:10px }}
.legend {{ font-size:11px }} .key {{ margin-right:10px; white-space:nowrap }}
.key i {{ display:inline-block; width:10px; height:3px; margin-right:4px; vertical-align:middle }}
.stat {{ font-size:12px; margin:3px 0 }} .stat span {{ font-size:15px; font-weight:bold }}
.ok {{ color:#73bf69 }} .bad {{ color:#f2495c }} .empty {{ color:#8e8e9e }}
.alert {{ margin-right:10px }} .firing {{ color:#f2495c }} .pending {{ color:#f2cc0c }}
</style></head><body>
<h1>{html.escape(dashboard["title"])}</h1>
<div class="note">{html.escape(note)}</div>
<div class="note">alerts.yml in this Prometheus at the end of the run: {alert_rows}</div>
<div class="grid24">{"".join(sections)}</div>
</body></html>"""


def screenshot(page: Path, png: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise RuntimeError("chromium not found: apt-get install -y chromium")
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",  # root in a container has no user namespace for the sandbox
            "--disable-gpu",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            "--window-size=1488,1400",
            f"--screenshot={png}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


# -- main ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    state: Path = STATE
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    demo.stack(state, "down", "--purge")  # a run killed hard leaves its stack behind
    # a fresh run: the services' table caches belong to the stack just purged
    for folder in ("prometheus", "enricher", "notifier"):
        shutil.rmtree(state / folder, ignore_errors=True)
    (state / "logs").mkdir(parents=True, exist_ok=True)
    fake = FakeSlack(token=TOKEN).start()
    fake.slack_error(demo.SLACK_USERS["bo.chen@example.com"][0], "channel_not_found", times=None)
    services = demo.Services(state, env={})
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        log("starting Kafka and the registry...")
        up = demo.stack(state, "up", stop=stop)
        if up.returncode != 0:
            raise RuntimeError(f"stack.sh up failed; see {state / 'stack'}")
        env = dict(os.environ)
        for line in up.stdout.splitlines():
            if line.startswith("export "):
                key, _, value = line[7:].partition("=")
                env[key] = value
        bootstrap = env["KAFKA_BOOTSTRAP_SERVERS"]
        registry = ConfluentSchemaRegistry(env["SCHEMA_REGISTRY_URL"])
        topics = TopicSettings(partitions=3, replication_factor=1)
        ensure_topics(
            KafkaSettings(bootstrap_servers=bootstrap).client_config(), topics.all_specs()
        )
        now = datetime.now(UTC)
        demo.seed_lookups(bootstrap, registry, topics, now)
        warehouse = state / "warehouse.duckdb"
        warehouse.unlink(missing_ok=True)
        demo.write_warehouse(
            warehouse, demo.ONBOARDING_FIRST, now - timedelta(minutes=2), create=True
        )
        services.env = {
            **env,
            "TOPIC_PARTITIONS": "3",
            "PRODUCER_WAREHOUSE": f"duckdb:///{warehouse}",
            "PRODUCER_DELAY_S": "5",
            "PRODUCER_POLL_INTERVAL_S": "2",
            "ENRICHER_STATE_DIR": str(state / "enricher"),
            "ENRICHER_FALLBACK_CHANNEL": demo.FALLBACK_CHANNEL,
            "NOTIFIER_STATE_DIR": str(state / "notifier"),
            "NOTIFIER_SLACK_BOT_TOKEN": TOKEN,
            "NOTIFIER_SLACK_API_URL": fake.base_url,
        }
        services.start()
        prometheus, url = start_prometheus(services.ports, state)
        log(f"services on metrics ports {services.ports}; prometheus {url}")
        started = time.time()
        traffic(bootstrap, registry, topics, warehouse, fake, stop, seconds=args.seconds)
        services.check()
        if stop.is_set():
            return 1
        time.sleep(3 * SCRAPE_S)  # the last scrapes and rule evaluations after the traffic
        check_exported(services.ports)
        end = time.time()
        dashboard = json.loads((HERE / "dashboard.json").read_text())
        alerts = get_json(f"{url}/api/v1/alerts")["data"]["alerts"]
        version = get_json(f"{url}/api/v1/status/buildinfo")["data"]["version"]
        note = (
            f"Not Grafana: each panel of deploy/observability/dashboard.json, its PromQL "
            f"evaluated by Prometheus {version} ($__rate_interval = {RATE_INTERVAL}) over a "
            f"{(end - started) / 60:.0f}-minute run of producer, enricher and notifier on the "
            f"local stack with synthetic traffic (fake Slack injecting 429s, 503s and "
            f"channel_not_found; undecodable records), drawn by "
            f"deploy/observability/screenshot.py."
        )
        page = state / "dashboard.html"
        page.write_text(render_page(dashboard, url, started, end, alerts, note))
        screenshot(page, args.out)
        log(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB) from {page}")
        return 0
    finally:
        stop.set()
        log("stopping services, prometheus, the stack...")
        try:
            services.stop()
            if prometheus is not None:
                stop_process(prometheus)
        finally:
            demo.stack(state, "down")
            fake.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300, help="traffic duration")
    parser.add_argument("--out", type=Path, default=HERE / "dashboard.png")
    args = parser.parse_args()
    try:
        return run(args)
    except RuntimeError as exc:
        log(f"error: {exc}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
