"""Structured checks of the operational artefacts, called by host-setup/check.sh.

Each subcommand checks one artefact against the code it must agree with and exits 1 with the
reasons when it does not; `check.sh` counts the results. Python 3.11 standard library plus PyYAML
(devstack/python/requirements.txt).

    python check_artifacts.py SUBCOMMAND [ARGS]
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST_SETUP = ROOT / "host-setup"
DEPLOY = ROOT / "scaling-service" / "deploy"
OBSERVABILITY = ROOT / "docs" / "observability"
OPERATIONS = ROOT / "docs" / "operations.md"

problems: list[str] = []


def fail(message: str) -> None:
    problems.append(message)


def finish() -> int:
    for p in problems:
        print(f"  - {p}")
    return 1 if problems else 0


def load_yaml(path: Path):
    import yaml  # PyYAML, from the virtualenv

    with path.open() as f:
        return yaml.safe_load(f)


# --- what the code says -------------------------------------------------------------------------


def host_env_vars() -> set[str]:
    """Environment variables the host service reads (its clap `env = "..."`, the logger's)."""
    names: set[str] = set()
    for path in [ROOT / "host-service/src/config.rs", *sorted((ROOT / "logger/src").glob("*.rs"))]:
        names |= set(re.findall(r'env\s*=\s*"([A-Z0-9_]+)"', path.read_text()))
    return names


def clap_default(path: Path, env: str) -> str:
    """The `default_value` next to `env = "<env>"` in a clap attribute."""
    text = path.read_text()
    m = re.search(r'env\s*=\s*"' + env + r'"[^\]]*?default_value\s*=\s*"([^"]+)"', text, re.S)
    if not m:
        raise SystemExit(f"cannot find the default of {env} in {path}")
    return m.group(1)


def host_metrics() -> set[str]:
    """Metric names the host service registers (prefix whist_host_)."""
    text = (ROOT / "host-service/src/ops.rs").read_text()
    prefix = re.search(r'Registry::new_custom\(Some\("([a-z_]+)"', text)
    if not prefix:
        raise SystemExit("cannot find the metrics prefix in host-service/src/ops.rs")
    # The vitals (memory, CPU, disks, GPUs) are registered into the same registry.
    text += (ROOT / "host-service/src/vitals.rs").read_text()
    names = re.findall(
        r'(?:Opts::new|HistogramOpts::new|IntCounter::new|IntGauge::new|Gauge::new|Counter::new)\(\s*"([a-z_]+)"',
        text,
    )
    return {f"{prefix.group(1)}_{n}" for n in names}


def histograms_in_code() -> set[str]:
    text = (ROOT / "host-service/src/ops.rs").read_text()
    text += (ROOT / "host-service/src/vitals.rs").read_text()
    return {f"whist_host_{n}" for n in re.findall(r'HistogramOpts::new\(\s*"([a-z_]+)"', text)}


def documented_metrics() -> dict[str, str]:
    """The metric contract in docs/operations.md: table rows `| `name{labels}` | type | ... |`."""
    metrics: dict[str, str] = {}
    for line in OPERATIONS.read_text().splitlines():
        m = re.match(r"\|\s*`(whist_[a-z_]+)(\{[^`]*\})?`\s*\|\s*(counter|gauge|histogram)\s*\|", line)
        if m:
            metrics[m.group(1)] = m.group(3)
    return metrics


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(whist_[a-z_]+)", expr))
    base = set()
    for n in names:
        for suffix in ("_bucket", "_sum", "_count"):
            if n.endswith(suffix) and not n.endswith("_total"):
                n = n[: -len(suffix)]
                break
        base.add(n)
    return base


def markdown_anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    anchors = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code:
            continue
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            text = re.sub(r"`", "", m.group(1).strip().lower())
            text = re.sub(r"[^\w\- ]", "", text)
            anchors.add(text.replace(" ", "-"))
    return anchors


# --- subcommands --------------------------------------------------------------------------------


def check_unit() -> None:
    """The unit agrees with the service's defaults and with setup_host.sh."""
    unit = (HOST_SETUP / "whist-host-service.service").read_text()
    settings: dict[str, list[str]] = {}
    for line in unit.splitlines():
        m = re.match(r"([A-Za-z]+)=(.*)", line)
        if m:
            settings.setdefault(m.group(1), []).append(m.group(2).strip())

    def one(key: str) -> str:
        values = settings.get(key, [])
        if len(values) != 1:
            fail(f"{key}= must be set exactly once (found {values})")
            return ""
        return values[0]

    if one("Restart") != "on-failure":
        fail("Restart= must be on-failure: reconcile-at-start makes a restart after a crash safe")
    if one("KillSignal") != "SIGTERM":
        fail("KillSignal= must be SIGTERM (the service drains on SIGTERM)")
    if one("EnvironmentFile") != "/etc/whist/host-service.env":
        fail("EnvironmentFile= must be /etc/whist/host-service.env (the user data writes it)")
    if "2" not in one("RestartPreventExitStatus").split():
        fail("RestartPreventExitStatus= must include 2 (bad configuration)")
    config = ROOT / "host-service/src/config.rs"
    drain = parse_duration(clap_default(config, "WHIST_DRAIN_DEADLINE"))
    grace = parse_duration(clap_default(config, "WHIST_STOP_GRACE"))
    join = 30  # TASKS_JOIN_DEADLINE in host-service/src/lib.rs
    lib = (ROOT / "host-service/src/lib.rs").read_text()
    m = re.search(r"TASKS_JOIN_DEADLINE: Duration = Duration::from_secs\((\d+)\)", lib)
    if m:
        join = int(m.group(1))
    else:
        fail("cannot find TASKS_JOIN_DEADLINE in host-service/src/lib.rs")
    stop = parse_duration(one("TimeoutStopSec"))
    if stop <= drain + grace + join:
        fail(
            f"TimeoutStopSec={stop}s must exceed the drain deadline {drain}s + stop grace {grace}s"
            f" + task join {join}s, or systemd kills a drain in progress"
        )
    root = clap_default(config, "WHIST_ROOT")
    if root not in one("ReadWritePaths").split():
        fail(f"ReadWritePaths= must include WHIST_ROOT's default {root}")
    setup = (HOST_SETUP / "setup_host.sh").read_text()
    m = re.search(r"^readonly BIN=(\S+)", setup, re.M)
    if not m or one("ExecStart") != m.group(1):
        fail("ExecStart= must be the path setup_host.sh installs the binary to (BIN=)")
    if "docker.service" not in " ".join(settings.get("After", [])):
        fail("After= must include docker.service")
    apparmor = clap_default(config, "WHIST_APPARMOR_PROFILE")
    profile = (HOST_SETUP / "mandelbox-apparmor-profile").read_text()
    if not re.search(rf"^profile {re.escape(apparmor)} ", profile, re.M):
        fail(f"the AppArmor profile must be named {apparmor} (WHIST_APPARMOR_PROFILE's default)")


def parse_duration(text: str) -> int:
    """systemd or clap durations in seconds: 12min, 10m, 90s, 1h, 30."""
    m = re.fullmatch(r"(\d+)\s*(ms|s|sec|m|min|h)?", text.strip())
    if not m:
        raise SystemExit(f"cannot parse the duration {text!r}")
    n, unit = int(m.group(1)), m.group(2) or "s"
    return {"ms": n // 1000, "s": n, "sec": n, "m": n * 60, "min": n * 60, "h": n * 3600}[unit]


def check_env_vars() -> None:
    """Every variable the example env file and the user data set is one the service reads."""
    known = host_env_vars()
    if "APP_ENV" not in known or "WHIST_DRAIN_DEADLINE" not in known:
        fail("could not read the host service's environment variables from its sources")
    example = (HOST_SETUP / "host-service.env.example").read_text()
    for name in re.findall(r"^#?([A-Z][A-Z0-9_]+)=", example, re.M):
        if name not in known:
            fail(f"host-service.env.example sets {name}, which the host service does not read")
    for name in sorted(known - set(re.findall(r"^#?([A-Z][A-Z0-9_]+)=", example, re.M))):
        fail(f"host-service.env.example does not list {name}")
    userdata = (HOST_SETUP / "ec2_userdata.sh").read_text()
    for name in re.findall(r'echo "([A-Z][A-Z0-9_]+)=', userdata):
        if name not in known:
            fail(f"ec2_userdata.sh writes {name}, which the host service does not read")


def check_userdata_contract() -> None:
    """The placeholders are exactly the documented ones, and nothing else looks like one."""
    text = (HOST_SETUP / "ec2_userdata.sh").read_text()
    used = set(re.findall(r"\{\{([A-Z_]+)\}\}", text))
    header = text.split("\nset -euo pipefail\n", 1)[0]
    documented = set(re.findall(r"^#   ([A-Z_]+)\s{2,}", header, re.M))
    if used != documented:
        fail(f"placeholders used {sorted(used)} != documented {sorted(documented)}")
    rendered = re.sub(r"\{\{[A-Z_]+\}\}", "x", text)
    if "{{" in rendered:
        fail("a '{{' remains after every placeholder is substituted")
    if len(text.encode()) > 16384 - 2048:
        fail(f"user data is {len(text.encode())} bytes: EC2 allows 16 KiB, keep 2 KiB of room")


def parse_env_file(path: Path) -> dict[str, str]:
    """systemd's EnvironmentFile grammar for the forms the user data writes: KEY=value and
    KEY='value' (literal between single quotes), comments and blank lines."""
    env = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(?:'([^']*)'|([^'\s]*))", line)
        if not m:
            fail(f"{path.name}: line not in the expected form: {line!r}")
            continue
        env[m.group(1)] = m.group(2) if m.group(2) is not None else m.group(3)
    return env


