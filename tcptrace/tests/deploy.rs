//! The files in `deploy/` — the Kubernetes DaemonSet, the Prometheus scrape job and the
//! Grafana dashboard — checked for structure and against each other, without a cluster, a
//! Prometheus or a Grafana: the privileges are the least tcptrace needs, the port is the same
//! everywhere, and the dashboard asks only for metrics the exporter serves.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

/// The exporter's port.
const PORT: u16 = 9977;

/// The capabilities tcptrace needs (see the top-level README), and no other.
const CAPABILITIES: [&str; 4] = ["BPF", "PERFMON", "DAC_READ_SEARCH", "SYSLOG"];

/// Host paths the container reads, mounted read-only at the same place.
const HOST_MOUNTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/btf"];

/// Metric families `tcptrace serve` exports.
const COUNTERS_AND_GAUGES: [&str; 11] = [
    "tcptrace_transitions_total",
    "tcptrace_port_usage_ratio",
    "tcptrace_connect_failures_total",
    "tcptrace_closes_total",
    "tcptrace_timewait_sockets",
    "tcptrace_timewait_entries_total",
    "tcptrace_timewait_exits_total",
    "tcptrace_lost_events_total",
    "tcptrace_evicted_sockets_total",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
];
const HISTOGRAMS: [&str; 2] = [
    "tcptrace_timewait_residency_seconds",
    "tcptrace_state_duration_seconds",
];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(name: &str) -> String {
    let path = deploy_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every YAML document of a file (empty documents left out).
fn yaml_docs(name: &str) -> Vec<Yaml> {
    let docs = YamlLoader::load_from_str(&read(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// The node at `path` under `y`, or a panic that names the path.
fn at<'a>(y: &'a Yaml, path: &[&str]) -> &'a Yaml {
    let mut node = y;
    for (i, key) in path.iter().enumerate() {
        node = &node[*key];
        assert!(
            !node.is_badvalue(),
            "no {} in {:?}",
            path[..=i].join("."),
            y["kind"].as_str().unwrap_or("document")
        );
    }
    node
}

fn s<'a>(y: &'a Yaml, path: &[&str]) -> &'a str {
    at(y, path)
        .as_str()
        .unwrap_or_else(|| panic!("{} is not a string: {:?}", path.join("."), at(y, path)))
}

fn b(y: &Yaml, path: &[&str]) -> bool {
    at(y, path)
        .as_bool()
        .unwrap_or_else(|| panic!("{} is not a boolean: {:?}", path.join("."), at(y, path)))
}

fn i(y: &Yaml, path: &[&str]) -> i64 {
    at(y, path)
        .as_i64()
        .unwrap_or_else(|| panic!("{} is not an integer: {:?}", path.join("."), at(y, path)))
}

fn seq<'a>(y: &'a Yaml, path: &[&str]) -> &'a [Yaml] {
    at(y, path)
        .as_vec()
        .unwrap_or_else(|| panic!("{} is not a list: {:?}", path.join("."), at(y, path)))
}

fn strings(y: &Yaml, path: &[&str]) -> Vec<String> {
    seq(y, path)
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("{}: {v:?} is not a string", path.join(".")))
                .to_string()
        })
        .collect()
}

/// The one document of `kind` in daemonset.yaml.
fn manifest(kind: &str) -> Yaml {
    let mut found: Vec<Yaml> = yaml_docs("daemonset.yaml")
        .into_iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "daemonset.yaml has {} {kind}", found.len());
    found.pop().unwrap()
}

fn daemonset() -> Yaml {
    manifest("DaemonSet")
}

/// The DaemonSet's only container.
fn container(ds: &Yaml) -> &Yaml {
    let containers = seq(ds, &["spec", "template", "spec", "containers"]);
    assert_eq!(containers.len(), 1, "one container, tcptrace");
    &containers[0]
}

/// The port number of a `host:port` address.
fn port_of(addr: &str) -> u16 {
    let (_, port) = addr
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{addr} has no port"));
    port.parse()
        .unwrap_or_else(|e| panic!("{addr}: bad port: {e}"))
}

/// A probe's or a target's port, by number or by the container port's name.
fn resolve_port(c: &Yaml, port: &Yaml) -> u16 {
    if let Some(n) = port.as_i64() {
        return u16::try_from(n).unwrap();
    }
    let name = port.as_str().expect("a port is a number or a name");
    let p = seq(c, &["ports"])
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no container port named {name}"));
    u16::try_from(i(p, &["containerPort"])).unwrap()
}

