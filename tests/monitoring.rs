//! Issue 5 end to end: the Grafana dashboards and the Prometheus alert rules in
//! `deploy/`, checked against live data.
//!
//! One `lapse run` (event-time clock, so months of clinic life pass in seconds)
//! gets traffic through every path: all five event kinds in both framings, a cap
//! hit and violations, a suppression, a throttle, dead letters, a duplicate,
//! recall triggers and outcomes in a treatment and a holdout tenant, a Redis
//! outage and a broker outage. A real Prometheus (the Debian package) scrapes it
//! every second with `deploy/prometheus/alerts.yml` loaded. Then **every PromQL
//! expression of every dashboard panel** is evaluated through the HTTP API and
//! must return data, and every alert rule must evaluate without error.
//!
//! Also checked here, offline: `promtool check config` / `check rules`, the
//! dashboards' structure (valid JSON, unique panel ids, only the provisioned
//! datasource), the Kubernetes manifests (structure, `lapse check-config` on the
//! ConfigMap, the Kubernetes schemas via the `kubernetes-validate` pip package)
//! and `docker-compose.yml` (structure, mounts of the monitoring files, the
//! Compose specification via the `compose-spec` pip package).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::stack::*;
use common::*;
use lapse::codec::Framing;
use lapse::domain::event::*;
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const DASHBOARDS: [&str; 3] = ["pipeline-health", "engagement-throttling", "recall-funnel"];
const H: i64 = 3_600_000;
const MIN: i64 = 60_000;
const EVENT_TIME: &str = "[clock]\nmode = \"event\"\n[timers]\npoll_interval = \"20ms\"\n";
/// Stand-ins for Grafana's interval variables: scrapes are every second, the
/// whole run lasts about a minute.
const RATE_INTERVAL: &str = "1m";
const RANGE: &str = "1h";

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn tool(name: &str) -> PathBuf {
    find_on_path(name).unwrap_or_else(|| {
        panic!("{name} not found on PATH: run scripts/install-deps (Debian package prometheus)")
    })
}

// ---------------------------------------------------------------------------
// Offline checks
// ---------------------------------------------------------------------------

fn promtool_checks() {
    let promtool = tool("promtool");
    for args in [
        ["check", "config", "deploy/prometheus/prometheus.yml"],
        ["check", "rules", "deploy/prometheus/alerts.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(ROOT)
            .output()
            .expect("run promtool");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
        assert!(
            !text.contains("WARNING"),
            "promtool {args:?} warns:\n{text}"
        );
    }
}

/// One dashboard panel with its PromQL expressions.
struct Panel {
    dashboard: String,
    title: String,
    exprs: Vec<String>,
}

/// A template variable: `label_values(METRIC_SELECTOR, LABEL)`.
struct Variable {
    dashboard: String,
    name: String,
    selector: String,
    label: String,
}

fn walk_datasources(v: &Value, path: &str, uid: &str, bad: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let here = format!("{path}.{k}");
                if k == "datasource" {
                    let ok = x.get("uid").and_then(Value::as_str) == Some(uid)
                        && x.get("type").and_then(Value::as_str) == Some("prometheus");
                    if !ok {
                        bad.push(format!("{here} = {x}"));
                    }
                }
                walk_datasources(x, &here, uid, bad);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                walk_datasources(x, &format!("{path}[{i}]"), uid, bad);
            }
        }
        _ => {}
    }
}

/// `YYYY-MM-DDTHH:MM` in Shanghai (an experiment's start or end).
fn shanghai_local(ms: i64) -> String {
    use chrono::TimeZone;
    chrono_tz::Asia::Shanghai
        .timestamp_millis_opt(ms)
        .unwrap()
        .format("%Y-%m-%dT%H:%M")
        .to_string()
}

/// Parses and checks the dashboards; returns their panels and variables.
fn dashboards(datasource_uid: &str) -> (Vec<Panel>, Vec<Variable>) {
    let mut panels = Vec::new();
    let mut vars = Vec::new();
    let mut uids = BTreeSet::new();
    let on_disk: BTreeSet<String> =
        std::fs::read_dir(Path::new(ROOT).join("deploy/grafana/dashboards"))
            .expect("deploy/grafana/dashboards")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
    let expected: BTreeSet<String> = DASHBOARDS.iter().map(|d| format!("{d}.json")).collect();
    assert_eq!(on_disk, expected, "dashboards in deploy/grafana/dashboards");
    for name in DASHBOARDS {
        let file = format!("deploy/grafana/dashboards/{name}.json");
        let text = std::fs::read_to_string(Path::new(ROOT).join(&file)).expect(&file);
        let d: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file} is not valid JSON: {e}"));
        let title = d["title"].as_str().unwrap_or_default().to_string();
        assert!(!title.is_empty(), "{file}: title");
        let uid = d["uid"].as_str().unwrap_or_default();
        assert!(
            !uid.is_empty() && uids.insert(uid.to_string()),
            "{file}: uid missing or not unique"
        );
        let mut bad = Vec::new();
        walk_datasources(&d, name, datasource_uid, &mut bad);
        assert!(
            bad.is_empty(),
            "{file}: every datasource must be the provisioned one (uid {datasource_uid}): {bad:#?}"
        );
        // Panels, including those nested in collapsed rows.
        let mut flat = Vec::new();
        for p in d["panels"].as_array().expect("panels") {
            flat.push(p);
            if let Some(inner) = p["panels"].as_array() {
                flat.extend(inner);
            }
        }
        let mut ids = BTreeSet::new();
        let mut uses = (false, false);
        for p in &flat {
            let id = p["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{file}: panel without numeric id: {}", p["title"]));
            assert!(ids.insert(id), "{file}: panel id {id} is not unique");
            let ptitle = p["title"].as_str().unwrap_or_default().to_string();
            assert!(!ptitle.is_empty(), "{file}: panel {id} has no title");
            assert!(p["gridPos"].is_object(), "{file}: {ptitle}: gridPos");
            if p["type"] == "row" {
                continue;
            }
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            assert!(!targets.is_empty(), "{file}: {ptitle}: no targets");
            let mut refs = BTreeSet::new();
            let mut exprs = Vec::new();
            for t in targets {
                let expr = t["expr"].as_str().unwrap_or_default().to_string();
                assert!(!expr.trim().is_empty(), "{file}: {ptitle}: empty expr");
                let r = t["refId"].as_str().unwrap_or_default().to_string();
                assert!(refs.insert(r), "{file}: {ptitle}: duplicate refId");
                uses.0 |= expr.contains("$tenant");
                uses.1 |= expr.contains("$channel");
                exprs.push(expr);
            }
            panels.push(Panel {
                dashboard: title.clone(),
                title: ptitle,
                exprs,
            });
        }
        assert!(
            uses.0 && uses.1,
            "{file}: panels must be templated by $tenant and $channel"
        );
        let mut names = BTreeSet::new();
        for v in d["templating"]["list"].as_array().expect("templating.list") {
            let vname = v["name"].as_str().unwrap_or_default().to_string();
            let q = v["definition"].as_str().unwrap_or_default();
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|s| s.strip_suffix(')'))
                .unwrap_or_else(|| {
                    panic!("{file}: variable {vname}: expected label_values(...), got {q}")
                });
            let (selector, label) = inner
                .rsplit_once(',')
                .unwrap_or_else(|| panic!("{file}: variable {vname}: {q}"));
            assert_eq!(
                v["query"]["query"].as_str(),
                Some(q),
                "{file}: variable {vname}: query and definition differ"
            );
            names.insert(vname.clone());
            vars.push(Variable {
                dashboard: title.clone(),
                name: vname,
                selector: selector.trim().to_string(),
                label: label.trim().to_string(),
            });
        }
        assert!(
            names.contains("tenant") && names.contains("channel"),
            "{file}: template variables tenant and channel: {names:?}"
        );
    }
    (panels, vars)
}

