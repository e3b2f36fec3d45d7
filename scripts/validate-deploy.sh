#!/usr/bin/env bash
# Validates deploy/ (issue 6, "Done when": the manifests validate and the dashboard's queries
# name metrics that exist):
#
#   1. Kubernetes manifests (deploy/k8s/*.yaml) against the Kubernetes JSON schemas, strict
#      (unknown fields rejected), with kubernetes-validate from PyPI, which bundles the schemas
#      (no network at validation time), for the oldest and newest Kubernetes versions below.
#   2. Their consistency with topology.toml: the topology ConfigMap holds topology.toml as it is,
#      every stream worker has a StatefulSet (state volume, pod-name instance id, probes, metrics
#      port, grace period, resources, read-only root), a headless Service and a
#      PodDisruptionBudget whose selectors match; a stateless worker (kind outbox-relay) has a
#      Deployment with the same checks minus the volume and Service, its database URL from a
#      Secret; the inventory API (api.yaml) is a Deployment of `orderflow api` with its Service,
#      PDB, probes on its HTTP port and the admin token from a Secret; kustomization.yaml lists
#      every manifest.
#   3. Alert rules (deploy/prometheus/alerts.yaml): required keys, `promtool check rules`, and
#      the unit tests deploy/prometheus/alerts.test.yaml (`promtool test rules`).
#   4. The Grafana dashboard (deploy/grafana/orderflow-dashboard.json): JSON, panels, targets;
#      every query parses as PromQL (promtool); every metric name in the dashboard and in the
#      alert rules is one of deploy/metrics.txt or deploy/metrics-api.txt (the inventory API's
#      own registry) (histogram series: <name>_bucket|_sum|_count).
#   5. deploy/Dockerfile: the files it copies exist and are not excluded from the context.
#
# Tools are installed once into ~/.cache/orderflow/tools (ORDERFLOW_TOOLS):
#   py/                     kubernetes-validate (pip install --target), with its dependencies
#   promtool-<version>/     promtool, unpacked from Debian's `prometheus` package
#                           (apt-get download; nothing is installed system-wide)
# A `promtool` on PATH is used instead when present. ORDERFLOW_SKIP_PROMTOOL=1 skips the promtool
# checks (with a warning) on machines without apt.
#
# Usage: scripts/validate-deploy.sh              validate; exit 1 on any problem
#        scripts/validate-deploy.sh --sync-topology  rewrite deploy/k8s/configmap-topology.yaml
#                                                    from topology.toml, then validate
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${ORDERFLOW_TOOLS:-$HOME/.cache/orderflow/tools}"
PYDIR="$TOOLS/py"
KV_VERSION="1.37.0"
K8S_VERSIONS=("1.29.0" "1.37.0")
PROM_DEB_VERSION="2.42.0"
PYTHON="${PYTHON:-python3}"

say() { printf '==> %s\n' "$*"; }
die() { printf 'validate-deploy: %s\n' "$*" >&2; exit 1; }

SYNC=0
case "${1:-}" in
  "") ;;
  --sync-topology) SYNC=1 ;;
  -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
  *) die "unknown argument: $1 (try --help)" ;;
esac

command -v "$PYTHON" >/dev/null || die "python3 (3.11 or newer) is needed"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "python3 3.11 or newer is needed (tomllib)"

# ---------------------------------------------------------------- tools
install_kubernetes_validate() {
  if PYTHONPATH="$PYDIR" "$PYTHON" -c "import kubernetes_validate.version as v, sys; sys.exit(v.__version__ != '$KV_VERSION')" 2>/dev/null; then
    return
  fi
  say "installing kubernetes-validate $KV_VERSION into $PYDIR"
  rm -rf "$PYDIR"
  mkdir -p "$PYDIR"
  PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --target "$PYDIR" "kubernetes-validate==$KV_VERSION" \
    || die "pip could not install kubernetes-validate==$KV_VERSION into $PYDIR"
}