#[test]
fn the_example_web_config_is_one_serve_accepts() {
    // Everything checks but the certificate, which the Secret holds: the first file read.
    let path = deploy_dir().join("web-config.yml");
    let err = tcptrace::views::serve::webconfig::WebConfig::load(&path)
        .unwrap_err()
        .to_string();
    let cert = deploy_dir().join("tls.crt");
    assert!(
        err.ends_with(&format!(
            "cert_file {}: cannot read it: No such file or directory (os error 2)",
            cert.display()
        )),
        "{err}"
    );
}

#[test]
fn every_yaml_document_parses_into_a_mapping() {
    let mut files: Vec<String> = std::fs::read_dir(deploy_dir())
        .expect("deploy/ exists")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["daemonset.yaml", "prometheus-scrape.yaml", "web-config.yml"]
    );
    for f in &files {
        let docs = yaml_docs(f);
        assert!(!docs.is_empty(), "{f} has no document");
        for d in &docs {
            assert!(d.as_hash().is_some_and(|h| !h.is_empty()), "{f}: {d:?}");
        }
    }
    // Three manifests, each a Kubernetes object in the tcptrace namespace.
    let kinds: Vec<_> = yaml_docs("daemonset.yaml")
        .iter()
        .map(|d| {
            assert!(!s(d, &["apiVersion"]).is_empty());
            let kind = s(d, &["kind"]).to_string();
            let ns = if kind == "Namespace" {
                s(d, &["metadata", "name"])
            } else {
                s(d, &["metadata", "namespace"])
            };
            assert_eq!(ns, "tcptrace", "{kind}");
            kind
        })
        .collect();
    assert_eq!(kinds, ["Namespace", "ServiceAccount", "DaemonSet"]);
}

#[test]
fn the_daemonset_runs_serve_on_every_node_in_the_hosts_namespaces() {
    let ds = daemonset();
    assert_eq!(s(&ds, &["apiVersion"]), "apps/v1");
    assert_eq!(s(&ds, &["metadata", "name"]), "tcptrace");
    let pod = at(&ds, &["spec", "template", "spec"]);
    assert!(b(pod, &["hostNetwork"]), "hostNetwork: true");
    assert!(b(pod, &["hostPID"]), "hostPID: true");

    // The selector picks the template's pods, by the label the scrape job keeps.
    let selector = at(&ds, &["spec", "selector", "matchLabels"]);
    let labels = at(&ds, &["spec", "template", "metadata", "labels"]);
    assert_eq!(s(selector, &["app.kubernetes.io/name"]), "tcptrace");
    for (k, v) in selector.as_hash().unwrap() {
        assert_eq!(&labels[k.as_str().unwrap()], v, "template label {k:?}");
    }

    // The ServiceAccount it names exists, and no API token is mounted.
    let sa = manifest("ServiceAccount");
    assert_eq!(
        s(pod, &["serviceAccountName"]),
        s(&sa, &["metadata", "name"])
    );
    assert!(!b(pod, &["automountServiceAccountToken"]));
    // The namespace admits what the pod asks for.
    let ns = manifest("Namespace");
    assert_eq!(
        s(
            &ns,
            &["metadata", "labels", "pod-security.kubernetes.io/enforce"]
        ),
        "privileged"
    );

    // Every node: a toleration with no key and operator Exists tolerates every taint.
    assert!(
        seq(pod, &["tolerations"])
            .iter()
            .any(|t| t["operator"].as_str() == Some("Exists") && t["key"].is_badvalue()),
        "a toleration for every taint"
    );

    let c = container(&ds);
    let image = s(c, &["image"]);
    assert_eq!(image, "ghcr.io/example/tcptrace:latest");
    let text = read("daemonset.yaml");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with('#') && l.contains("Placeholder")),
        "the placeholder image is marked as such"
    );
    let args = strings(c, &["args"]);
    assert_eq!(args.first().map(String::as_str), Some("serve"), "{args:?}");
    let listen = args
        .iter()
        .position(|a| a == "--listen")
        .map(|p| args[p + 1].as_str())
        .expect("--listen ADDR");
    assert_eq!(listen, "0.0.0.0:9977");

    let res = at(c, &["resources"]);
    assert_eq!(s(res, &["requests", "cpu"]), "50m");
    assert_eq!(s(res, &["requests", "memory"]), "64Mi");
    assert_eq!(s(res, &["limits", "memory"]), "128Mi");
}