def check_env_file(path: str, *pairs: str) -> None:
    """The env file the user data wrote holds exactly KEY=VALUE pairs given."""
    expected = dict(p.split("=", 1) for p in pairs)
    got = parse_env_file(Path(path))
    if got != expected:
        fail(f"env file {got} != expected {expected}")


def check_daemon_json() -> None:
    daemon = json.loads((HOST_SETUP / "docker-daemon-config/daemon.json").read_text())
    runtime = daemon.get("default-runtime")
    if runtime != "nvidia" or runtime not in daemon.get("runtimes", {}):
        fail("the default runtime must be nvidia, and defined under runtimes")
    setup = (HOST_SETUP / "setup_host.sh").read_text()
    seccomp = daemon.get("seccomp-profile")
    if not seccomp or f'"{seccomp}"' not in setup and f" {seccomp}" not in setup:
        fail(f"seccomp-profile {seccomp} is not the file setup_host.sh writes")
    if daemon.get("live-restore") is not True:
        fail("live-restore must be on: a Docker restart must not kill mandelboxes")
    patch = json.loads((HOST_SETUP / "docker-daemon-config/seccomp-patch.json").read_text())
    removed = set(patch.get("remove_names", []))
    for name in ("unshare", "setns", "mount", "umount2", "clone3"):
        if name not in removed:
            fail(f"seccomp patch must remove {name} from Docker's rules (remove_names)")
    for entry in patch.get("syscalls", []):
        if not entry.get("names"):
            fail(f"seccomp patch entry {entry} must name syscalls")
        elif entry.get("action") == "SCMP_ACT_ALLOW":
            if removed & set(entry["names"]) or "clone" in entry["names"]:
                fail(f"seccomp patch entry {entry} allows a namespace or mount call again")
        elif entry.get("action") != "SCMP_ACT_ERRNO" or not entry.get("errnoRet"):
            fail(f"seccomp patch entry {entry} must allow, or fail with a named errnoRet")