/// Structural and schema checks of the Grafana provisioning, `deploy/k8s` and
/// `docker-compose.yml` (Python: PyYAML ships with the machine image; the schema
/// validators are pip packages installed by scripts/install-deps). Writes the
/// ConfigMap's lapse.toml to `toml_out`; returns the provisioned datasource uid.
fn deploy_checks(toml_out: &Path) -> String {
    let python = find_on_path("python3")
        .unwrap_or_else(|| panic!("python3 not found: needed (with PyYAML) to check deploy/"));
    let out = Command::new(python)
        .arg("-c")
        .arg(DEPLOY_CHECKS)
        .arg(ROOT)
        .arg(toml_out)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "deploy checks (python3) failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim()).expect("deploy checks report");
    let errors: Vec<&str> = report["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        errors.is_empty(),
        "deploy/ and docker-compose.yml:\n{}",
        errors.join("\n")
    );
    let skipped: Vec<&str> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        skipped.is_empty(),
        "{}\nrun scripts/install-deps (it pip-installs compose-spec and kubernetes-validate)",
        skipped.join("\n")
    );
    eprintln!("deploy checks passed: {}", report["checks"]);
    report["datasource_uid"]
        .as_str()
        .expect("datasource uid")
        .to_string()
}

const DEPLOY_CHECKS: &str = r###"
import json, os, re, sys, tomllib

import yaml

root, out_toml = sys.argv[1], sys.argv[2]
errors, checks, skipped = [], [], []
report = {"errors": errors, "checks": checks, "skipped": skipped}


def err(where, msg):
    errors.append(f"{where}: {msg}")


def load_all(rel):
    with open(os.path.join(root, rel), encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def dur_s(s):
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)", str(s).strip())
    if not m:
        return None
    n, u = int(m.group(1)), m.group(2)
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[u]


# --- Grafana provisioning ----------------------------------------------------
ds = load_all("deploy/grafana/provisioning/datasources/prometheus.yml")[0]
dss = ds.get("datasources") or []
if len(dss) != 1 or dss[0].get("type") != "prometheus" or not dss[0].get("uid"):
    err("datasources/prometheus.yml", "exactly one prometheus datasource with a uid expected")
else:
    report["datasource_uid"] = dss[0]["uid"]
prov = load_all("deploy/grafana/provisioning/dashboards/lapse.yml")[0]
providers = prov.get("providers") or []
if len(providers) != 1 or providers[0].get("type") != "file" or not (providers[0].get("options") or {}).get("path"):
    err("dashboards/lapse.yml", "one file provider with options.path expected")
    dash_path = None
else:
    dash_path = providers[0]["options"]["path"]
checks.append("grafana provisioning")

# --- Kubernetes ----------------------------------------------------------------
k8s_dir = os.path.join(root, "deploy/k8s")
docs = {}
for name in sorted(os.listdir(k8s_dir)):
    if not name.endswith((".yml", ".yaml")):
        continue
    for d in load_all(f"deploy/k8s/{name}"):
        if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
            err(f"deploy/k8s/{name}", "every document needs apiVersion and kind")
            continue
        docs.setdefault(d["kind"], []).append((name, d))
for kind in ["Deployment", "ConfigMap", "Service", "PodDisruptionBudget", "Secret"]:
    if len(docs.get(kind, [])) != 1:
        err("deploy/k8s", f"expected exactly one {kind}, found {len(docs.get(kind, []))}")