#[test]
fn the_container_has_exactly_the_capabilities_tcptrace_needs() {
    let ds = daemonset();
    let pod = at(&ds, &["spec", "template", "spec"]);
    // No pod-level setting widens the container's.
    assert!(pod["securityContext"]["privileged"].is_badvalue());
    let sc = at(container(&ds), &["securityContext"]);
    let added: BTreeSet<String> = strings(sc, &["capabilities", "add"]).into_iter().collect();
    let wanted: BTreeSet<String> = CAPABILITIES.iter().map(|c| c.to_string()).collect();
    assert_eq!(added, wanted);
    assert_eq!(strings(sc, &["capabilities", "drop"]), ["ALL"]);
    assert!(!b(sc, &["privileged"]), "privileged: false");
    assert!(!b(sc, &["allowPrivilegeEscalation"]));
    assert!(b(sc, &["readOnlyRootFilesystem"]));
    // Added capabilities reach the effective set only for root (no ambient capabilities).
    assert_eq!(i(sc, &["runAsUser"]), 0);
    // The fallback for kernels without CAP_BPF/CAP_PERFMON is written down next to them.
    let text = read("daemonset.yaml");
    assert!(text.contains("< 5.8") && text.contains("privileged: true"));
}

#[test]
fn tracefs_and_btf_are_read_only_host_mounts_and_nothing_else_is_mounted() {
    let ds = daemonset();
    let pod = at(&ds, &["spec", "template", "spec"]);
    let volumes: BTreeMap<&str, &Yaml> = seq(pod, &["volumes"])
        .iter()
        .map(|v| (s(v, &["name"]), v))
        .collect();
    let mounts = seq(container(&ds), &["volumeMounts"]);
    let mut mounted = BTreeSet::new();
    for m in mounts {
        let name = s(m, &["name"]);
        let volume = volumes
            .get(name)
            .unwrap_or_else(|| panic!("volumeMount {name} has no volume"));
        let host = s(volume, &["hostPath", "path"]);
        assert_eq!(s(m, &["mountPath"]), host, "{name} is mounted where it is");
        assert!(b(m, &["readOnly"]), "{name} is read-only");
        assert_eq!(s(volume, &["hostPath", "type"]), "Directory", "{name}");
        mounted.insert(host);
    }
    assert_eq!(mounted, BTreeSet::from(HOST_MOUNTS));
    assert_eq!(volumes.len(), mounts.len(), "every volume is mounted");
}

