//! The example Grafana dashboard (`adapters/gateway/grafana-dashboard.json`) uses only metric
//! names a live gateway exports: every `keypool_*` name in its expressions is checked against
//! the `/metrics` of a real `keypool` binary.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::collections::BTreeSet;

use keypool_mock::{MockServer, Reply, RetryAfter};
use support::{Gateway, keys};

const DASHBOARD: &str = include_str!("../grafana-dashboard.json");

/// Every `keypool_…` name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("keypool_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

/// The sample names a Prometheus text exposition can be queried by: the samples it has, and for
/// each declared family the names its type gives it (`_total` for a counter, `_bucket`, `_sum`,
/// `_count` for a histogram), so that a family without samples yet still counts.
fn exported(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let mut parts = decl.split_whitespace();
            let (Some(family), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                _ => &[""],
            };
            for s in suffixes {
                names.insert(format!("{family}{s}"));
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            names.insert(name);
        }
    }
    names
}

#[test]
fn every_metric_in_the_example_dashboard_is_exported() {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let mut used = BTreeSet::new();
    let mut exprs = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            exprs += 1;
            let names = metric_names(expr);
            assert!(
                !names.is_empty(),
                "{}: no keypool metric in {expr}",
                panel["title"]
            );
            used.extend(names);
        }
    }
    for var in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = var["definition"].as_str() {
            used.extend(metric_names(q));
        }
    }
    assert!(exprs >= 10, "{exprs} expressions");

    // A live gateway that has seen a success, a 429 with failover and a 404.
    let mock = MockServer::start();
    let keys = keys(2);
    mock.script(&keys[0], [Reply::rate_limited(RetryAfter::Seconds("30".into()))]);
    let gw = Gateway::start(&mock.url(), &keys, &[]);
    assert_eq!(gw.message(false).0, 200);
    assert_eq!(gw.request("GET", "/", &[], b"").0, 404);
    let metrics = gw.admin_get("/metrics");
    let exported = exported(&metrics);

    let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard uses metrics the gateway does not export: {missing:?}\nexported: {exported:?}"
    );
    // And it is not vacuous: it shows the gateway's main families.
    for family in [
        "keypool_key_state",
        "keypool_key_transitions_total",
        "keypool_responses_total",
        "keypool_request_outcomes_total",
        "keypool_gateway_responses_total",
        "keypool_upstream_responses_total",
        "keypool_probes_total",
        "keypool_request_duration_seconds_bucket",
    ] {
        assert!(used.contains(family), "the dashboard does not show {family}");
    }
}