if not errors:
    dep = docs["Deployment"][0][1]
    cm = docs["ConfigMap"][0][1]
    svc = docs["Service"][0][1]
    pdb = docs["PodDisruptionBudget"][0][1]
    toml_text = (cm.get("data") or {}).get("lapse.toml")
    if not toml_text:
        err("configmap", "data.lapse.toml missing")
        cfg = {}
    else:
        cfg = tomllib.loads(toml_text)
    kafka = cfg.get("kafka", {})
    partitions = kafka.get("topic_partitions", 6)
    drain = dur_s(kafka.get("shutdown_drain_timeout", "30s"))
    listen = cfg.get("http", {}).get("listen", "127.0.0.1:9464")
    if not listen.startswith("0.0.0.0:"):
        err("configmap", f"http.listen must listen on 0.0.0.0 in a pod, is {listen}")
    spec = dep["spec"]
    if not 1 <= spec.get("replicas", 1) <= partitions:
        err("deployment", f"replicas {spec.get('replicas')} must be between 1 and the input partitions ({partitions})")
    pod = spec["template"]
    labels = pod["metadata"].get("labels") or {}
    sel = spec["selector"]["matchLabels"]
    if any(labels.get(k) != v for k, v in sel.items()):
        err("deployment", "selector does not match the pod labels")
    ps = pod["spec"]
    grace = ps.get("terminationGracePeriodSeconds", 30)
    if drain is None or grace <= drain + 10:
        err("deployment", f"terminationGracePeriodSeconds {grace} must exceed shutdown_drain_timeout ({drain} s) + the 10 s producer flush")
    (c,) = ps["containers"]
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    http_port = int(listen.rsplit(":", 1)[1])
    env_listen = [e.get("value") for e in c.get("env", []) if e.get("name") == "LAPSE_HTTP_LISTEN"]
    if env_listen:
        http_port = int(env_listen[0].rsplit(":", 1)[1])
    if ports.get("http") != http_port:
        err("deployment", f"container port http must be the lapse HTTP port {http_port}")
    for probe, path in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
        g = (c.get(probe) or {}).get("httpGet") or {}
        if g.get("path") != path or g.get("port") not in ("http", http_port):
            err("deployment", f"{probe} must GET {path} on the http port")
    res = c.get("resources") or {}
    for k in ["requests", "limits"]:
        if not (res.get(k) or {}).get("memory") or not (res.get(k) or {}).get("cpu"):
            err("deployment", f"resources.{k} needs cpu and memory")
    ann = pod["metadata"].get("annotations") or {}
    if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != str(http_port) or ann.get("prometheus.io/path", "/metrics") != "/metrics":
        err("deployment", "pod annotations prometheus.io/scrape, port, path must point at /metrics")
    args = c.get("args") or []
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
    vols = {v["name"]: v for v in ps.get("volumes", [])}
    cfg_path = args[args.index("--config") + 1] if "--config" in args else None
    ok = False
    for name, mp in mounts.items():
        v = vols.get(name, {})
        if v.get("configMap", {}).get("name") == cm["metadata"]["name"] and cfg_path and cfg_path.startswith(mp.rstrip("/") + "/"):
            ok = True
    if not ok:
        err("deployment", "--config must point into the mounted ConfigMap")
    # Secrets: every *_file key of lapse.toml names a key of the Secret, in the
    # directory where the Deployment mounts it; no secret is written inline
    # (in lapse.toml or the container's env); the Secret holds placeholders
    # only. The ConfigMap's lapse.toml is written out with those paths
    # pointing at the Secret's values, for `lapse check-config`.
    secret = docs["Secret"][0][1]
    secret_values = dict(secret.get("stringData") or {})
    secret_mounts = {
        mounts[n]: v["secret"]
        for n, v in vols.items()
        if n in mounts and (v.get("secret") or {}).get("secretName") == secret["metadata"]["name"]
    }
    if not secret_mounts:
        err("deployment", f"must mount the Secret {secret['metadata']['name']}")
    for k, v in secret_values.items():
        if "PLACEHOLDER" not in v:
            err("secret.yml", f"{k} must be an obvious placeholder (contain PLACEHOLDER)")
    if secret.get("data"):
        err("secret.yml", "use stringData placeholders, not data")
    secret_files = {}
    for section in ("kafka", "redis", "schema"):
        for key, value in (cfg.get(section) or {}).items():
            if key in ("password", "sasl_password", "registry_password", "registry_token"):
                err("configmap", f"{section}.{key} inline: use {key}_file and the Secret")
            if not key.endswith("_file"):
                continue
            mount = next((m for m in secret_mounts if value.startswith(m.rstrip("/") + "/")), None)
            if mount is None:
                err("configmap", f"{section}.{key} = {value} is not in the Secret's mount ({', '.join(secret_mounts)})")
                continue
            name = value[len(mount.rstrip("/")) + 1:]
            items = {i["path"]: i["key"] for i in secret_mounts[mount].get("items") or []}
            skey = items.get(name, name) if items else name
            if skey not in secret_values:
                err("configmap", f"{section}.{key} reads {value}: the Secret has no key {skey}")
                continue
            secret_files[value] = secret_values[skey]
    for e in c.get("env", []):
        if re.search(r"PASSWORD|TOKEN", e.get("name", "")) and "value" in e:
            err("deployment", f"env {e['name']} holds a secret inline: use the Secret's files")
    if not secret_files:
        err("configmap", "no *_file key reads the Secret")
    secrets_dir = os.path.join(os.path.dirname(out_toml), "secrets")
    os.makedirs(secrets_dir, exist_ok=True)
    for i, (path, value) in enumerate(sorted(secret_files.items())):
        local = os.path.join(secrets_dir, f"{i}-{os.path.basename(path)}")
        with open(local, "w", encoding="utf-8") as f:
            f.write(value)
        toml_text = toml_text.replace(f'"{path}"', json.dumps(local))
    with open(out_toml, "w", encoding="utf-8") as f:
        f.write(toml_text)
    checks.append("k8s secret wiring")
    if svc["spec"].get("selector") != sel:
        err("service", "selector must equal the deployment's selector")
    sp = [p for p in svc["spec"].get("ports", []) if p.get("port") == http_port]
    if not sp or sp[0].get("targetPort") not in ("http", http_port):
        err("service", f"must expose {http_port} targeting the http container port")
    if (pdb["spec"].get("selector") or {}).get("matchLabels") != sel:
        err("pdb", "selector must equal the deployment's selector")
    if "maxUnavailable" not in pdb["spec"] and "minAvailable" not in pdb["spec"]:
        err("pdb", "needs maxUnavailable or minAvailable")
    for name, d in docs.get("Kustomization", []):
        for r in d.get("resources", []):
            if not os.path.exists(os.path.join(k8s_dir, r)):
                err(f"deploy/k8s/{name}", f"resource {r} does not exist")
    checks.append("k8s structure")
    try:
        import kubernetes_validate
    except ImportError:
        skipped.append("kubernetes-validate (pip package) not installed: Kubernetes schema check skipped")
    else:
        for kind, items in docs.items():
            if kind == "Kustomization":
                continue
            for name, d in items:
                try:
                    kubernetes_validate.validate(d, "1.30.0", strict=True)
                except Exception as e:
                    err(f"deploy/k8s/{name}", f"{kind} fails the Kubernetes 1.30 schema (strict): {e}")
        checks.append("k8s schema (kubernetes-validate, strict, 1.30)")

# --- docker-compose.yml ----------------------------------------------------------
compose_path = os.path.join(root, "docker-compose.yml")
if not os.path.exists(compose_path):
    err("docker-compose.yml", "missing")