#[test]
fn port_9977_is_the_same_in_the_container_probes_annotations_and_scrape_job() {
    let ds = daemonset();
    let c = container(&ds);
    let ports = seq(c, &["ports"]);
    assert_eq!(ports.len(), 1);
    assert_eq!(i(&ports[0], &["containerPort"]), i64::from(PORT));
    assert_eq!(s(&ports[0], &["name"]), "metrics");
    let args = strings(c, &["args"]);
    assert_eq!(port_of(&args[args.len() - 1]), PORT);

    for probe in ["readinessProbe", "livenessProbe"] {
        let get = at(c, &[probe, "httpGet"]);
        assert_eq!(s(get, &["path"]), "/metrics", "{probe}");
        assert_eq!(resolve_port(c, at(get, &["port"])), PORT, "{probe}");
    }

    // Quoted in the YAML: annotation values are strings.
    let ann = at(&ds, &["spec", "template", "metadata", "annotations"]);
    assert_eq!(s(ann, &["prometheus.io/scrape"]), "true");
    assert_eq!(s(ann, &["prometheus.io/port"]), PORT.to_string());

    // The scrape job finds these pods and scrapes that port.
    let docs = yaml_docs("prometheus-scrape.yaml");
    assert_eq!(docs.len(), 1);
    let jobs = seq(&docs[0], &["scrape_configs"]);
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    assert_eq!(s(job, &["job_name"]), "tcptrace");
    assert_eq!(s(job, &["scrape_interval"]), "15s");
    let sd = seq(job, &["kubernetes_sd_configs"]);
    assert_eq!(sd.len(), 1);
    assert_eq!(s(&sd[0], &["role"]), "pod");
    assert_eq!(
        strings(&sd[0], &["namespaces", "names"]),
        [s(&ds, &["metadata", "namespace"])]
    );

    let relabels = seq(job, &["relabel_configs"]);
    let rule = |source: &str| {
        relabels
            .iter()
            .find(|r| {
                r["source_labels"]
                    .as_vec()
                    .is_some_and(|v| v.iter().any(|l| l.as_str() == Some(source)))
            })
            .unwrap_or_else(|| panic!("no relabel rule on {source}"))
    };
    let keep = rule("__meta_kubernetes_pod_label_app_kubernetes_io_name");
    assert_eq!(s(keep, &["action"]), "keep");
    let pod_label = s(
        &ds,
        &[
            "spec",
            "template",
            "metadata",
            "labels",
            "app.kubernetes.io/name",
        ],
    );
    assert_eq!(s(keep, &["regex"]), pod_label);
    let node = rule("__meta_kubernetes_pod_node_name");
    assert_eq!(s(node, &["target_label"]), "node");
    let port_name = rule("__meta_kubernetes_pod_container_port_name");
    assert_eq!(s(port_name, &["action"]), "keep");
    assert_eq!(s(port_name, &["regex"]), s(&ports[0], &["name"]));
    let address = relabels
        .iter()
        .find(|r| r["target_label"].as_str() == Some("__address__"))
        .expect("a rule that sets the address");
    assert_eq!(port_of(s(address, &["replacement"])), PORT);

    // The commented single-host job, uncommented, is a scrape config for 127.0.0.1:9977.
    let text = read("prometheus-scrape.yaml");
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim() == "# - job_name: tcptrace")
        .expect("a commented single-host job");
    let block: String = lines[start..]
        .iter()
        .map_while(|l| l.trim_start().strip_prefix('#'))
        .filter_map(|l| l.strip_prefix(' '))
        .map(|l| format!("{l}\n"))
        .collect();
    let parsed = YamlLoader::load_from_str(&block).expect("the commented job is YAML");
    let single = &seq(&parsed[0], &[])[0];
    assert_eq!(s(single, &["job_name"]), s(job, &["job_name"]));
    assert_eq!(s(single, &["scrape_interval"]), "15s");
    let targets = strings(&seq(single, &["static_configs"])[0], &["targets"]);
    assert_eq!(targets, ["127.0.0.1:9977"]);
}

// ---- the dashboard ----

fn dashboard() -> Value {
    serde_json::from_str(&read("grafana-dashboard.json")).expect("the dashboard is JSON")
}

fn panels(d: &Value) -> &[Value] {
    let p = d["panels"].as_array().expect("panels");
    assert!(!p.is_empty());
    p
}

/// Every target's expression, with its panel's title.
fn exprs(d: &Value) -> Vec<(String, String)> {
    panels(d)
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap().to_string();
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap().to_string()))
        })
        .collect()
}

/// The identifiers in a PromQL expression that name a metric of ours.
fn metric_names(expr: &str) -> Vec<&str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("tcptrace_") || t.starts_with("process_"))
        .collect()
}

/// The family a series name belongs to, if the exporter serves it.
fn family(name: &str) -> Option<&'static str> {
    if let Some(f) = COUNTERS_AND_GAUGES.iter().copied().find(|f| *f == name) {
        return Some(f);
    }
    HISTOGRAMS.iter().copied().find(|h| {
        ["_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| name.strip_suffix(suffix) == Some(h))
    })
}

#[test]
fn the_dashboard_has_the_identity_and_variables_it_is_imported_with() {
    let d = dashboard();
    assert_eq!(d["schemaVersion"], 39);
    assert_eq!(d["uid"], "tcptrace");
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    let vars = d["templating"]["list"].as_array().expect("variables");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let node = var("node");
    assert_eq!(node["type"], "query");
    assert_eq!(node["datasource"]["uid"], "${datasource}");
    // The query is a string in older dashboards, an object in newer ones.
    let q = node["query"]["query"]
        .as_str()
        .or(node["query"].as_str())
        .expect("node's query");
    assert_eq!(q, "label_values(tcptrace_closes_total, node)");
    assert_eq!(node["includeAll"], true, "All works without a node label");
    assert_eq!(node["allValue"], ".*");
    // The exporter's own metrics are selected by the scrape job's name.
    let scrape = yaml_docs("prometheus-scrape.yaml");
    let job = s(&seq(&scrape[0], &["scrape_configs"])[0], &["job_name"]);
    assert_eq!(var("job")["query"], job);

    // Every variable an expression uses is defined.
    let names: BTreeSet<&str> = vars.iter().map(|v| v["name"].as_str().unwrap()).collect();
    for (title, expr) in exprs(&d) {
        for used in expr.split('$').skip(1) {
            let used = used.trim_start_matches('{');
            let name: String = used
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `$__…` are Grafana's own (`$__rate_interval`).
            assert!(
                name.starts_with("__") || names.contains(name.as_str()),
                "{title}: ${name} in {expr}"
            );
        }
    }
}