PROMTOOL=""
find_promtool() {
  if [[ "${ORDERFLOW_SKIP_PROMTOOL:-0}" == 1 ]]; then
    printf 'validate-deploy: WARNING: ORDERFLOW_SKIP_PROMTOOL=1: PromQL syntax and alert tests are not checked\n' >&2
    return
  fi
  if command -v promtool >/dev/null; then
    PROMTOOL="$(command -v promtool)"
    return
  fi
  local dir="$TOOLS/promtool-$PROM_DEB_VERSION"
  if [[ ! -x "$dir/promtool" ]]; then
    command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
      || die "promtool not found and no apt-get/dpkg-deb to fetch it (install Prometheus' promtool, or set ORDERFLOW_SKIP_PROMTOOL=1)"
    say "fetching promtool from Debian's prometheus package into $dir"
    local tmp
    tmp="$(mktemp -d)"
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" RETURN
    if ! (cd "$tmp" && apt-get download "prometheus=$PROM_DEB_VERSION*" >/dev/null 2>&1); then
      # the package lists may be missing or stale on a fresh machine
      if [[ "$(id -u)" == 0 ]]; then apt-get update -qq >/dev/null 2>&1 || true; fi
      (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1) \
        || die "apt-get download prometheus failed (run 'apt-get update' first, or set ORDERFLOW_SKIP_PROMTOOL=1)"
    fi
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x" || die "could not unpack the prometheus package"
    mkdir -p "$dir"
    install -m 0755 "$tmp/x/usr/bin/promtool" "$dir/promtool"
  fi
  PROMTOOL="$dir/promtool"
}

install_kubernetes_validate
find_promtool

# ---------------------------------------------------------------- checks
export ROOT PROMTOOL SYNC
export K8S_VERSIONS_CSV="$(IFS=,; echo "${K8S_VERSIONS[*]}")"
PYTHONPATH="$PYDIR" exec "$PYTHON" - <<'PYEOF'
import json, os, re, subprocess, sys, tempfile
from pathlib import Path

import yaml
import kubernetes_validate.utils as kv
from kubernetes_validate.version import __version__ as kv_version

ROOT = Path(os.environ["ROOT"])
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROMTOOL = os.environ.get("PROMTOOL") or None
VERSIONS = os.environ["K8S_VERSIONS_CSV"].split(",")
problems = []


def problem(where, msg):
    problems.append(f"{where}: {msg}")
    print(f"  FAIL {where}: {msg}")


def rel(p):
    return str(Path(p).relative_to(ROOT))


def section(title):
    print(f"==> {title}")


# ------------------------------------------------------------ topology ConfigMap
TOPOLOGY = (ROOT / "topology.toml").read_text()
CM_PATH = K8S / "configmap-topology.yaml"


def render_topology_configmap():
    body = "".join(("    " + line) if line.strip() else "\n" for line in TOPOLOGY.splitlines(keepends=True))
    if not body.endswith("\n"):
        body += "\n"
    return (
        "# GENERATED from topology.toml by `scripts/validate-deploy.sh --sync-topology`: do not edit here.\n"
        "# Change topology.toml and re-run it (validate-deploy.sh fails while the two differ). A\n"
        "# per-environment topology (e.g. guarantee = \"exactly_once\" on Apache Kafka, SASL/TLS in\n"
        "# [broker.properties]) belongs in an overlay that replaces this ConfigMap (deploy/README.md).\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: orderflow-topology\n"
        "  labels:\n"
        "    app.kubernetes.io/name: orderflow\n"
        "    app.kubernetes.io/part-of: orderflow\n"
        "data:\n"
        "  topology.toml: |\n" + body
    )


if os.environ.get("SYNC") == "1":
    CM_PATH.write_text(render_topology_configmap())
    print(f"==> wrote {rel(CM_PATH)} from topology.toml")


def load_docs(path):
    try:
        return [d for d in yaml.safe_load_all(path.read_text()) if d]
    except yaml.YAMLError as e:
        problem(rel(path), f"YAML does not parse: {e}")
        return []


# ------------------------------------------------------------ 1. Kubernetes schemas
section(f"Kubernetes manifests against the JSON schemas (kubernetes-validate {kv_version}, strict, Kubernetes {', '.join(VERSIONS)})")
manifests = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
if not manifests:
    problem("deploy/k8s", "no manifests")
resources = []  # (path, doc)
for path in manifests:
    docs = load_docs(path)
    for doc in docs:
        resources.append((path, doc))
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        for version in VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                path_in = ".".join(str(x) for x in e.absolute_path) or "(top)"
                problem(rel(path), f"{name} (Kubernetes {version}) at {path_in}: {e.message}")
                continue
            except (kv.SchemaNotFoundError, kv.InvalidSchemaError, kv.VersionNotSupportedError) as e:
                problem(rel(path), f"{name} (Kubernetes {version}): {getattr(e, 'message', e)}")
                continue
        if not any(p.startswith(rel(path)) for p in problems):
            print(f"  ok   {rel(path)}: {name}")

