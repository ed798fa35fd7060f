#!/usr/bin/env python3
"""Renders the Grafana dashboard's panels over the recorded series of the operator's scenario.

No Grafana runs here, so this draws what Grafana would: the series of the scenario test group of
alerts.test.yml (the one whose first series is a json_transport histogram) are expanded from
promtool's notation, written as OpenMetrics, backfilled into a TSDB with
`promtool tsdb create-blocks-from openmetrics`, served by a real `prometheus`, and every panel's
queries of grafana-dashboard.json are asked of it (`/api/v1/query_range`, $host and $region
all, $__rate_interval 5m) and drawn with matplotlib in the dashboard's grid. Panels of another
service or concern show "no data", as Grafana would.

    make render-dashboard            # writes docs/observability/dashboard-scenario.png

Usage: render.py OUT.png [ROW_TITLE_PREFIX]   (only the rows whose title starts with the prefix)
"""

import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

HERE = Path(__file__).resolve().parent
START = 1_700_000_000  # the scenario's minute 0 (any fixed time: the blocks carry their own)
RATE_INTERVAL = "5m"


def expand(values: str, count: int) -> list:
    """promtool's series notation (`a`, `axn`, `a+bxn`, `a-bxn`, `_`, `_xn`) to samples."""
    out: list = []
    for token in values.split():
        num = r"-?[0-9.]+(?:[eE][-+]?[0-9]+)?"
        m = re.fullmatch(rf"(_|{num})(?:([+-][0-9.]+(?:[eE][-+]?[0-9]+)?)?x([0-9]+))?", token)
        if not m:
            raise SystemExit(f"cannot read the series value {token!r}")
        first, step, times = m.group(1), m.group(2), m.group(3)
        if first == "_":
            out += [None] * (int(times) if times else 1)
            continue
        value, delta = float(first), float(step) if step else 0.0
        for i in range(int(times) + 1 if times else 1):
            out.append(value + i * delta)
    return out[:count] if count else out


def scenario():
    tests = yaml.safe_load((HERE / "alerts.test.yml").read_text())
    for group in tests["tests"]:
        series = group.get("input_series", [])
        if series and "json_transport" in series[0]["series"]:
            return group
    raise SystemExit("alerts.test.yml has no scenario group (first series a json_transport one)")


def openmetrics(group) -> tuple[str, int]:
    lines, minutes = [], 0
    for s in group["input_series"]:
        samples = expand(s["values"], 0)
        minutes = max(minutes, len(samples))
        for i, v in enumerate(samples):
            if v is not None:
                lines.append(f"{s['series']} {v} {START + 60 * i}")
    lines.sort(key=lambda l: (l.split(" ")[0], int(l.rsplit(" ", 1)[1])))
    return "\n".join(lines) + "\n# EOF\n", minutes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query_range(base: str, expr: str, end: int):
    params = urllib.parse.urlencode(
        {"query": expr, "start": START, "end": end, "step": 60}
    )
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{params}", timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise SystemExit(f"query failed: {expr}: {body}")
    return body["data"]["result"]


def legend(fmt: str, labels: dict) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or str(labels)


def concrete(expr: str) -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__interval", "1m")
    return re.sub(r"\$\w+", ".*", expr)


def draw(panels, results, out: Path, minutes: int) -> None:
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels) - min(
        p["gridPos"]["y"] for p in panels
    )
    top = min(p["gridPos"]["y"] for p in panels)
    fig = plt.figure(figsize=(24, rows * 0.55))
    for p in panels:
        g = p["gridPos"]
        left, width = g["x"] / 24, g["w"] / 24
        bottom, height = 1 - (g["y"] - top + g["h"]) / rows, g["h"] / rows
        if p["type"] == "row":
            fig.text(left + 0.005, bottom + height / 2, p["title"], fontsize=13, weight="bold", va="center")
            continue
        ax = fig.add_axes([left + 0.025, bottom + 0.03, width - 0.035, height - 0.07])
        ax.set_title(p["title"], fontsize=10, loc="left")
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        drawn = 0
        for target, series in zip(p["targets"], results[p["id"]]):
            for s in series:
                xs = [(float(t) - START) / 60 for t, _ in s["values"]]
                ys = [float(v) for _, v in s["values"]]
                if unit == "percentunit":
                    ys = [y * 100 for y in ys]
                ax.plot(xs, ys, label=legend(target.get("legendFormat", ""), s["metric"]), linewidth=1.2)
                drawn += 1
        if p["type"] == "stat":
            ax.set_xticks([])
        for step in p.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps", []):
            if step.get("value") is not None and p["type"] == "timeseries" and drawn:
                y = step["value"] * (100 if unit == "percentunit" else 1)
                ax.axhline(y, color=step.get("color", "red"), linestyle="--", linewidth=0.8)
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        ax.set_xlim(0, minutes - 1)
        ax.set_xlabel("minute", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.set_ylabel({"s": "seconds", "percentunit": "%", "reqps": "req/s"}.get(unit, ""), fontsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", ncol=2 if drawn > 6 else 1)
    fig.savefig(out, dpi=70)


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "dashboard-scenario.png"
    prefix = sys.argv[2] if len(sys.argv) > 2 else ""
    for tool in ("promtool", "prometheus"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (Debian's prometheus package)")
    dashboard = json.loads((HERE / "grafana-dashboard.json").read_text())
    panels = sorted(dashboard["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    if prefix:
        chosen, keep = [], False
        for p in panels:
            if p["type"] == "row":
                keep = p["title"].startswith(prefix)
            if keep:
                chosen.append(p)
        panels = chosen
    text, minutes = openmetrics(scenario())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "series.om").write_text(text)
        subprocess.run(
            ["promtool", "tsdb", "create-blocks-from", "openmetrics", str(tmp / "series.om"), str(tmp / "data")],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        (tmp / "prometheus.yml").write_text("global: {}\n")
        port = free_port()
        server = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                "--storage.tsdb.retention.time=100y",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("prometheus did not become ready")
                time.sleep(0.2)
            end = START + 60 * (minutes - 1)
            results, empty = {}, 0
            for p in panels:
                if p["type"] == "row":
                    continue
                results[p["id"]] = [query_range(base, concrete(t["expr"]), end) for t in p["targets"]]
                if not any(results[p["id"]]):
                    empty += 1
                print(f"{p['title']}: {sum(len(r) for r in results[p['id']])} series")
        finally:
            server.terminate()
            server.wait(timeout=30)
    draw(panels, results, out, minutes)
    print(f"{out}: {len(results)} panels, {empty} without data, {minutes} minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