def check_udev() -> None:
    """Each rule has a match (==) and an assignment (=, +=, :=) and balanced quotes."""
    rules = [
        l
        for l in (HOST_SETUP / "90-whist-input.rules").read_text().splitlines()
        if l.strip() and not l.lstrip().startswith("#")
    ]
    if not rules:
        fail("no rules")
    for rule in rules:
        if rule.count('"') % 2:
            fail(f"unbalanced quotes: {rule}")
        pairs = re.findall(r'([A-Z_]+(?:\{[^}]+\})?)\s*(==|!=|\+=|:=|=)\s*"([^"]*)"', rule)
        rest = re.sub(r'([A-Z_]+(?:\{[^}]+\})?)\s*(==|!=|\+=|:=|=)\s*"([^"]*)"', "", rule)
        if rest.replace(",", "").strip():
            fail(f"cannot parse: {rest.strip()!r} in {rule}")
        if not any(op in ("==", "!=") for _, op, _ in pairs):
            fail(f"no match key: {rule}")
        if not any(op in ("=", "+=", ":=") for _, op, _ in pairs):
            fail(f"no assignment: {rule}")
    text = "\n".join(rules)
    if 'ATTRS{name}=="Whist Virtual Absolute Input"' not in text:
        fail("the rule for the absolute pointer must match its name")
    uinput = (ROOT / "host-service/src/uinput.rs").read_text()
    if "Whist Virtual Absolute Input" not in uinput:
        fail("the host service no longer names its device 'Whist Virtual Absolute Input'")


def check_sysctl() -> None:
    for line in (HOST_SETUP / "90-whist-sysctl.conf").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.fullmatch(r"([a-z0-9_.]+)\s*=\s*(\S+)", line.strip())
        if not m:
            fail(f"not KEY = VALUE: {line}")
            continue
        path = Path("/proc/sys") / m.group(1).replace(".", "/")
        if Path("/proc/sys").is_dir() and not path.exists():
            fail(f"{m.group(1)} is not a kernel setting here ({path} missing)")