# ------------------------------------------------------------ 2. consistency
section("manifests against topology.toml and each other")
import tomllib

topo = tomllib.loads(TOPOLOGY)
workers = sorted(topo.get("workers", {}))

# kustomization
kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
listed = kust.get("resources", [])
NOT_LISTED = {"job-topics.yaml", "secret-kafka.example.yaml", "secret-outbox-db.example.yaml", "secret-api-admin.example.yaml"}
for r in listed:
    if not (K8S / r).is_file():
        problem("deploy/k8s/kustomization.yaml", f"lists {r}, which does not exist")
for p in manifests:
    if p.name not in listed and p.name not in NOT_LISTED:
        problem("deploy/k8s/kustomization.yaml", f"does not list {p.name}")

# topology ConfigMap
cms = [d for p, d in resources if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "orderflow-topology"]
if len(cms) != 1:
    problem(rel(CM_PATH), "expected exactly one ConfigMap orderflow-topology")
elif cms[0].get("data", {}).get("topology.toml") != TOPOLOGY:
    problem(rel(CM_PATH), "differs from topology.toml: run scripts/validate-deploy.sh --sync-topology")
else:
    print(f"  ok   {rel(CM_PATH)} holds topology.toml as it is")

by_kind = {}
for p, d in resources:
    by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = (p, d)


def env_of(c):
    return {e["name"]: e for e in c.get("env", [])}


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# Worker kinds that keep no sled state (no store, no consumer group): a Deployment, no volume.
STATELESS_KINDS = {"outbox-relay"}

def workload_parts(path, d):
    """A Deployment's or StatefulSet's file (for messages), spec, pod spec, pod labels and
    annotations."""
    spec = d["spec"]
    meta = spec["template"]["metadata"]
    return rel(path), spec, spec["template"]["spec"], meta.get("labels", {}), meta.get("annotations", {})


