//! Tests of the policy model, validation, locations and the compiler.

use std::net::IpAddr;

use crate::{
    check_json, check_toml, compile, model::GRANT_RULE_BASE, validate::parse_utc, Expiry, Grant,
    Now, Protocol,
};

const LAB: &str = include_str!("../../policies/lab.toml");

/// 2026-11-23T00:00:00Z, and an arbitrary monotonic instant with it.
const NOW: Now = Now { unix_secs: 1_795_392_000, mono_ns: 5_000_000_000_000 };

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn utc_times() {
    assert_eq!(parse_utc("1970-01-01T00:00:00Z"), Some(0));
    assert_eq!(parse_utc("2026-11-23T00:00:00Z"), Some(NOW.unix_secs));
    assert_eq!(parse_utc("2024-02-29T12:00:00Z"), Some(1_709_208_000));
    for bad in [
        "2023-02-29T00:00:00Z",
        "2026-13-01T00:00:00Z",
        "2026-11-23 00:00:00Z",
        "2026-11-23T00:00:00+01:00",
        "",
        "2026-11-23T24:00:00Z",
    ] {
        assert_eq!(parse_utc(bad), None, "{bad}");
    }
}

#[test]
fn the_lab_policy_is_valid_and_compiles() {
    let (_, r) = check_toml(LAB).unwrap_or_else(|d| panic!("{d:?}"));
    let out = compile(&r, &[], NOW).unwrap();
    let lab = &out["lab-appliance"];
    assert_eq!(lab.policy_version, 1);
    // p1 (v4 + v6) to the service (v4 + v6), same family only: 2 entries.
    assert_eq!(lab.entries.len(), 2);
    let e = &lab.entries[0];
    assert_eq!(
        (e.flow.src(), e.flow.dst(), e.flow.protocol(), e.flow.port()),
        (ip("10.77.0.11"), ip("10.78.0.100"), Protocol::Tcp, Some(443))
    );
    let Expiry::At(t) = e.expiry else { panic!("standing flows expire") };
    assert_eq!(
        t,
        NOW.mono_ns + (parse_utc("2030-01-01T00:00:00Z").unwrap() - NOW.unix_secs) * 1_000_000_000
    );
    assert_eq!(lab.entries[1].flow.dst(), ip("fd00:a1:78::100"));
}

#[test]
fn compiling_is_deterministic() {
    let (_, r) = check_toml(LAB).unwrap();
    let a = format!("{:?}", compile(&r, &[], NOW).unwrap());
    let b = format!("{:?}", compile(&r, &[], NOW).unwrap());
    assert_eq!(a, b);
}

#[test]
fn every_problem_is_reported_with_line_and_hint() {
    let bad = LAB
        .replace(
            "appliance = \"lab-appliance\"\naddresses = [\"10.77.0.12\"",
            "appliance = \"gw-9\"\naddresses = [\"10.77.0.0/24\"",
        )
        .replace("to = \"service:regional-lab\"", "to = \"service:regional-lb\"")
        .replace("expires = \"2030-01-01T00:00:00Z\"", "expires = \"next week\"")
        .replace(
            "public_key = \"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\"",
            "public_key = \"nope\"",
        );
    let d = check_toml(&bad).unwrap_err();
    let paths: Vec<&str> = d.iter().map(|d| d.issue.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "host[1].appliance",
            "host[1].addresses[0]",
            "service[0].public_key",
            "flow[0].to",
            "flow[0].expires"
        ],
        "{d:#?}"
    );
    for diag in &d {
        assert!(diag.line.is_some(), "located: {diag}");
    }
    let to = d.iter().find(|d| d.issue.path == "flow[0].to").unwrap();
    assert_eq!(to.line, Some(bad.lines().position(|l| l.starts_with("to = ")).unwrap() + 1));
    assert!(to.to_string().contains("known services: regional-lab"), "{to}");
    let prefix = d.iter().find(|d| d.issue.path == "host[1].addresses[0]").unwrap();
    assert!(prefix.to_string().contains("never opens a whole range"), "{prefix}");
}