def dockerfile_instructions(path: Path) -> list[tuple[int, str, str]]:
    """(line number, INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out, buf, start = [], "", 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if not buf:
            start = n
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, args = buf.strip().partition(" ")
        out.append((start, word.upper(), args.strip()))
        buf = ""
    if buf:
        fail(f"{path.name}: dangling line continuation")
    return out


KNOWN_INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip


def check_pushed_tree(tree: str) -> None:
    """What deploy.sh pushed: the Dockerfile and heroku.yml at the root, WHIST_COMMIT filled in,
    and every COPY source present in that build context."""
    root = Path(tree)
    for name in ("Dockerfile", "heroku.yml"):
        if not (root / name).is_file():
            fail(f"the pushed tree has no {name} at its root")
            return
    commit = load_yaml(root / "heroku.yml").get("build", {}).get("config", {}).get("WHIST_COMMIT", "")
    if not re.fullmatch(r"[0-9a-f]{40}", str(commit)):
        fail(f"heroku.yml's WHIST_COMMIT is {commit!r}, not a commit")
    for n, word, rest in dockerfile_instructions(root / "Dockerfile"):
        if word in ("COPY", "ADD") and "--from=" not in rest:
            for source in [p for p in rest.split() if not p.startswith("--")][:-1]:
                if not (root / source).exists():
                    fail(f"Dockerfile:{n}: {source} is not in the pushed tree")


def check_deploy() -> None:
    """Dockerfile, Procfile and heroku.yml: sources exist, the workspace is complete, the final
    image runs as non-root, and the three agree on the commands."""
    dockerfile = DEPLOY / "Dockerfile"
    instructions = dockerfile_instructions(dockerfile)
    if not instructions or instructions[0][1] not in ("FROM", "ARG"):
        fail("a Dockerfile starts with FROM (or ARG)")
    stages, copied, user, cmd, args = [], [], None, None, {}
    for n, word, rest in instructions:
        where = f"Dockerfile:{n}"
        if word not in KNOWN_INSTRUCTIONS:
            fail(f"{where}: unknown instruction {word}")
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        if word == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            if not m:
                fail(f"{where}: FROM IMAGE [AS NAME]")
                continue
            image = re.sub(r"\$\{(\w+)\}", lambda a: args.get(a.group(1), ""), m.group(1))
            if ":" not in image or image.endswith(":latest"):
                fail(f"{where}: pin the base image's tag ({image})")
            stages.append(m.group(2))
            user = None
        if word in ("COPY", "ADD"):
            parts = rest.split()
            flags = [p for p in parts if p.startswith("--")]
            paths = [p for p in parts if not p.startswith("--")]
            if len(paths) < 2:
                fail(f"{where}: {word} needs a source and a destination")
                continue
            source_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
            if source_stage:
                if source_stage not in stages[:-1]:
                    fail(f"{where}: --from={source_stage} is not an earlier stage")
                continue
            for source in paths[:-1]:
                if not (ROOT / source).exists():
                    fail(f"{where}: {source} does not exist in the build context (the repository root)")
                copied.append(source.rstrip("/"))
        if word == "USER":
            user = rest
        if word == "CMD":
            try:
                cmd = json.loads(rest)
            except json.JSONDecodeError:
                fail(f"{where}: CMD must be in exec form (a JSON array): signals reach the service")
    if user is None or user.split(":")[0] in ("root", "0"):
        fail("the final stage must switch to a non-root USER")
    # Every workspace member must be in the image: cargo reads all manifests.
    workspace = tomllib.loads((ROOT / "Cargo.toml").read_text())
    for member in workspace["workspace"]["members"]:
        if not any(member == c or member.startswith(c + "/") for c in copied):
            fail(f"workspace member {member} is not copied into the build stage")
    for needed in ("Cargo.toml", "Cargo.lock"):
        if needed not in copied:
            fail(f"{needed} is not copied into the build stage")
    # Files compiled into the crates (include_str!, graphql schema and query paths).
    for crate in ("scaling-service", "dbclient", "logger", "database"):
        for rs in (ROOT / crate).rglob("*.rs"):
            text = rs.read_text()
            targets = [
                (rs.parent / t).resolve()
                for t in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"', text)
            ]
            targets += [
                (ROOT / crate / t).resolve()
                for t in re.findall(r'(?:schema_path|query_path)\s*=\s*"([^"]+)"', text)
            ]
            for target in targets:
                relative = target.relative_to(ROOT).as_posix()
                if not any(relative == c or relative.startswith(c + "/") for c in copied):
                    fail(f"{rs.relative_to(ROOT)} compiles in {relative}, which the image does not copy")
    rust = workspace["workspace"]["package"]["rust-version"]
    if args.get("RUST_VERSION") != rust:
        fail(f"ARG RUST_VERSION={args.get('RUST_VERSION')} != the workspace's rust-version {rust}")
    # The binaries the build names exist.
    build = " ".join(r for _, w, r in instructions if w == "RUN" and "cargo build" in r)
    for bin_name in re.findall(r"--bin\s+(\S+)", build):
        if not any(
            f'name = "{bin_name}"' in p.read_text() for p in ROOT.glob("*/Cargo.toml")
        ):
            fail(f"cargo build --bin {bin_name}: no such binary in the workspace")
    # Procfile, heroku.yml and the image agree.
    procfile = {}
    for line in (DEPLOY / "Procfile").read_text().splitlines():
        m = re.fullmatch(r"([a-z]+):\s*(.+)", line.strip())
        if not m:
            fail(f"Procfile: not 'type: command': {line!r}")
            continue
        procfile[m.group(1)] = m.group(2)
    heroku = load_yaml(DEPLOY / "heroku.yml")
    if heroku.get("build", {}).get("docker", {}).get("web") != "Dockerfile":
        fail("heroku.yml build.docker.web must be Dockerfile (deploy.sh puts it at the root)")
    if "WHIST_COMMIT" not in heroku.get("build", {}).get("config", {}):
        fail("heroku.yml build.config must carry WHIST_COMMIT (deploy.sh fills it in)")
    run_web = heroku.get("run", {}).get("web")
    release = heroku.get("release", {})
    if cmd is None or procfile.get("web") != run_web or run_web != " ".join(cmd):
        fail(f"web command: Procfile {procfile.get('web')!r}, heroku.yml {run_web!r}, CMD {cmd!r} differ")
    if procfile.get("release") != " ".join(release.get("command", [])) or release.get("image") != "web":
        fail("the release command differs between the Procfile and heroku.yml (image must be web)")
    release_cmd = procfile.get("release", "")
    if f"scaling-service/deploy/release.sh /usr/local/bin/{release_cmd}" not in " ".join(
        f"{w} {r}" for _, w, r in instructions
    ):
        fail(f"the image does not install release.sh as /usr/local/bin/{release_cmd}")
    deploy = (DEPLOY / "deploy.sh").read_text()
    if "WHIST_COMMIT" not in deploy:
        fail("deploy.sh must fill in WHIST_COMMIT")


def check_dashboard(rules_out: str) -> None:
    """Grafana dashboard structure; writes its queries as recording rules for promtool."""
    dashboard = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    for key in ("uid", "title", "panels", "schemaVersion", "templating"):
        if key not in dashboard:
            fail(f"dashboard has no {key}")
    ids, exprs = set(), []
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    occupied: set[tuple[int, int]] = set()
    for panel in dashboard.get("panels", []):
        pid = panel.get("id")
        if pid in ids:
            fail(f"panel id {pid} is used twice")
        ids.add(pid)
        grid = panel.get("gridPos", {})
        if not {"h", "w", "x", "y"} <= grid.keys() or grid["x"] + grid["w"] > 24:
            fail(f"panel {pid} ({panel.get('title')}): gridPos {grid} is not inside 24 columns")
            continue
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                if (x, y) in occupied:
                    fail(f"panel {pid} ({panel.get('title')}) overlaps another")
                    break
                occupied.add((x, y))
            else:
                continue
            break
        if panel.get("type") == "row":
            continue
        if not panel.get("title"):
            fail(f"panel {pid} has no title")
        targets = panel.get("targets", [])
        if not targets:
            fail(f"panel {pid} ({panel.get('title')}) has no query")
        for t in targets:
            expr = t.get("expr", "")
            if not expr:
                fail(f"panel {pid}: a target without expr")
            for var in re.findall(r"\$(\w+)", expr):
                if var not in variables and not var.startswith("__"):
                    fail(f"panel {pid}: ${var} is not a dashboard variable")
            exprs.append(expr)
    # Grafana variables to concrete PromQL so promtool can parse the queries.
    rules = []
    for i, expr in enumerate(exprs):
        concrete = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
        concrete = re.sub(r"\$\w+", ".*", concrete)
        rules.append({"record": f"whist:dashboard_query:{i}", "expr": concrete})
    Path(rules_out).write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))


def check_alerts() -> None:
    alerts = load_yaml(OBSERVABILITY / "alerts.yml")
    anchors = markdown_anchors(OPERATIONS)
    names = []
    for group in alerts.get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("alert")
            if not name:
                fail(f"a rule without alert name in group {group.get('name')}")
                continue
            names.append(name)
            if rule.get("labels", {}).get("severity") not in ("critical", "warning"):
                fail(f"{name}: severity must be critical or warning")
            annotations = rule.get("annotations", {})
            if not annotations.get("summary"):
                fail(f"{name}: no summary")
            url = annotations.get("runbook_url", "")
            m = re.fullmatch(r"docs/operations\.md#([a-z0-9-]+)", url)
            if not m:
                fail(f"{name}: runbook_url must be docs/operations.md#anchor, not {url!r}")
            elif m.group(1) not in anchors:
                fail(f"{name}: docs/operations.md has no heading for #{m.group(1)}")
    if len(names) != len(set(names)):
        fail("an alert name is used twice")
    tests = load_yaml(OBSERVABILITY / "alerts.test.yml")
    fired = {
        t["alertname"]
        for test in tests.get("tests", [])
        for t in test.get("alert_rule_test", [])
        if t.get("exp_alerts")
    }
    for name in names:
        if name not in fired:
            fail(f"{name} is never shown firing in alerts.test.yml")
    required = {
        "spin-up failures": "WhistHostSpinupFailures",
        "subscription down": "WhistHostSubscriptionDown",
        "Docker event stream down": "WhistHostDockerEventsDown",
        "lingering hosts": "WhistLingeringHosts",
        "unmet assignments": "WhistUnmetAssignments",
        "heartbeat failures": "WhistHostHeartbeatFailures",
        "leader missing": "WhistScalingLeaderMissing",
        "a slow host": "WhistHostSlowJsonTransport",
        "a full disk": "WhistHostDiskFull",
        "a failing Docker Engine": "WhistHostDockerEngineDown",
        "failing scaling actions": "WhistScalingActionsFailing",
    }
    for what, name in required.items():
        if name not in names:
            fail(f"no alert for {what} ({name})")


def check_metrics() -> None:
    """Every metric the dashboard and the alerts use is documented; the host's documented
    metrics are exactly the ones its code registers."""
    documented = documented_metrics()
    if not documented:
        fail("docs/operations.md documents no metric (table rows | `whist_...` | type |)")
    used: dict[str, set[str]] = {}
    dashboard = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    for panel in dashboard.get("panels", []):
        for t in panel.get("targets", []):
            for n in metric_names(t.get("expr", "")):
                used.setdefault(n, set()).add("dashboard")
    for v in dashboard.get("templating", {}).get("list", []):
        for n in metric_names(json.dumps(v.get("query", ""))):
            used.setdefault(n, set()).add("dashboard variable")
    alerts = load_yaml(OBSERVABILITY / "alerts.yml")
    for group in alerts.get("groups", []):
        for rule in group.get("rules", []):
            for n in metric_names(rule.get("expr", "")):
                used.setdefault(n, set()).add(f"alert {rule.get('alert')}")
    for name, where in sorted(used.items()):
        if name not in documented:
            fail(f"{name} (used by {', '.join(sorted(where))}) is not documented in docs/operations.md")
    code = host_metrics()
    if not code:
        fail("found no metric in host-service/src/ops.rs")
    doc_host = {n for n in documented if n.startswith("whist_host_")}
    for name in sorted(doc_host - code):
        fail(f"{name} is documented but host-service/src/ops.rs does not register it")
    for name in sorted(code - doc_host):
        fail(f"{name} is registered by host-service/src/ops.rs but not documented")
    for name in sorted(histograms_in_code()):
        if documented.get(name) != "histogram":
            fail(f"{name} is a histogram in the code, documented as {documented.get(name)}")
    for name in sorted(used):
        if name.startswith("whist_host_") and name not in code:
            fail(f"{name} is used but the host service has no such metric")


def check_operations_doc() -> None:
    anchors = markdown_anchors(OPERATIONS)
    text = OPERATIONS.read_text()
    for heading in (
        "deploy-the-scaling-service",
        "build-and-roll-out-a-host-ami",
        "upgrade",
        "roll-back",
        "drain-a-host",
        "rotate-secrets",
        "read-the-dashboards",
        "incident-runbook",
        "metrics-contract",
    ):
        if heading not in anchors:
            fail(f"docs/operations.md has no section #{heading}")
    if text.count("```") % 2:
        fail("docs/operations.md has an unclosed code block")
    for ref in re.findall(r"\]\(((?!https?:)[^)#]+)(?:#[^)]*)?\)", text):
        if not (OPERATIONS.parent / ref).exists():
            fail(f"docs/operations.md links to {ref}, which does not exist")
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        if anchor not in anchors:
            fail(f"docs/operations.md links to #{anchor}, which is no heading")
    # Every shell block parses (bash -n): a pasted command must not die of a quoting slip.
    for n, block in enumerate(re.findall(r"```sh\n(.*?)```", text, re.S), 1):
        result = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        if result.returncode != 0:
            fail(f"docs/operations.md shell block {n} does not parse: {result.stderr.strip()}")
    for script in ("host-setup/setup_host.sh", "scaling-service/deploy/deploy.sh", "whist-imds-firewall.sh"):
        if script not in text:
            fail(f"docs/operations.md never mentions {script}")


# --- docs/parity.md: every name in a row is one the workspace has --------------------------------

PARITY = ROOT / "docs" / "parity.md"
# Where the code lives: what a row may name. docs/ is left out, so a row cannot vouch for itself.
SOURCE_DIRS = ("host-service", "scaling-service", "dbclient", "devstack", "host-setup", "logger",
               "database")
SOURCE_FILES = ("Makefile", "Cargo.toml", "schema.graphql", ".ci/run")
SOURCE_SUFFIXES = {".rs", ".sh", ".toml", ".json", ".sql", ".graphql", ".yml", ".yaml", ".py",
                   ".service", ".hcl", ".conf", ".rules", ".example", ".txt", ".csv", ""}
FILE_SUFFIXES = (".rs", ".sh", ".md", ".toml", ".json", ".sql", ".graphql", ".yml", ".yaml",
                 ".py", ".service", ".hcl", ".csv")
RUST_PATH = re.compile(r"^[A-Za-z_][\w]*(?:\.rs)?(?:::[A-Za-z_]\w*)+(?:\(.*\))?$")


def source_files() -> list[Path]:
    files = [ROOT / f for f in SOURCE_FILES if (ROOT / f).is_file()]
    for d in SOURCE_DIRS:
        for path in sorted((ROOT / d).rglob("*")):
            if path.is_file() and "target" not in path.relative_to(ROOT).parts \
                    and (path.suffix in SOURCE_SUFFIXES or path.name == "Dockerfile" or path.name == "Procfile"):
                files.append(path)
    return files


def parity_rows() -> list[tuple[int, str, str]]:
    """(line number, row id, the "here" column) of every feature table row in docs/parity.md."""
    rows = []
    for n, line in enumerate(PARITY.read_text().splitlines(), 1):
        cells = [c.strip() for c in line.strip().split("|")[1:-1]]
        if len(cells) < 4 or cells[0] in ("#", "") or set(cells[0]) <= set("-: "):
            continue
        rows.append((n, cells[0], cells[-1]))
    return rows


class Workspace:
    def __init__(self) -> None:
        self.files = source_files()
        self.rel = {str(f.relative_to(ROOT)) for f in self.files}
        self.names = {f.name for f in self.files}
        self.text = {f: f.read_text(errors="replace") for f in self.files}
        self.all = "\n".join(self.text.values())
        self.rust = "\n".join(t for f, t in self.text.items() if f.suffix == ".rs")
        self.makefile = (ROOT / "Makefile").read_text()
        self.migrations = "\n".join(
            t for f, t in self.text.items() if f.parent.name == "migrations")

    def path(self, token: str) -> str | None:
        """A repository path, `path:line`, `dir/`, a prefix of a file name
        (`database/migrations/0001`) or a bare file name found anywhere in the sources."""
        path = re.sub(r":\d+(-\d+)?$", "", token).rstrip("/")
        if (ROOT / path).exists():
            return None
        if "/" not in path and path in self.names:
            return None
        if "/" in path and any(r.endswith("/" + path) for r in self.rel):
            return None  # a path inside a crate, e.g. json_transport/tls.rs
        parent = (ROOT / path).parent
        if "/" in path and parent.is_dir() and any(c.name.startswith(Path(path).name) for c in parent.iterdir()):
            return None
        return f"no file {token}"

    def rust_item(self, token: str) -> str | None:
        """`a::b::c` (or `file.rs::fn`): every segment is a crate, module, file, type or function."""
        path = re.sub(r"\(.*\)$", "", token)
        segments = path.split("::")
        text = self.rust
        if segments[0].endswith(".rs"):
            matches = [t for f, t in self.text.items() if f.name == segments[0]]
            if not matches:
                return f"no file {segments[0]}"
            text = "\n".join(matches)
            segments = segments[1:]
        for seg in segments:
            if seg[0].isupper():
                if not re.search(rf"\b(struct|enum|trait|type)\s+{seg}\b", text):
                    return f"no type {seg} (in {token})"
            elif not (re.search(rf"\b(fn|mod)\s+{seg}\b", text) or f"{seg}.rs" in self.names
                      or (ROOT / seg.replace("_", "-") / "Cargo.toml").exists()
                      or (ROOT / seg / "Cargo.toml").exists()
                      or any(f"/{seg}/" in r for r in self.rel)):
                return f"no function, module or crate {seg} (in {token})"
        return None

    def flag(self, token: str) -> str | None:
        name = token.split("=")[0][2:]
        if re.search(rf'long\s*=\s*"{name}"', self.rust) or \
                re.search(rf"\bpub\s+{name.replace('-', '_')}\s*:", self.rust) or token.split("=")[0] in self.all:
            return None
        return f"no flag {token}"

    def literal(self, token: str) -> str | None:
        return None if token in self.all else f"{token} appears nowhere in the sources"

    def check(self, token: str) -> str | None:
        """None when the token names something that exists (or is not a name), else why not."""
        if " " in token or "<" in token or "://" in token or token[0] in "[{":
            if m := re.fullmatch(r"make ([\w-]+)", token):
                return None if re.search(rf"^{re.escape(m[1])}:", self.makefile, re.M) else f"no Makefile target {m[1]}"
            if m := re.match(r"([A-Za-z_]\w*(?:::\w+)+)\(", token):
                return self.rust_item(m[1])
            return None  # prose, a placeholder or a URL
        if RUST_PATH.match(token):
            return self.rust_item(token)
        if m := re.fullmatch(r"(\w+)\(\)", token):
            return None if re.search(rf"\bfn\s+{m[1]}\b", self.rust) else f"no function {m[1]}"
        if token.startswith("--"):
            return self.flag(token)
        if m := re.fullmatch(r"whist\.(\w+)(?:\.(\w+))?", token):
            missing = [x for x in m.groups() if x and not re.search(rf"\b{x}\b", self.migrations)]
            return f"no table or column {', '.join(missing)} in database/migrations" if missing else None
        if token.startswith("/"):
            return None if token in self.all else f"{token} appears nowhere in the sources"
        first = token.split("/")[0]
        if ("/" in token and (ROOT / first).is_dir()) or re.search(
                r"\.(" + "|".join(s[1:] for s in FILE_SUFFIXES) + r")(:\d+(-\d+)?)?$", token):
            return self.path(token)
        return self.literal(token)


def check_parity() -> None:
    """Every backticked name in the "here" column of docs/parity.md (a file, a Rust item, a
    Makefile target, a flag, an environment variable, a metric, a table) exists in the sources."""
    workspace = Workspace()
    rows = parity_rows()
    if len(rows) < 150:
        fail(f"docs/parity.md: found only {len(rows)} table rows")
    for line, row, here in rows:
        for token in re.findall(r"`([^`]+)`", here):
            if problem := workspace.check(token):
                fail(f"docs/parity.md:{line} (row {row}): {problem}")
        # Paths written without backticks, e.g. "(docs/database.md)".
        prose = re.sub(r"`[^`]*`", "", here)
        for token in re.findall(r"(?<![\w/.-])((?:docs|" + "|".join(SOURCE_DIRS) + r")/[\w./-]*\w)", prose):
            if problem := workspace.path(token):
                fail(f"docs/parity.md:{line} (row {row}): {problem}")


COMMANDS = {
    "unit": check_unit,
    "env-vars": check_env_vars,
    "userdata-contract": check_userdata_contract,
    "env-file": check_env_file,
    "daemon-json": check_daemon_json,
    "udev": check_udev,
    "sysctl": check_sysctl,
    "deploy": check_deploy,
    "pushed-tree": check_pushed_tree,
    "dashboard": check_dashboard,
    "alerts": check_alerts,
    "metrics": check_metrics,
    "operations-doc": check_operations_doc,
    "parity": check_parity,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: {sys.argv[0]} {{{','.join(COMMANDS)}}} [ARGS]", file=sys.stderr)
        sys.exit(2)
    COMMANDS[sys.argv[1]](*sys.argv[2:])
    sys.exit(finish())