for w in workers:
    name = f"orderflow-{w}"
    where = f"deploy/k8s (worker {w})"
    stateless = topo["workers"][w].get("kind") in STATELESS_KINDS
    workload = "Deployment" if stateless else "StatefulSet"
    sts = by_kind.get(workload, {}).get(name)
    if not sts:
        problem(where, f"no {workload} {name}" + (" (a stateless worker)" if stateless else " (every stream worker keeps sled state)"))
        continue
    where, spec, pod, labels, ann = workload_parts(*sts)
    if not matches(spec["selector"].get("matchLabels"), labels):
        problem(where, f"{workload} selector does not match its pod labels")
    c = pod["containers"][0]
    args = c.get("args", [])
    if args[:1] != ["run"] or "--worker" not in args or args[args.index("--worker") + 1] != w:
        problem(where, f"container args must be `run ... --worker {w}`: {args}")
    if "--metrics-addr" not in args or not args[args.index("--metrics-addr") + 1].endswith(":9464"):
        problem(where, "container args need --metrics-addr 0.0.0.0:9464")
    env = env_of(c)
    inst = env.get("ORDERFLOW_INSTANCE", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    if inst != "metadata.name":
        problem(where, "ORDERFLOW_INSTANCE must come from the pod name (fieldRef metadata.name): static membership and the sled directory use it")
    if stateless:
        if "secretKeyRef" not in env.get("ORDERFLOW_DATABASE_URL", {}).get("valueFrom", {}):
            problem(where, "ORDERFLOW_DATABASE_URL must come from a Secret (the topology's database_url is the demo's SQLite file)")
    elif env.get("ORDERFLOW_STATE_DIR", {}).get("value") != "/var/lib/orderflow":
        problem(where, "ORDERFLOW_STATE_DIR must be /var/lib/orderflow")
    if "ORDERFLOW_BOOTSTRAP" not in env or "valueFrom" not in env["ORDERFLOW_BOOTSTRAP"]:
        problem(where, "ORDERFLOW_BOOTSTRAP must come from a ConfigMap or Secret")
    for k, e in env.items():
        if re.search(r"PASSWORD|SECRET|TOKEN|USERNAME", k) and "secretKeyRef" not in e.get("valueFrom", {}):
            problem(where, f"{k} must come from a Secret")
    for k in ("ORDERFLOW_KAFKA_SASL_USERNAME", "ORDERFLOW_KAFKA_SASL_PASSWORD"):
        if k not in env:
            problem(where, f"{k} (from the Secret orderflow-kafka) missing")
    if pod.get("enableServiceLinks") is not False:
        problem(where, "enableServiceLinks: false (Service variables named ORDERFLOW_KAFKA_* would become librdkafka properties)")
    grace = env.get("ORDERFLOW_GRACE_PERIOD", {}).get("value")
    m = re.fullmatch(r"(\d+)s", grace or "")
    if not m or int(m.group(1)) >= pod.get("terminationGracePeriodSeconds", 30):
        problem(where, "ORDERFLOW_GRACE_PERIOD (e.g. 50s) must be below terminationGracePeriodSeconds")
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    vct = [t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])]
    if not stateless and not any(m["mountPath"] == "/var/lib/orderflow" and m["name"] in vct for m in mounts.values()):
        problem(where, "/var/lib/orderflow must be mounted from a volumeClaimTemplate")
    if mounts.get("topology", {}).get("mountPath") != "/etc/orderflow/topology.toml":
        problem(where, "the topology ConfigMap must be mounted at /etc/orderflow/topology.toml (subPath: avro/ stays beside it)")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    if ports.get("metrics") != 9464:
        problem(where, "container port 9464 named metrics")
    for probe, path_ in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        got = c.get(probe, {}).get("httpGet", {})
        if got.get("path") != path_ or got.get("port") not in ("metrics", 9464):
            problem(where, f"{probe} must GET {path_} on the metrics port")
    st = c.get("startupProbe", {})
    if st.get("periodSeconds", 10) * st.get("failureThreshold", 3) < 300:
        problem(where, "startupProbe should allow at least 5 minutes")
    if pod.get("terminationGracePeriodSeconds", 30) < 60:
        problem(where, "terminationGracePeriodSeconds must be at least 60 (graceful stop)")
    res = c.get("resources", {})
    if not res.get("requests") or not res.get("limits"):
        problem(where, "resources requests and limits")
    sc = c.get("securityContext", {})
    if not sc.get("readOnlyRootFilesystem") or not (sc.get("runAsNonRoot") or pod.get("securityContext", {}).get("runAsNonRoot")):
        problem(where, "non-root with a read-only root filesystem")
    if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != "9464":
        problem(where, "Prometheus scrape annotations on the pod template")
    svc = None if stateless else by_kind.get("Service", {}).get(spec["serviceName"])
    if stateless:
        pass  # no Service: Prometheus finds the pods through their annotations
    elif not svc:
        problem(where, f"no Service {spec['serviceName']} (serviceName)")
    else:
        sv = svc[1]["spec"]
        if sv.get("clusterIP") != "None":
            problem(rel(svc[0]), f"Service {spec['serviceName']} must be headless")
        if not matches(sv.get("selector"), labels):
            problem(rel(svc[0]), f"Service {spec['serviceName']} selector does not match the pods")
    pdbs = [d for _, d in by_kind.get("PodDisruptionBudget", {}).values() if matches(d["spec"]["selector"].get("matchLabels"), labels)]
    if len(pdbs) != 1:
        problem(where, f"exactly one PodDisruptionBudget must select the pods of {w} (found {len(pdbs)})")
    elif pdbs[0]["spec"].get("maxUnavailable") != 1:
        problem(where, "PodDisruptionBudget maxUnavailable 1")
    print(f"  ok   {where}: {workload} {name}, replicas {spec.get('replicas', 1)}" if not any(p.startswith(where) for p in problems) else f"  --   {where}")

# The inventory API (issue 17): `orderflow api`, stateless, its own Service; the admin token
# from a Secret; probes and the scrape on its HTTP port.
api = by_kind.get("Deployment", {}).get("orderflow-api")
if not api:
    problem("deploy/k8s", "no Deployment orderflow-api (the inventory API)")