#[test]
fn every_panel_queries_the_selected_datasource_with_known_metrics() {
    let d = dashboard();
    let mut used = BTreeSet::new();
    for p in panels(&d) {
        let title = p["title"].as_str().expect("a title");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        assert_eq!(p["datasource"]["type"], "prometheus", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        let mut ref_ids = BTreeSet::new();
        for t in targets {
            assert!(ref_ids.insert(t["refId"].as_str().unwrap()), "{title}");
            if !t["datasource"].is_null() {
                assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            }
            let expr = t["expr"].as_str().expect("expr");
            let names = metric_names(expr);
            assert!(
                !names.is_empty(),
                "{title}: {expr} uses none of our metrics"
            );
            for name in names {
                let f = family(name)
                    .unwrap_or_else(|| panic!("{title}: {name} is not an exported metric"));
                used.insert(f);
                if name.ends_with("_bucket") {
                    assert!(
                        expr.starts_with("histogram_quantile(") && expr.contains("by (le"),
                        "{title}: {expr}"
                    );
                }
            }
            // Every query sums over the labels it does not show, so an added label (a
            // per-node `netns`) does not split its lines; and every query follows the node
            // selector.
            let inner = expr
                .strip_prefix("histogram_quantile(")
                .or_else(|| expr.strip_prefix("topk("))
                .map(|rest| rest.split_once(", ").expect("two arguments").1)
                .unwrap_or(expr);
            assert!(
                inner.starts_with("sum"),
                "{title}: {expr} does not aggregate"
            );
            assert!(expr.contains(r#"node=~"$node""#), "{title}: {expr}");
        }
    }
    // Every family is on the dashboard.
    let all: BTreeSet<&str> = COUNTERS_AND_GAUGES
        .iter()
        .chain(HISTOGRAMS.iter())
        .copied()
        .collect();
    assert_eq!(used, all);
}

#[test]
fn the_dashboard_answers_the_questions_it_is_for() {
    let d = dashboard();
    let by_title: BTreeMap<String, Vec<String>> =
        exprs(&d)
            .into_iter()
            .fold(BTreeMap::new(), |mut m, (t, e)| {
                m.entry(t).or_default().push(e);
                m
            });
    let panel = |title: &str| {
        by_title
            .get(title)
            .unwrap_or_else(|| panic!("no panel {title:?}"))
    };
    assert!(panel("Who closes first, per port")[0].contains("sum by (port, initiator)"));
    assert!(panel("Close reasons")[0].contains("sum by (how)"));
    assert!(panel("TIME_WAIT sockets")[0].contains("sum by (port) (tcptrace_timewait_sockets"));
    assert!(panel("TIME_WAIT exits")[0].contains("sum by (end)"));
    let residency = panel("TIME_WAIT residency p50/p99");
    assert!(residency[0].starts_with("histogram_quantile(0.5,"));
    assert!(residency[1].starts_with("histogram_quantile(0.99,"));
    assert!(
        residency
            .iter()
            .all(|e| e.contains("tcptrace_timewait_residency_seconds_bucket"))
    );
    for (title, state) in [
        ("Connect latency (SYN_SENT) p99", "SYN_SENT"),
        ("CLOSE_WAIT duration p99", "CLOSE_WAIT"),
    ] {
        let e = &panel(title)[0];
        assert!(e.starts_with("histogram_quantile(0.99,"), "{e}");
        assert!(
            e.contains(&format!(
                r#"tcptrace_state_duration_seconds_bucket{{state="{state}""#
            )),
            "{e}"
        );
    }
    let lost = panel("Lost events / evicted sockets").join(" ");
    assert!(lost.contains("tcptrace_lost_events_total"));
    assert!(lost.contains("tcptrace_evicted_sockets_total"));
    assert!(panel("Exporter CPU")[0].contains("rate(process_cpu_seconds_total"));
    assert!(panel("Exporter memory")[0].contains("process_resident_memory_bytes"));
}

#[test]
fn panels_have_unique_ids_and_do_not_overlap() {
    let d = dashboard();
    let mut ids = BTreeSet::new();
    let mut rects = Vec::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap();
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("{title}: no id"));
        assert!(ids.insert(id), "{title}: id {id} is used twice");
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| {
            g[k].as_u64()
                .unwrap_or_else(|| panic!("{title}: gridPos.{k}"))
        });
        assert!(w > 0 && h > 0, "{title}: empty");
        assert!(x + w <= 24, "{title}: wider than the 24-column grid");
        rects.push((title, x, y, w, h));
    }
    for (n, a) in rects.iter().enumerate() {
        for b in &rects[n + 1..] {
            let apart =
                a.1 + a.3 <= b.1 || b.1 + b.3 <= a.1 || a.2 + a.4 <= b.2 || b.2 + b.4 <= a.2;
            assert!(apart, "{:?} overlaps {:?}", a.0, b.0);
        }
    }
}