else:
    with open(compose_path, encoding="utf-8") as f:
        text = f.read()
    comp = yaml.safe_load(text)
    services = comp.get("services") or {}
    named_vols = set((comp.get("volumes") or {}).keys())
    if not services:
        err("docker-compose.yml", "no services")
    mounts_of = {}
    for sname, s in services.items():
        where = f"docker-compose.yml services.{sname}"
        if not s.get("image") and not s.get("build"):
            err(where, "needs image or build")
        b = s.get("build")
        if b is not None:
            ctx = b if isinstance(b, str) else b.get("context", ".")
            ctx_path = os.path.normpath(os.path.join(root, ctx))
            if not os.path.isdir(ctx_path):
                err(where, f"build context {ctx} does not exist")
            df = "Dockerfile" if isinstance(b, str) else b.get("dockerfile", "Dockerfile")
            if not os.path.isfile(os.path.join(ctx_path, df)):
                err(where, f"dockerfile {df} does not exist")
        dep = s.get("depends_on") or []
        for d in (dep if isinstance(dep, list) else dep.keys()):
            if d not in services:
                err(where, f"depends_on {d}: no such service")
        if isinstance(dep, dict):
            for d, v in dep.items():
                cond = (v or {}).get("condition", "service_started")
                if cond not in ("service_started", "service_healthy", "service_completed_successfully"):
                    err(where, f"depends_on {d}: unknown condition {cond}")
                if cond == "service_healthy" and d in services and not services[d].get("healthcheck"):
                    err(where, f"depends_on {d} healthy, but {d} has no healthcheck")
        for ef in ([s["env_file"]] if isinstance(s.get("env_file"), str) else s.get("env_file") or []):
            p = ef if isinstance(ef, str) else ef.get("path")
            if not os.path.exists(os.path.join(root, p)):
                err(where, f"env_file {p} does not exist")
        ms = []
        for v in s.get("volumes") or []:
            if isinstance(v, str):
                parts = v.split(":")
                if len(parts) == 1:
                    continue  # anonymous volume
                src, dst = parts[0], parts[1]
            else:
                src, dst = v.get("source"), v.get("target")
                if v.get("type") not in (None, "bind", "volume") or src is None:
                    continue
            if src.startswith((".", "/", "~")):
                full = os.path.normpath(os.path.join(root, src))
                if not os.path.exists(full):
                    err(where, f"bind mount source {src} does not exist")
                ms.append((os.path.relpath(full, root), dst))
            elif src not in named_vols:
                err(where, f"named volume {src} is not declared under top-level volumes")
        mounts_of[sname] = ms
        for p in s.get("ports") or []:
            if isinstance(p, str) and not re.fullmatch(r"((\d+\.){3}\d+:)?(\d+(-\d+)?:)?\d+(-\d+)?(/(tcp|udp))?", p):
                err(where, f"port {p} is not [IP:]HOST:CONTAINER")

    def mounted(svc, rel):
        """Container path where the repository path `rel` is visible in `svc`, or None."""
        for src, dst in mounts_of.get(svc, []):
            if rel == src:
                return dst
            if rel.startswith(src.rstrip("/") + "/"):
                return dst.rstrip("/") + "/" + rel[len(src.rstrip("/")) + 1:]
        return None

    # The monitoring services, once the stack has them, must mount this repository's files.
    for sname, s in services.items():
        img = str(s.get("image", ""))
        if "prometheus" in img and "prometheus" in sname:
            cfg_in = mounted(sname, "deploy/prometheus/prometheus.yml")
            rules_in = mounted(sname, "deploy/prometheus/alerts.yml")
            if not cfg_in or not rules_in or os.path.dirname(cfg_in) != os.path.dirname(rules_in):
                err(f"docker-compose.yml services.{sname}", "must mount deploy/prometheus/prometheus.yml and alerts.yml side by side (rule_files: alerts.yml is relative to the config)")
            if "lapse" not in services:
                err("docker-compose.yml", "prometheus scrapes lapse:9464 but there is no service named lapse")
            checks.append("compose prometheus mounts")
        if "grafana" in img:
            prov_in = mounted(sname, "deploy/grafana/provisioning")
            dash_in = mounted(sname, "deploy/grafana/dashboards")
            if prov_in != "/etc/grafana/provisioning":
                err(f"docker-compose.yml services.{sname}", "must mount deploy/grafana/provisioning at /etc/grafana/provisioning")
            if dash_path and dash_in != dash_path:
                err(f"docker-compose.yml services.{sname}", f"must mount deploy/grafana/dashboards at {dash_path} (the provider's options.path)")
            checks.append("compose grafana mounts")
    checks.append("compose structure")
    # Secrets: declared from files that exist (placeholders), given to the
    # services that name them; lapse's *_file keys read secrets it is given;
    # no password in any service's environment.
    declared = comp.get("secrets") or {}
    for name, d in declared.items():
        f = (d or {}).get("file")
        if not f or not os.path.isfile(os.path.join(root, f)):
            err("docker-compose.yml", f"secret {name}: file {f} does not exist")
        elif "PLACEHOLDER" not in open(os.path.join(root, f), encoding="utf-8").read():
            err("docker-compose.yml", f"secret {name}: {f} must be an obvious placeholder (contain PLACEHOLDER)")
    for sname, s in services.items():
        for sec in s.get("secrets") or []:
            n = sec if isinstance(sec, str) else sec.get("source")
            if n not in declared:
                err(f"docker-compose.yml services.{sname}", f"secret {n} is not declared under top-level secrets")
        env = s.get("environment") or {}
        names = env.keys() if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
        for n in names:
            if re.search(r"PASSWORD|TOKEN", n):
                err(f"docker-compose.yml services.{sname}", f"environment {n}: use a secret and a *_file key")
    lapse_svc = services.get("lapse") or {}
    lcmd = lapse_svc.get("command") or []
    lcfg = lcmd[lcmd.index("--config") + 1] if "--config" in lcmd else None
    given = {(x if isinstance(x, str) else x.get("source")) for x in lapse_svc.get("secrets") or []}
    src = next((s for s, d in mounts_of.get("lapse", []) if d == lcfg), None) if lcfg else None
    if not src:
        err("docker-compose.yml services.lapse", "--config must name a bind-mounted file")
    else:
        with open(os.path.join(root, src), "rb") as f:
            lapse_cfg = tomllib.load(f)
        files = [(f"{sec}.{k}", v) for sec in ("kafka", "redis", "schema") for k, v in (lapse_cfg.get(sec) or {}).items() if k.endswith("_file")]
        if not files:
            err(src, "no *_file key reads a secret")
        for key, v in files:
            if not v.startswith("/run/secrets/") or v[len("/run/secrets/"):] not in given:
                err(src, f"{key} = {v} is not a secret given to the lapse service")
    checks.append("compose secrets")
    try:
        from compose_spec import PyOptions
    except ImportError:
        skipped.append("compose-spec (pip package) not installed: Compose specification check skipped")
    else:
        try:
            c = PyOptions(apply_merge=True).from_yaml(text)
            c.validate()
        except Exception as e:
            err("docker-compose.yml", f"fails the Compose specification (compose-spec): {e}")
        checks.append("compose specification (compose-spec)")

print(json.dumps(report))
"###;

// ---------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------

/// A Prometheus server (Debian package) with its own TSDB dir, killed on drop
/// (it runs under the harness's process supervision).
struct Prometheus {
    proc: LapseProcess,
    _dir: tempfile::TempDir,
    client: reqwest::Client,
}