else:
    where, spec, pod, labels, ann = workload_parts(*api)
    c = pod["containers"][0]
    args = c.get("args", [])
    env = env_of(c)
    if args[:1] != ["api"] or "--listen" not in args or not args[args.index("--listen") + 1].endswith(":8080"):
        problem(where, f"container args must be `api ... --listen 0.0.0.0:8080`: {args}")
    if "secretKeyRef" not in env.get("ORDERFLOW_API_ADMIN_TOKEN", {}).get("valueFrom", {}):
        problem(where, "ORDERFLOW_API_ADMIN_TOKEN must come from a Secret")
    for k, e in env.items():
        if re.search(r"PASSWORD|SECRET|TOKEN|USERNAME", k) and "secretKeyRef" not in e.get("valueFrom", {}):
            problem(where, f"{k} must come from a Secret")
    if "ORDERFLOW_BOOTSTRAP" not in env or "valueFrom" not in env["ORDERFLOW_BOOTSTRAP"]:
        problem(where, "ORDERFLOW_BOOTSTRAP must come from a ConfigMap or Secret")
    if pod.get("enableServiceLinks") is not False:
        problem(where, "enableServiceLinks: false")
    if {p_["name"]: p_["containerPort"] for p_ in c.get("ports", [])}.get("http") != 8080:
        problem(where, "container port 8080 named http")
    for probe, path_ in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        got = c.get(probe, {}).get("httpGet", {})
        if got.get("path") != path_ or got.get("port") not in ("http", 8080):
            problem(where, f"{probe} must GET {path_} on the http port")
    sc = c.get("securityContext", {})
    if not sc.get("readOnlyRootFilesystem") or not (sc.get("runAsNonRoot") or pod.get("securityContext", {}).get("runAsNonRoot")):
        problem(where, "non-root with a read-only root filesystem")
    if not c.get("resources", {}).get("limits"):
        problem(where, "resources requests and limits")
    if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != "8080":
        problem(where, "Prometheus scrape annotations (port 8080) on the pod template")
    svc = by_kind.get("Service", {}).get("orderflow-api")
    if not svc or not matches(svc[1]["spec"].get("selector"), labels):
        problem(where, "a Service orderflow-api selecting the API pods")
    pdbs = [x for _, x in by_kind.get("PodDisruptionBudget", {}).values() if matches(x["spec"]["selector"].get("matchLabels"), labels)]
    if len(pdbs) != 1:
        problem(where, f"exactly one PodDisruptionBudget must select the API pods (found {len(pdbs)})")
    print(f"  ok   {where}: Deployment orderflow-api, replicas {spec.get('replicas', 1)}" if not any(p_.startswith(where) for p_ in problems) else f"  --   {where}")

for kind in ("StatefulSet", "Deployment"):
    for n, (p, d) in by_kind.get(kind, {}).items():
        args = d["spec"]["template"]["spec"]["containers"][0].get("args", [])
        if args[:1] == ["api"]:
            continue
        w = args[args.index("--worker") + 1] if "--worker" in args else None
        if w not in workers:
            problem(rel(p), f"{kind} {n} runs worker {w}, which topology.toml does not declare")

# ------------------------------------------------------------ 3/4. metric names, PromQL
names = {}
# The workers' families (deploy/metrics.txt) and the inventory API's (deploy/metrics-api.txt,
# its own registry on its HTTP port); the dashboard and the rules may use both.
for listing in ("metrics.txt", "metrics-api.txt"):
    for i, line in enumerate((DEPLOY / listing).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("counter", "gauge", "histogram") or not re.fullmatch(r"orderflow_[a-z0-9_]+", parts[0]):
            problem(f"deploy/{listing}:{i}", f"expected `orderflow_<name> counter|gauge|histogram`: {line!r}")
            continue
        if parts[0] in names:
            problem(f"deploy/{listing}:{i}", f"{parts[0]} listed twice")
        if parts[1] == "counter" and not parts[0].endswith("_total"):
            problem(f"deploy/{listing}:{i}", f"counter {parts[0]} must end in _total")
        names[parts[0]] = parts[1]
allowed = set()
for n, t in names.items():
    allowed |= {n + s for s in ("_bucket", "_sum", "_count")} if t == "histogram" else {n}

KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
            "offset", "bool", "inf", "nan", "atan2", "start", "end"}
GRAFANA_VARS = [(r"\$__rate_interval|\$\{__rate_interval\}", "5m"), (r"\$__range|\$\{__range\}", "1h"),
                (r"\$__interval|\$\{__interval\}", "1m"), (r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "x")]


def grafana_to_promql(expr):
    for pat, rep in GRAFANA_VARS:
        expr = re.sub(pat, rep, expr)
    return expr