#[test]
fn boundary_rules_are_refused() {
    let cases = [
        // A flow straight to an address, not through a service's tunnel.
        (LAB.replace("to = \"service:regional-lab\"", "to = \"10.78.0.100\""), "flow[0].to"),
        // A port the service does not accept.
        (LAB.replace("port = 443\nexpires", "port = 22\nexpires"), "flow[0].port"),
        // A standing flow without expiry.
        (LAB.replace("expires = \"2030-01-01T00:00:00Z\"\n", ""), "flow[0].expires"),
        // External flows are never infrastructure.
        (LAB.replace("expires = \"2030-01-01T00:00:00Z\"\n", "infrastructure = true\n"), "flow[0].infrastructure"),
        // Two hosts with the same address.
        (LAB.replace("\"10.77.0.12\"", "\"10.77.0.11\""), "host[1].addresses[0]"),
        // The same flow twice.
        (format!("{LAB}\n[[flow]]\nid = 2\nname = \"again\"\nfrom = \"host:p1\"\nto = \"service:regional-lab\"\nproto = \"tcp\"\nport = 443\nexpires = \"2030-01-01T00:00:00Z\"\n"), "flow[1].to"),
        // Loopback as a host.
        (LAB.replace("\"10.77.0.12\"", "\"127.0.0.1\""), "host[1].addresses[0]"),
        // Family mismatch: a v4-only host to a v6-only service.
        (LAB.replace("addresses = [\"10.77.0.11\", \"fd00:a1:77::11\"]", "addresses = [\"10.77.0.11\"]").replace("addresses = [\"10.78.0.100\", \"fd00:a1:78::100\"]", "addresses = [\"fd00:a1:78::100\"]"), "flow[0].to"),
    ];
    for (text, path) in cases {
        let d = check_toml(&text).expect_err(path);
        assert!(d.iter().any(|d| d.issue.path == path), "{path}: {d:#?}");
    }
}

#[test]
fn syntax_errors_are_located_and_nothing_panics() {
    let d = check_toml("version = 1\n[[flow]]\nid = \"one\"\n").unwrap_err();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].line, Some(3), "{d:?}");
    // Arbitrary cuts of a valid document never panic.
    for n in 0..LAB.len() {
        if LAB.is_char_boundary(n) {
            let _ = check_toml(&LAB[..n]);
        }
    }
}

#[test]
fn json_form_round_trips_with_json_paths() {
    let (policy, _) = check_toml(LAB).unwrap();
    let json = serde_json::to_string(&policy).unwrap();
    let (back, _) = check_json(&json).unwrap();
    assert_eq!(back, policy);
    let bad = json.replace("service:regional-lab", "service:x");
    let d = check_json(&bad).unwrap_err();
    assert_eq!(d[0].issue.path, "$.flow[0].to");
}

#[test]
fn grants_open_only_inside_their_window() {
    let (_, r) = check_toml(LAB).unwrap();
    let g = |starts, ends| Grant {
        id: 7,
        hosts: vec!["p2".into()],
        service: "regional-lab".into(),
        proto: "tcp".into(),
        port: Some(443),
        starts,
        ends,
    };
    let open = compile(&r, &[g(NOW.unix_secs - 10, NOW.unix_secs + 3600)], NOW).unwrap();
    let p2: Vec<_> =
        open["lab-appliance"].entries.iter().filter(|e| e.flow.src() == ip("10.77.0.12")).collect();
    assert_eq!(p2.len(), 1);
    assert_eq!(p2[0].rule_id, GRANT_RULE_BASE | 7);
    assert_eq!(p2[0].expiry, Expiry::At(NOW.mono_ns + 3600 * 1_000_000_000));
    for (s, e) in [(NOW.unix_secs + 10, NOW.unix_secs + 20), (NOW.unix_secs - 20, NOW.unix_secs)] {
        let c = compile(&r, &[g(s, e)], NOW).unwrap();
        assert!(
            c["lab-appliance"].entries.iter().all(|e| e.flow.src() != ip("10.77.0.12")),
            "closed window"
        );
    }
    let bad = Grant { service: "nope".into(), ..g(0, u64::MAX) };
    assert_eq!(compile(&r, &[bad], NOW).unwrap_err()[0].path, "grant[0].service");
}

#[test]
fn expired_flows_compile_to_nothing() {
    let (_, r) = check_toml(&LAB.replace("2030-01-01T00:00:00Z", "2020-01-01T00:00:00Z")).unwrap();
    assert!(compile(&r, &[], NOW).unwrap()["lab-appliance"].entries.is_empty());
}