#[test]
fn the_metric_name_check_rejects_what_it_should() {
    // The checks above are only as good as these helpers.
    assert_eq!(
        metric_names(r#"sum by (le) (rate(tcptrace_x_bucket{state="SYN_SENT"}[5m]))"#),
        ["tcptrace_x_bucket"]
    );
    assert_eq!(
        family("tcptrace_closes_total"),
        Some("tcptrace_closes_total")
    );
    assert_eq!(
        family("tcptrace_state_duration_seconds_bucket"),
        Some("tcptrace_state_duration_seconds")
    );
    assert_eq!(family("tcptrace_closes_total_bucket"), None);
    assert_eq!(family("tcptrace_closes"), None);
    assert_eq!(family("process_open_fds"), None);
    assert_eq!(port_of("[::1]:9977"), 9977);
}

/// The families the exporter actually serves (`# TYPE` lines) after a workload that touches
/// every one of them: a connection the server closes first, whose TIME_WAIT expires.
fn exported_families() -> BTreeSet<String> {
    use tcptrace::model::event::{
        State::*, TimerEvent, TimerOp, Transition, encode, encode_timer, raw_lost,
    };
    let (c, s): (std::net::SocketAddr, std::net::SocketAddr) = (
        "10.0.0.5:40000".parse().unwrap(),
        "10.0.0.9:8080".parse().unwrap(),
    );
    let (open, no_port): (std::net::SocketAddr, std::net::SocketAddr) = (
        "10.0.0.5:40001".parse().unwrap(),
        "10.0.0.5:0".parse().unwrap(),
    );
    let t = |ts: u64, sk: u64, local, remote, from, to| {
        encode(&Transition {
            ts_ns: ts,
            skaddr: sk,
            local,
            remote,
            from,
            to,
            in_from_ns: Some(1_000),
            owner: None,
            mptcp: false,
            netns: None,
            cgroup: None,
        })
    };
    let timer = |ts: u64, op| {
        encode_timer(&TimerEvent {
            ts_ns: ts,
            tw: 0xd,
            substate_at_end: None,
            op,
        })
    };
    let events = vec![
        t(10, 0xa, c, s, Close, SynSent),
        t(20, 0xb, s, c, Listen, SynRecv),
        t(30, 0xa, c, s, SynSent, Established),
        t(40, 0xb, s, c, SynRecv, Established),
        t(50, 0xb, s, c, Established, FinWait1),
        t(60, 0xa, c, s, Established, CloseWait),
        t(70, 0xb, s, c, FinWait1, FinWait2),
        t(80, 0xa, c, s, CloseWait, LastAck),
        timer(
            85,
            TimerOp::Armed {
                substate: TimeWait,
                timeout_jiffies: 15_000,
                local: s,
                remote: c,
                netns: None,
                rearm: false,
            },
        ),
        t(90, 0xb, s, c, FinWait2, TimeWait),
        t(100, 0xa, c, s, LastAck, Close),
        // A connection left open (its port held), and a connect that found no free port.
        t(101, 0xe, open, s, Close, SynSent),
        t(102, 0xe, open, s, SynSent, Established),
        t(103, 0xf, no_port, s, Close, SynSent),
        t(104, 0xf, no_port, s, SynSent, Close),
        raw_lost(110, 1),
        timer(60_000_000_100, TimerOp::Cancelled),
        timer(60_000_000_200, TimerOp::Expired),
    ];
    let mut registry = prometheus_client::registry::Registry::default();
    let mut view = tcptrace::views::serve::metrics::Metrics::new(
        tcptrace::model::filter::Filter::default().compile(),
        tcptrace::views::serve::metrics::LabelConfig::default(),
        &mut registry,
    )
    .timers(true);
    use tcptrace::views::View as _;
    view.push(&events).unwrap();
    view.finish().unwrap();
    registry.register_collector(Box::new(tcptrace::views::serve::metrics::ProcessCollector));
    let (text, _) = tcptrace::views::serve::http::render(&registry, false);
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

#[test]
fn the_dashboards_metrics_are_the_ones_serve_exports() {
    let exported = exported_families();
    for f in COUNTERS_AND_GAUGES.iter().chain(HISTOGRAMS.iter()) {
        assert!(exported.contains(*f), "{f} is not exported: {exported:?}");
    }
}

// ---- Prometheus's own checker ----

/// `promtool`, from Debian's `prometheus` (installed by `cargo xtask setup`). Without it the
/// checks below fail under CI=true and are skipped, visibly, elsewhere.
fn promtool(test: &str) -> bool {
    let found = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: promtool is missing and CI=true (cargo xtask setup installs it)"
        );
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: promtool is not installed (cargo xtask setup installs it)"
        );
    }
    found
}