impl Prometheus {
    /// Scrapes `target` (HOST:PORT) as job `lapse` every second, with the
    /// project's alert rules evaluated every second.
    async fn start(target: &str) -> Prometheus {
        let bin = tool("prometheus");
        let dir = scratch_dir("prometheus");
        let rules = Path::new(ROOT).join("deploy/prometheus/alerts.yml");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules:?}\n\
                 scrape_configs:\n  - job_name: lapse\n    static_configs:\n      - targets: [\"{target}\"]\n",
            ),
        )
        .expect("write prometheus config");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        for _attempt in 0..5 {
            let port = free_port();
            let listen = format!("127.0.0.1:{port}");
            let data = dir.path().join(format!("data-{port}"));
            let args = [
                format!("--config.file={}", config.display()),
                format!("--storage.tsdb.path={}", data.display()),
                format!("--web.listen-address={listen}"),
                "--storage.tsdb.retention.time=1d".into(),
                "--log.level=warn".into(),
            ];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            // The harness supervises any program; its HTTP port is Prometheus's.
            let mut proc =
                LapseProcess::spawn_program(&bin, &args, &[("LAPSE_HTTP_LISTEN", listen.as_str())]);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if proc.try_status().is_some() {
                    break; // lost the port race: try another
                }
                if let Ok((200, _)) = proc.http_get("/-/ready").await {
                    return Prometheus {
                        proc,
                        _dir: dir,
                        client,
                    };
                }
                assert!(
                    Instant::now() < deadline,
                    "prometheus not ready in 30 s:\n{}",
                    proc.stderr()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            eprintln!("prometheus exited at start, retrying:\n{}", proc.stderr());
        }
        panic!("prometheus failed to start 5 times");
    }

    /// An instant query: `Ok(result)` (the `data` object) or `Err(error text)`.
    async fn query(&self, expr: &str) -> Result<Value, String> {
        let resp = self
            .client
            .get(format!("{}/api/v1/query", self.proc.http_base()))
            .query(&[("query", expr)])
            .send()
            .await
            .map_err(|e| format!("GET /api/v1/query: {e}"))?;
        let v: Value = resp.json().await.map_err(|e| format!("response: {e}"))?;
        if v["status"] == "success" {
            Ok(v["data"].clone())
        } else {
            Err(format!("{}: {}", v["errorType"], v["error"]))
        }
    }

    /// Number of series (or 1 for a scalar) an expression returns now; 0 on error.
    async fn count(&self, expr: &str) -> usize {
        match self.query(expr).await {
            Ok(d) if d["resultType"] == "scalar" => 1,
            Ok(d) => d["result"].as_array().map_or(0, Vec::len),
            Err(_) => 0,
        }
    }

    async fn api(&self, path: &str) -> Value {
        let v: Value = self
            .client
            .get(format!("{}{path}", self.proc.http_base()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(v["status"], "success", "GET {path}: {v}");
        v["data"].clone()
    }

    async fn label_values(&self, selector: &str, label: &str) -> Vec<String> {
        let resp: Value = self
            .client
            .get(format!(
                "{}/api/v1/label/{label}/values",
                self.proc.http_base()
            ))
            .query(&[("match[]", selector)])
            .send()
            .await
            .expect("label values")
            .json()
            .await
            .expect("label values JSON");
        resp["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until `expr` returns at least one series.
    async fn wait_for_data(&self, expr: &str, what: &str) {
        wait_until(LONG, Duration::from_millis(250), what, async || {
            self.count(expr).await > 0
        })
        .await;
    }
}

/// A short text of a query result: up to four `{labels} value` entries.
fn summarize(data: &Value) -> String {
    if data["resultType"] == "scalar" {
        return data["result"][1].as_str().unwrap_or_default().to_string();
    }
    let items: Vec<String> = data["result"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .take(4)
        .map(|r| {
            let labels: Vec<String> = r["metric"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default();
            format!(
                "{{{}}} {}",
                labels.join(","),
                r["value"][1].as_str().unwrap_or_default()
            )
        })
        .collect();
    items.join("  ")
}

/// Grafana's variables replaced as Grafana would, for a PromQL check.
fn substitute(expr: &str, tenant: &str, channel: &str) -> String {
    expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$__range", RANGE)
        .replace("${tenant}", tenant)
        .replace("$tenant", tenant)
        .replace("${channel}", channel)
        .replace("$channel", channel)
}

// ---------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------

fn feedback(c: &CustomerRef, id: &str, t: i64, kind: FeedbackKind, score: u8) -> Event {
    Event {
        event_id: id.into(),
        customer: c.clone(),
        occurred_at: t,
        body: EventBody::Feedback {
            kind,
            score,
            visit_event_id: None,
            channel: Some(Channel::Wechat),
        },
    }
}

fn with_campaign(mut e: Event, campaign: &str) -> Event {
    match &mut e.body {
        EventBody::Send { campaign_id, .. } | EventBody::Click { campaign_id, .. } => {
            *campaign_id = Some(campaign.into())
        }
        _ => {}
    }
    e
}

/// Produces events, alternating single-object and Confluent framing.
async fn produce_mixed(
    p: &Producer,
    ids: &BTreeMap<EventKind, u32>,
    events: &[(Event, Option<&str>)],
) {
    let enc = encoder();
    for (i, (ev, text)) in events.iter().enumerate() {
        let framing = if i % 2 == 0 {
            Framing::SingleObject
        } else {
            Framing::Confluent(ids[&ev.kind()])
        };
        let bytes = enc.encode_event(ev, *text, framing).expect("encode");
        p.send(INPUTS[ev.kind().index()], ev.customer.key(), bytes, &[])
            .await
            .expect("produce");
    }
}

/// Moves event time forward and waits until every timer due by then has fired.
struct Clock<'a> {
    p: &'a Producer,
    group: &'a str,
}

impl Clock<'_> {
    async fn tick(&mut self, s: &Stack, at: i64) {
        s.advance_event_time(self.p, self.group, at).await;
    }
}

async fn lapse_metric_above(lapse: &LapseProcess, name: &str, labels: &[(&str, &str)], what: &str) {
    wait_until(LONG, Duration::from_millis(100), what, async || {
        metric(lapse, name, labels).await > 0.0
    })
    .await;
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

#[tokio::test]
async fn every_dashboard_panel_and_alert_rule_works_against_live_data() {
    let started = Instant::now();

    // --- Offline: promtool, dashboards, k8s, compose ---------------------------
    promtool_checks();
    let toml_dir = scratch_dir("k8s-config");
    let k8s_toml = toml_dir.path().join("lapse.toml");
    let datasource_uid = deploy_checks(&k8s_toml);
    let out = run_lapse(
        &["check-config", k8s_toml.to_str().unwrap()],
        &[],
        Duration::from_secs(30),
    )
    .await;
    assert!(
        out.status.success(),
        "lapse check-config on the ConfigMap's lapse.toml (deploy/k8s/configmap.yml):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (panels, variables) = dashboards(&datasource_uid);

    // --- The stack, lapse and Prometheus --------------------------------------
    let mut s = Stack::start_with(Broker::start_behind_proxy().await).await;
    s.broker
        .create_compacted_topic("engagement.throttle", PARTITIONS)
        .await;
    s.broker.create_topic("recall.triggers", PARTITIONS).await;
    s.broker.create_topic("recall.outcomes", PARTITIONS).await;
    let mut ids = BTreeMap::new();
    for k in EventKind::ALL {
        let id = s
            .registry
            .register(&format!("{}-value", INPUTS[k.index()]), &schema_file(k))
            .await;
        ids.insert(k, id);
    }
    let group = "g-monitoring";
    let cfg = s.config_with(
        "monitoring",
        "",
        &format!(
            "{EVENT_TIME}[policy.lapse]\nholdout_share = 0.0\n\
             [policy.tenants.clinicH.lapse]\nholdout_share = 1.0\n\
             [policy.tenants.brandT.throttle]\nfloor = 0.5\nmin_sends = 2.0\n\
             [experiments]\nreport_every = \"1s\"\nstop_poll = \"500ms\"\n\
             [[policy.experiments]]\nname = \"wechat-1-vs-2\"\ntenant = \"brandX\"\n\
             start = \"{}\"\nend = \"{}\"\n\
             [[policy.experiments.arms]]\nname = \"control\"\nshare = 0.5\n\
             [[policy.experiments.arms]]\nname = \"one-a-day\"\nshare = 0.5\n\
             caps.WECHAT = {{ limit = 1, window = \"1d\" }}\n",
            shanghai_local(day(-1)),
            shanghai_local(day(400)),
        ),
    );
    let mut lapse = s.spawn(group, &cfg);
    lapse.wait_ready(LONG).await;
    let prom = Prometheus::start(&format!("127.0.0.1:{}", lapse.http_port())).await;
    prom.wait_for_data("up{job=\"lapse\"} == 1", "Prometheus to scrape lapse")
        .await;
    let p = Producer::new(&s.broker.bootstrap());

    // --- Wave 1: engagement, dead letters, a duplicate, the recall population --
    let amy = cust("brandA", "amy");
    let bob = cust("brandA", "bob");
    let tom = cust("brandT", "tom");
    let t1 = day(1);
    let mut wave: Vec<(Event, Option<&str>)> = vec![
        // WeChat: two marketing sends fill the daily cap (a cap hit), a third is a violation.
        (
            send(&amy, "a-w1", t1, Channel::Wechat, Purpose::Marketing),
            None,
        ),
        (open(&amy, "a-o1", t1 + 10 * MIN, Channel::Wechat), None),
        (click(&amy, "a-c1", t1 + 20 * MIN, Channel::Wechat), None),
        (
            send(&amy, "a-w2", t1 + H, Channel::Wechat, Purpose::Marketing),
            None,
        ),
        (
            send(
                &amy,
                "a-w3",
                t1 + 2 * H,
                Channel::Wechat,
                Purpose::Marketing,
            ),
            None,
        ),
        // SMS: unsubscribe (SUPPRESSED); a marketing send follows below, once applied.
        (reply(&amy, "a-r1", t1 + 3 * H, Channel::Sms), Some("退订")),
        (
            send(&amy, "a-svc", t1 + 4 * H, Channel::Sms, Purpose::Service),
            None,
        ),
        (
            reply(&amy, "a-r2", t1 + 5 * H, Channel::Wechat),
            Some("好的，我想预约下周三"),
        ),
        // Other channels, opens, clicks, a neutral reply.
        (
            send(&bob, "b-e1", t1, Channel::Email, Purpose::Marketing),
            None,
        ),
        (open(&bob, "b-o1", t1 + MIN, Channel::Email), None),
        (click(&bob, "b-c1", t1 + 2 * MIN, Channel::Email), None),
        (
            send(&bob, "b-so1", t1 + H, Channel::Social, Purpose::Marketing),
            None,
        ),
        (click(&bob, "b-c2", t1 + H + MIN, Channel::Social), None),
        (
            send(&bob, "b-p1", t1 + 2 * H, Channel::Phone, Purpose::Marketing),
            None,
        ),
        (open(&bob, "b-o2", t1 + 2 * H + MIN, Channel::Phone), None),
        (
            reply(&bob, "b-r1", t1 + 3 * H, Channel::Wechat),
            Some("我考虑一下"),
        ),
        // Satisfaction: a detractor (a care call) and a satisfied customer.
        (
            feedback(&amy, "a-f1", t1 + 6 * H, FeedbackKind::Nps, 2),
            None,
        ),
        (
            feedback(&bob, "b-f1", t1 + 6 * H, FeedbackKind::Csat, 5),
            None,
        ),
        // A visit in another currency than the customer's first.
        (visit(&bob, "b-v1", t1, 30_000, Some("SKIN_CARE")), None),
        (
            Event {
                event_id: "b-v2".into(),
                customer: bob.clone(),
                occurred_at: t1 + DAY,
                body: EventBody::Visit {
                    visit_type: VisitType::Consultation,
                    treatment: None,
                    amount: 5_000,
                    currency: "USD".into(),
                    offer_code: None,
                    discount: None,
                },
            },
            None,
        ),
        // An unsubscribe taken back: SUPPRESSED, then OPEN (resubscribed).
        (reply(&bob, "b-r2", t1 + 4 * H, Channel::Sms), Some("TD")),
        (reply(&bob, "b-r3", t1 + 5 * H, Channel::Sms), Some("订阅")),
        // brandT throttles below a 50 % click rate: three sends without a click.
        (
            send(&tom, "t-w1", day(1), Channel::Wechat, Purpose::Marketing),
            None,
        ),
        (
            send(&tom, "t-w2", day(3), Channel::Wechat, Purpose::Marketing),
            None,
        ),
        (
            send(&tom, "t-w3", day(5), Channel::Wechat, Purpose::Marketing),
            None,
        ),
    ];
    // The recall population, in a treatment tenant and an all-holdout tenant. LASER:
    // 30-day default interval, AT_RISK after 36 days, LAPSED after 45.
    for tenant in ["clinicA", "clinicH"] {
        wave.push((
            visit(
                &cust(tenant, "x"),
                &format!("{tenant}-x1"),
                day(0),
                60_000,
                Some("LASER"),
            ),
            None,
        ));
        wave.push((
            visit(
                &cust(tenant, "y"),
                &format!("{tenant}-y1"),
                day(5),
                60_000,
                Some("LASER"),
            ),
            None,
        ));
        wave.push((
            visit(
                &cust(tenant, "gone"),
                &format!("{tenant}-g1"),
                day(0),
                40_000,
                Some("LASER"),
            ),
            None,
        ));
        wave.push((
            visit(
                &cust(tenant, "vip"),
                &format!("{tenant}-v1"),
                day(0),
                2_500_000,
                Some("LASER"),
            ),
            None,
        ));
    }
    // A contact-policy experiment's customers (brandX): one or two WeChat
    // sends each, so both arms have exposed customers and a spread of sends.
    for i in 0..16 {
        let c = cust("brandX", &format!("x{i}"));
        for k in 0..=(i % 2) {
            let at = t1 + k * H;
            let id = format!("x{i}-w{k}");
            wave.push((send(&c, &id, at, Channel::Wechat, Purpose::Marketing), None));
        }
    }
    let wave: Vec<(Event, Option<&str>)> = wave
        .into_iter()
        .map(|(e, t)| (with_campaign(e, "spring"), t))
        .collect();
    produce_mixed(&p, &ids, &wave).await;
    // The same open again at a new offset (a duplicate), and three dead letters.
    produce_events(
        &p,
        &[(open(&amy, "a-o1", t1 + 10 * MIN, Channel::Wechat), None)],
        |_| Framing::SingleObject,
    )
    .await;
    let key = amy.key();
    p.send("engagement.clicks", &key, b"\xde\xad\xbe\xef not avro", &[])
        .await
        .unwrap();
    p.send("engagement.opens", &key, b"", &[]).await.unwrap();
    let mut unknown_id = encoder()
        .encode_event(
            &send(&amy, "a-bad", t1, Channel::Sms, Purpose::Marketing),
            None,
            Framing::SingleObject,
        )
        .unwrap();
    unknown_id.splice(0..10, [0u8, 0, 0, 0x30, 0x39]); // Confluent framing, schema id 12345
    p.send("engagement.sends", &key, &unknown_id, &[])
        .await
        .unwrap();
    s.wait_caught_up(group, LONG).await;
    // A sender ignoring the SMS unsubscribe (a suppressed violation).
    let ignored = [(
        send(&amy, "a-s1", t1 + 4 * H, Channel::Sms, Purpose::Marketing),
        None,
    )];
    produce_events(&p, &ignored, |_| Framing::SingleObject).await;
    s.wait_caught_up(group, LONG).await;

    // --- Recall: ticks through event time ----------------------------------------
    let mut clock = Clock { p: &p, group };
    clock.tick(&s, day(37)).await; // AT_RISK: x, gone, vip
    let mut back = Vec::new();
    for tenant in ["clinicA", "clinicH"] {
        let x = cust(tenant, "x");
        back.push((
            send(
                &x,
                &format!("{tenant}-x-m"),
                day(38),
                Channel::Wechat,
                Purpose::Marketing,
            ),
            None,
        ));
        // x redeems the AT_RISK offer (incentive cost), and comes back two
        // days later (REPURCHASED, both arms).
        back.push((
            redeeming(
                visit(&x, &format!("{tenant}-x2"), day(39), 80_000, Some("LASER")),
                "reminder-coupon-5pct",
                None,
            ),
            None,
        ));
        back.push((
            visit(&x, &format!("{tenant}-x3"), day(41), 20_000, Some("LASER")),
            None,
        ));
    }
    produce_mixed(&p, &ids, &back).await;
    s.wait_caught_up(group, LONG).await;
    // Let Prometheus see the first recall of each arm, so the second one is an increase.
    wait_until(
        LONG,
        Duration::from_millis(250),
        "recalled outcomes of both arms scraped",
        async || {
            prom.count("lapse_recall_outcomes_total{kind=\"recalled\"}")
                .await
                >= 2
        },
    )
    .await;
    clock.tick(&s, day(42)).await; // AT_RISK: y
    let mut back = Vec::new();
    for tenant in ["clinicA", "clinicH"] {
        let y = cust(tenant, "y");
        back.push((
            send(
                &y,
                &format!("{tenant}-y-m"),
                day(42) + H,
                Channel::Sms,
                Purpose::Marketing,
            ),
            None,
        ));
        back.push((
            visit(&y, &format!("{tenant}-y2"), day(43), 90_000, Some("LASER")),
            None,
        ));
        // x, recalled (clinicA) or held out and back (clinicH), rates the visit:
        // satisfaction by recall arm, after the first scores were scraped.
        let score = if tenant == "clinicA" { 9 } else { 4 };
        let x = cust(tenant, "x");
        back.push((
            feedback(
                &x,
                &format!("{tenant}-x-f"),
                day(43),
                FeedbackKind::Nps,
                score,
            ),
            None,
        ));
    }
    produce_mixed(&p, &ids, &back).await;
    s.wait_caught_up(group, LONG).await;
    clock.tick(&s, day(46)).await; // LAPSED: gone, vip (high value)
    clock.tick(&s, day(76)).await; // FOLLOW_UP 1
    clock.tick(&s, day(106)).await; // FOLLOW_UP 2
    clock.tick(&s, day(170)).await; // DORMANT: NOT_RECALLED

    // --- Wave 2: restrictions that are still in force at the end -----------------
    let carl = cust("brandA", "carl");
    let tia = cust("brandT", "tia");
    let t2 = day(170) + H;
    let wave2 = vec![
        (
            send(&carl, "c-w1", t2, Channel::Wechat, Purpose::Marketing),
            None,
        ),
        (open(&carl, "c-o1", t2 + MIN, Channel::Wechat), None),
        (click(&carl, "c-c1", t2 + 2 * MIN, Channel::Wechat), None),
        (
            send(&carl, "c-w2", t2 + H, Channel::Wechat, Purpose::Marketing),
            None,
        ),
        (
            send(
                &carl,
                "c-w3",
                t2 + 2 * H,
                Channel::Wechat,
                Purpose::Marketing,
            ),
            None,
        ),
        (reply(&carl, "c-r1", t2 + 3 * H, Channel::Email), Some("TD")),
        (
            send(&tia, "ti-w1", day(165), Channel::Wechat, Purpose::Marketing),
            None,
        ),
        (
            send(&tia, "ti-w2", day(167), Channel::Wechat, Purpose::Marketing),
            None,
        ),
        (
            send(&tia, "ti-w3", day(169), Channel::Wechat, Purpose::Marketing),
            None,
        ),
    ];
    let wave2: Vec<(Event, Option<&str>)> = wave2
        .into_iter()
        .map(|(e, t)| (with_campaign(e, "autumn"), t))
        .collect();
    produce_mixed(&p, &ids, &wave2).await;
    s.wait_caught_up(group, LONG).await;
    // A sender ignoring the suppression (sent once the unsubscribe was applied:
    // the other topic's record could otherwise be applied first).
    let ignored = [(
        send(
            &carl,
            "c-e1",
            t2 + 4 * H,
            Channel::Email,
            Purpose::Marketing,
        ),
        None,
    )];
    produce_events(&p, &ignored, |_| Framing::SingleObject).await;
    s.wait_caught_up(group, LONG).await;

    // Every path reached lapse (checked on its own /metrics, before Prometheus).
    for (name, labels) in [
        ("lapse_cap_hits_total", vec![("channel", "wechat")]),
        ("lapse_cap_violations_total", vec![("kind", "cap")]),
        ("lapse_cap_violations_total", vec![("kind", "suppressed")]),
        (
            "lapse_throttle_transitions_total",
            vec![("state", "throttled")],
        ),
        (
            "lapse_throttle_transitions_total",
            vec![("state", "suppressed")],
        ),
        (
            "lapse_throttle_transitions_total",
            vec![("reason", "resubscribed")],
        ),
        ("lapse_duplicates_skipped_total", vec![("kind", "event_id")]),
        (
            "lapse_records_invalid_total",
            vec![("reason", "unknown_framing")],
        ),
        (
            "lapse_records_invalid_total",
            vec![("reason", "unknown_schema_id")],
        ),
        ("lapse_recall_triggers_total", vec![("arm", "treatment")]),
        (
            "lapse_recall_triggers_total",
            vec![("segment", "high_value_lapsed")],
        ),
        ("lapse_recall_stage_entries_total", vec![("arm", "holdout")]),
        (
            "lapse_recall_outcomes_total",
            vec![("kind", "recalled"), ("arm", "treatment")],
        ),
        (
            "lapse_recall_outcomes_total",
            vec![("kind", "recalled"), ("arm", "holdout")],
        ),
        (
            "lapse_recall_outcomes_total",
            vec![("kind", "not_recalled"), ("arm", "treatment")],
        ),
        (
            "lapse_recall_outcomes_total",
            vec![("kind", "not_recalled"), ("arm", "holdout")],
        ),
        (
            "lapse_recall_outcomes_total",
            vec![("kind", "repurchased"), ("arm", "treatment")],
        ),
        (
            "lapse_recall_outcomes_total",
            vec![("kind", "repurchased"), ("arm", "holdout")],
        ),
        (
            "lapse_recall_incentive_cost_total",
            vec![("arm", "treatment")],
        ),
        ("lapse_replies_total", vec![("class", "unsubscribe")]),
        ("lapse_replies_total", vec![("class", "positive")]),
        ("lapse_visit_currency_mismatch_total", vec![]),
    ] {
        lapse_metric_above(&lapse, name, &labels, &format!("{name} {labels:?}")).await;
    }

    // --- Faults: a Redis outage, then a broker outage ----------------------------
    s.redis.stop().await;
    // A record arrives meanwhile: its batch cannot load the customer and retries.
    produce_events(
        &p,
        &[(
            send(
                &cust("brandA", "dora"),
                "d-svc",
                day(170) + 5 * H,
                Channel::Sms,
                Purpose::Service,
            ),
            None,
        )],
        |_| Framing::SingleObject,
    )
    .await;
    lapse_metric_above(
        &lapse,
        "lapse_redis_errors_total",
        &[],
        "Redis errors counted",
    )
    .await;
    prom.wait_for_data(
        "min(lapse_ready) == 0",
        "Prometheus to see lapse not ready (Redis down)",
    )
    .await;
    prom.wait_for_data(
        "sum(rate(lapse_redis_errors_total[1m])) > 0",
        "Prometheus to see Redis errors increasing",
    )
    .await;
    s.redis.start_again().await;
    lapse.wait_ready(LONG).await;
    s.broker.proxy().cut();
    wait_until(LONG, POLL, "readiness to drop (broker down)", async || {
        matches!(lapse.http_get("/readyz").await, Ok((503, _)))
    })
    .await;
    // lapse_kafka_errors_total counts the consumer client's errors only, and
    // whether librdkafka reports one to it during an outage depends on timing
    // (the producer's are only logged): wait a while, but do not insist.
    let kafka_errors = try_wait_for(Duration::from_secs(15), POLL, async || {
        (metric(&lapse, "lapse_kafka_errors_total", &[]).await > 0.0).then_some(())
    })
    .await
    .is_some();
    if kafka_errors {
        prom.wait_for_data(
            "sum(lapse_kafka_errors_total) > 0",
            "Prometheus to see Kafka client errors",
        )
        .await;
    }
    s.broker.proxy().restore();
    lapse.wait_ready(LONG).await;
    // Consumption works again (a last tick), and Prometheus sees it ready.
    clock.tick(&s, day(171)).await;
    prom.wait_for_data(
        "min(lapse_ready) == 1",
        "Prometheus to see lapse ready again",
    )
    .await;
    eprintln!("traffic and faults done after {:?}", started.elapsed());

    // --- Every panel expression must parse and return data -----------------------
    let mut results: BTreeMap<(String, String, String), Result<usize, String>> = BTreeMap::new();
    let mut samples: BTreeMap<(String, String, String), String> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut missing = 0;
        for panel in &panels {
            for expr in &panel.exprs {
                let k = (panel.dashboard.clone(), panel.title.clone(), expr.clone());
                if matches!(results.get(&k), Some(Ok(n)) if *n > 0) {
                    continue;
                }
                let q = substitute(expr, ".*", ".*");
                let r = match prom.query(&q).await {
                    Ok(d) => {
                        samples.insert(k.clone(), summarize(&d));
                        Ok(if d["resultType"] == "scalar" {
                            1
                        } else {
                            d["result"].as_array().map_or(0, Vec::len)
                        })
                    }
                    Err(e) => Err(e),
                };
                if !matches!(r, Ok(n) if n > 0) {
                    missing += 1;
                }
                results.insert(k, r);
            }
        }
        if missing == 0 || Instant::now() >= deadline {
            break;
        }
        // Gauges fed every few seconds (consumer lag) may need another scrape.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut failures = Vec::new();
    for ((dash, title, expr), r) in &results {
        match r {
            Ok(0) if !kafka_errors && expr.contains("lapse_kafka_errors_total") => eprintln!(
                "--  {dash} / {title}: no data: lapse counted no Kafka client error in this run \
                 (timing-dependent); the expression evaluates"
            ),
            Ok(n) if *n > 0 => eprintln!(
                "ok  {dash} / {title}: {n} series: {}",
                samples[&(dash.clone(), title.clone(), expr.clone())]
            ),
            Ok(_) => failures.push(format!(
                "{dash} / panel \"{title}\": no data for\n    {}",
                substitute(expr, ".*", ".*")
            )),
            Err(e) => failures.push(format!(
                "{dash} / panel \"{title}\": does not evaluate ({e}):\n    {}",
                substitute(expr, ".*", ".*")
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} dashboard expressions failed against live data:\n{}",
        failures.len(),
        results.len(),
        failures.join("\n")
    );

    // Template variables have values, and every panel also evaluates with the
    // first concrete value of each (as Grafana shows a dashboard by default).
    let mut first: BTreeMap<(String, String), String> = BTreeMap::new();
    for v in &variables {
        let selector = substitute(&v.selector, ".*", ".*");
        let values = prom.label_values(&selector, &v.label).await;
        assert!(
            !values.is_empty(),
            "{} / variable {}: label_values({}, {}) is empty",
            v.dashboard,
            v.name,
            v.selector,
            v.label
        );
        first.insert((v.dashboard.clone(), v.name.clone()), values[0].clone());
    }
    for panel in &panels {
        let tenant = &first[&(panel.dashboard.clone(), "tenant".to_string())];
        let channel = &first[&(panel.dashboard.clone(), "channel".to_string())];
        for expr in &panel.exprs {
            let q = substitute(expr, tenant, channel);
            if let Err(e) = prom.query(&q).await {
                panic!(
                    "{} / panel \"{}\" with tenant={tenant} channel={channel} does not evaluate ({e}):\n    {q}",
                    panel.dashboard, panel.title
                );
            }
        }
    }

    // --- Every alert rule: loaded, evaluated without error, and its expression
    // evaluates through the query API -------------------------------------------------
    let alerts_yml =
        std::fs::read_to_string(Path::new(ROOT).join("deploy/prometheus/alerts.yml")).unwrap();
    let declared = alerts_yml
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    let rules = wait_for(
        LONG,
        Duration::from_millis(250),
        "every rule evaluated",
        async || {
            let data = prom.api("/api/v1/rules").await;
            let rules: Vec<Value> = data["groups"]
                .as_array()?
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            let evaluated = rules.iter().all(|r| {
                !r["lastEvaluation"]
                    .as_str()
                    .unwrap_or("0001")
                    .starts_with("0001")
            });
            (evaluated && rules.len() == declared).then_some(rules)
        },
    )
    .await;
    for r in &rules {
        let name = r["name"].as_str().unwrap_or_default();
        let expr = r["query"].as_str().unwrap_or_default();
        assert_eq!(
            r["health"], "ok",
            "alert {name}: evaluation failed ({}):\n    {expr}",
            r["lastError"]
        );
        let n = prom
            .query(expr)
            .await
            .unwrap_or_else(|e| panic!("alert {name}: does not evaluate ({e}):\n    {expr}"));
        eprintln!(
            "alert {name}: {} ({} series now)",
            r["state"],
            n["result"].as_array().map_or(0, Vec::len)
        );
    }
    // The Redis outage above is still in the 5-minute window: that alert is pending.
    let redis_alert = rules
        .iter()
        .find(|r| r["name"] == "LapseRedisErrors")
        .expect("LapseRedisErrors rule");
    assert!(
        matches!(redis_alert["state"].as_str(), Some("pending" | "firing")),
        "LapseRedisErrors should be pending after the Redis outage: {redis_alert}"
    );

    eprintln!(
        "{} panels, {} expressions, {} variables, {} alert rules checked in {:?}",
        panels.len(),
        results.len(),
        variables.len(),
        rules.len(),
        started.elapsed()
    );
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());
}