def metric_names(expr):
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names (inside {} or by/on/... lists) or durations."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"#[^\n]*", "", s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    out = []
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if m.start() > 0 and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue  # 1e3, 5m
        if s[m.end():].lstrip().startswith("("):
            continue  # function or aggregation
        if m.group(0).lower() in KEYWORDS:
            continue
        out.append(m.group(0))
    return out


used = set()


def check_names(where, expr, extra=()):
    for n in metric_names(expr):
        base = re.sub(r"_(bucket|sum|count)$", "", n)
        used.add(base if base in names else n)
        if n in allowed or n in extra:
            continue
        hint = ""
        if n.startswith("orderflow_") and names.get(base) == "histogram" and n == base:
            hint = " (a histogram: use _bucket, _sum or _count)"
        elif n.startswith("orderflow_"):
            hint = " (not in deploy/metrics.txt or deploy/metrics-api.txt)"
        else:
            hint = " (not an orderflow metric)"
        problem(where, f"unknown metric {n}{hint}")


def promtool_check(where, exprs):
    """exprs: [(label, promql)]; parses them all with promtool as recording rules."""
    if not PROMTOOL or not exprs:
        return False
    rules = {"groups": [{"name": "check", "rules": [{"record": f"check:expr_{i}", "expr": e} for i, (_, e) in enumerate(exprs)]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(rules, f)
    r = subprocess.run([PROMTOOL, "check", "rules", f.name], capture_output=True, text=True)
    os.unlink(f.name)
    if r.returncode != 0:
        out = r.stdout + r.stderr
        for i, (label, e) in enumerate(exprs):
            if f'"check:expr_{i}"' in out:
                problem(where, f"{label}: PromQL does not parse: {e}")
        problem(where, "promtool check rules (dashboard queries):\n    " + out.strip().replace("\n", "\n    "))
        return False
    return True


# alerts
section("alert rules (deploy/prometheus/alerts.yaml)")
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
try:
    rules_doc = yaml.safe_load(ALERTS.read_text())
except yaml.YAMLError as e:
    rules_doc = None
    problem(rel(ALERTS), f"YAML does not parse: {e}")
alert_names = []
if rules_doc is not None:
    groups = rules_doc.get("groups") if isinstance(rules_doc, dict) else None
    if not groups:
        problem(rel(ALERTS), "no `groups:`")
    for g in groups or []:
        if not g.get("name") or not g.get("rules"):
            problem(rel(ALERTS), f"group needs name and rules: {g.get('name')}")
        for r in g.get("rules", []):
            a = r.get("alert")
            where = f"{rel(ALERTS)} ({a or r.get('record')})"
            if not a:
                continue
            alert_names.append(a)
            if not isinstance(r.get("expr"), str) or not r["expr"].strip():
                problem(where, "no expr")
                continue
            if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
                problem(where, "labels.severity must be critical, warning or info")
            for k in ("summary", "description"):
                if not r.get("annotations", {}).get(k):
                    problem(where, f"annotations.{k} missing")
            check_names(where, r["expr"], extra={"up"})
    for must in ("OrderflowReservationFailureRateHigh", "OrderflowProcessingDelayHigh", "OrderflowDeadLetterRecords",
                 "OrderflowStockConservationMismatch", "OrderflowConsumerLagGrowing", "OrderflowWorkerDown"):
        if must not in alert_names:
            problem(rel(ALERTS), f"alert {must} missing")
    if len(alert_names) != len(set(alert_names)):
        problem(rel(ALERTS), "duplicate alert names")
if PROMTOOL:
    for cmd in (["check", "rules", str(ALERTS)], ["test", "rules", str(DEPLOY / "prometheus" / "alerts.test.yaml")]):
        r = subprocess.run([PROMTOOL, *cmd], capture_output=True, text=True, cwd=ALERTS.parent)
        out = (r.stdout + r.stderr).strip()
        print("  " + f"promtool {cmd[0]} {cmd[1]}: " + out.replace("\n", "\n  "))
        if r.returncode != 0:
            problem(rel(ALERTS), f"promtool {' '.join(cmd[:2])} failed")
print(f"  {len(alert_names)} alerts: {', '.join(alert_names)}")

scrape = yaml.safe_load((DEPLOY / "prometheus" / "scrape-config.yaml").read_text())
jobs = [j.get("job_name") for j in scrape.get("scrape_configs", [])]
for job in ("orderflow", "orderflow-api"):
    if job not in jobs:
        problem("deploy/prometheus/scrape-config.yaml", f"needs the scrape job `{job}` (alerts select up{{job=\"{job}\"}})")

# dashboard
section("Grafana dashboard (deploy/grafana/orderflow-dashboard.json)")
DASH = DEPLOY / "grafana" / "orderflow-dashboard.json"
try:
    dash = json.loads(DASH.read_text())
except json.JSONDecodeError as e:
    dash = None
    problem(rel(DASH), f"JSON does not parse: {e}")
if dash is not None:
    for k in ("uid", "title", "panels", "schemaVersion"):
        if k not in dash:
            problem(rel(DASH), f"no `{k}`")

    def all_panels(ps):
        for p in ps:
            yield p
            yield from all_panels(p.get("panels", []))

    exprs = []
    ids = []
    n_targets = 0
    for p in all_panels(dash.get("panels", [])):
        ids.append(p.get("id"))
        where = f"{rel(DASH)} (panel {p.get('id')} {p.get('title')!r})"
        if "gridPos" not in p:
            problem(where, "no gridPos")
        if p.get("type") == "row":
            continue
        targets = p.get("targets", [])
        if not targets:
            problem(where, "no targets")
        refs = [t.get("refId") for t in targets]
        if len(refs) != len(set(refs)) or None in refs:
            problem(where, "targets need distinct refIds")
        for t in targets:
            e = t.get("expr")
            if not isinstance(e, str) or not e.strip():
                problem(where, f"target {t.get('refId')} has no expr")
                continue
            n_targets += 1
            check_names(where, e)
            exprs.append((f"panel {p.get('id')} {p.get('title')!r} target {t.get('refId')}", grafana_to_promql(e)))
    if len(ids) != len(set(ids)):
        problem(rel(DASH), "duplicate panel ids")
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if v.get("type") == "query" and isinstance(q, str):
            m = re.match(r"\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,", q)
            check_names(f"{rel(DASH)} (variable {v.get('name')})", m.group(1) if m else q)
    parsed = promtool_check(rel(DASH), exprs)
    print(f"  {sum(1 for p in all_panels(dash.get('panels', [])) if p.get('type') != 'row')} panels, {n_targets} queries"
          + ("; all parse as PromQL (promtool)" if parsed else "" if PROMTOOL else "; PromQL syntax NOT checked (no promtool)"))
    unused = sorted(set(names) - used)
    if unused:
        print(f"  note: listed metrics that no panel or alert uses: {', '.join(unused)}")
if not any("unknown metric" in p for p in problems):
    print(f"  metric names used: {len(used & set(names))} of the {len(names)} in deploy/metrics.txt and metrics-api.txt; none outside them")

# ------------------------------------------------------------ 5. Dockerfile
section("deploy/Dockerfile")
docker = (DEPLOY / "Dockerfile").read_text()
ignore = [l.strip() for l in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
stages = []
for line in docker.splitlines():
    m = re.match(r"\s*FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I)
    if m and m.group(1):
        stages.append(m.group(1))
    m = re.match(r"\s*COPY\s+(.*)", line, re.I)
    if not m or "--from=" in line:
        continue
    srcs = [a for a in m.group(1).split() if not a.startswith("--")][:-1]
    for s in srcs:
        if not (ROOT / s).exists():
            problem("deploy/Dockerfile", f"COPY {s}: not in the repository")
        top = s.strip("./").split("/")[0]
        if any(i.lstrip("*/").split("/")[0] == top for i in ignore):
            problem("deploy/Dockerfile", f"COPY {s}: excluded by deploy/Dockerfile.dockerignore")
for needle, why in (("cargo build --release -p orderflow --locked", "the release build"),
                    ('ENTRYPOINT ["orderflow"]', "the entrypoint"), ("USER 10001", "a non-root user")):
    if needle not in docker:
        problem("deploy/Dockerfile", f"missing {why}: {needle}")
if not any(p.startswith("deploy/Dockerfile") for p in problems):
    print(f"  ok   stages {', '.join(stages) or '-'}; COPY sources present and not ignored")

print()
if problems:
    print(f"validate-deploy: {len(problems)} problem(s)")
    sys.exit(1)
print("validate-deploy: ok")
PYEOF