/// Runs `promtool ARGS FILE` on `text` written to a scratch file; panics with its output
/// unless it succeeds.
fn promtool_accepts(args: &[&str], name: &str, text: &str) {
    // One directory per file: the tests run in parallel.
    let dir = std::env::temp_dir().join(format!("tcptrace-promtool-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new("promtool")
        .args(args)
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "promtool {args:?} rejects {name}:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_scrape_job() {
    if !promtool("promtool_accepts_the_scrape_job") {
        return;
    }
    // Debian's Prometheus is built without Kubernetes discovery, so its promtool rejects
    // `kubernetes_sd_configs` as an unknown field. Everything else (relabel rules, their
    // regular expressions, intervals) is checked with the discovery swapped for a static
    // target.
    let text = read("prometheus-scrape.yaml");
    let mut doc = yaml_docs("prometheus-scrape.yaml").remove(0);
    let Yaml::Hash(top) = &mut doc else {
        panic!("not a mapping")
    };
    let Some(Yaml::Array(jobs)) = top.get_mut(&Yaml::String("scrape_configs".into())) else {
        panic!("no scrape_configs")
    };
    let Yaml::Hash(job) = &mut jobs[0] else {
        panic!("the job is not a mapping")
    };
    assert!(
        job.remove(&Yaml::String("kubernetes_sd_configs".into()))
            .is_some()
    );
    let statics = YamlLoader::load_from_str("- targets: ['127.0.0.1:9977']").unwrap();
    job.insert(Yaml::String("static_configs".into()), statics[0].clone());
    let mut out = String::new();
    yaml_rust2::YamlEmitter::new(&mut out).dump(&doc).unwrap();
    assert!(text.contains("kubernetes_sd_configs"));
    promtool_accepts(&["check", "config"], "prometheus.yml", &out);
}

#[test]
fn promtool_is_strict_enough_to_catch_a_broken_query() {
    if !promtool("promtool_is_strict_enough_to_catch_a_broken_query") {
        return;
    }
    let broken = "groups:\n  - name: x\n    rules:\n      - record: x:y\n        expr: \"sum(rate(tcptrace_closes_total[5m])\"\n";
    let caught =
        std::panic::catch_unwind(|| promtool_accepts(&["check", "rules"], "broken.yml", broken));
    assert!(
        caught.is_err(),
        "promtool accepted an unbalanced parenthesis"
    );
}

#[test]
fn promtool_parses_every_dashboard_query() {
    if !promtool("promtool_parses_every_dashboard_query") {
        return;
    }
    // Each panel's expression as a recording rule, with Grafana's variables replaced by what
    // Grafana would put there: `promtool check rules` parses the PromQL.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in exprs(&dashboard()).iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$node", ".*")
            .replace("$job", "tcptrace");
        assert!(!expr.contains('$'), "a variable left in {expr}");
        rules.push_str(&format!(
            "      - record: dashboard:panel_{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    promtool_accepts(&["check", "rules"], "dashboard-rules.yml", &rules);
}
