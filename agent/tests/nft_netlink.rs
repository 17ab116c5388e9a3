//! The netlink element applier against the real kernel and the real `nft`
//! (root; each test in a network namespace of its own, removed on drop).
#![expect(clippy::unwrap_used, reason = "a test: a panic is the failure report")]

use std::process::Command;

use airlock_agent::{
    nft_netlink::{self, NetlinkError},
    nftables,
};
use airlock_policy::{
    nft::{self, NftInput, NftRuleset},
    nft_delta::element_delta,
    Expiry, Flow, FlowEntry, Ingress, Protocol,
};
use airlock_testbed::NetNs;
use serde_json::Value;

const S: u64 = 1_000_000_000;
const NOW: u64 = 1_000 * S;

fn input() -> NftInput {
    NftInput::new(4)
        .with_ports(Ingress::Patient, ["patient0"])
        .unwrap()
        .with_ports(Ingress::Uplink, ["uplink0"])
        .unwrap()
}

/// Entry `i` of a reproducible spread over every set: both families, TCP,
/// UDP and ICMP, both sides, with and without replies, timed and
/// infrastructure. `rule` and `secs` let a test change it.
fn entry(i: u32, rule: u32, secs: Option<u64>) -> FlowEntry {
    let v6 = i % 2 == 1;
    let (a, b) = (i % 200 + 1, i / 200 + 1);
    let (src, dst) = if v6 {
        (format!("fd00:a1:77::{a:x}"), format!("fd00:a1:78::{b:x}"))
    } else {
        (format!("10.77.0.{a}"), format!("10.78.0.{b}"))
    };
    let protocol = [Protocol::Tcp, Protocol::Udp, Protocol::Icmp][(i / 2 % 3) as usize];
    let port = (protocol != Protocol::Icmp).then_some(1000 + i as u16);
    let ingress = if (i / 6).is_multiple_of(2) { Ingress::Patient } else { Ingress::Uplink };
    let (src, dst) = match ingress {
        Ingress::Patient | Ingress::Management => (src, dst),
        Ingress::Uplink => (dst, src),
    };
    let flow = Flow::new(src.parse().unwrap(), dst.parse().unwrap(), protocol, port).unwrap();
    let expiry = secs.map_or(Expiry::Infrastructure, |s| Expiry::At(NOW + s * S));
    let allow_reply = (i / 12).is_multiple_of(2);
    FlowEntry::new(flow, rule, 4, ingress, allow_reply, expiry, secs.is_none()).unwrap()
}

fn lifetime(i: u32) -> Option<u64> {
    (!i.is_multiple_of(5)).then_some(600 + u64::from(i))
}

/// 48 entries (two of each of the 16 sets … and more).
fn old_entries() -> Vec<FlowEntry> {
    (0..48).map(|i| entry(i, i + 1, lifetime(i))).collect()
}

/// The old entries with some removed, some new, some with a new rule id or
/// lifetime (same key: removed and added again).
fn new_entries() -> Vec<FlowEntry> {
    (0..60)
        .filter(|i| i % 7 != 3)
        .map(|i| match i {
            i if i % 11 == 2 => entry(i, i + 1000, lifetime(i)),
            i if i % 13 == 4 => entry(i, i + 1, Some(7200)),
            i => entry(i, i + 1, lifetime(i)),
        })
        .collect()
}

fn nft(args: &[&str]) -> String {
    let out = Command::new("nft").args(args).output().expect("run nft (nftables installed?)");
    assert!(out.status.success(), "nft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The table as `nft -j` lists it, without handles; each element's
/// `expires` taken out and returned beside it (it counts down).
fn listing(table: &str) -> (Value, Vec<u64>) {
    let mut v: Value = serde_json::from_str(&nft(&["-j", "list", "table", "inet", table])).unwrap();
    let mut expires = Vec::new();
    let items = v["nftables"].as_array_mut().unwrap();
    items.retain(|i| i.get("metainfo").is_none());
    for item in items.iter_mut() {
        for (_, obj) in item.as_object_mut().unwrap().iter_mut() {
            obj.as_object_mut().unwrap().remove("handle");
            for e in obj.get_mut("elem").and_then(Value::as_array_mut).into_iter().flatten() {
                if let Some(elem) = e.get_mut("elem").and_then(Value::as_object_mut) {
                    if let Some(x) = elem.remove("expires") {
                        expires.push(x.as_u64().unwrap());
                    }
                }
            }
        }
    }
    (v, expires)
}

fn elements(v: &Value) -> Vec<&Value> {
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.get("set"))
        .filter(|s| !s["name"].as_str().unwrap().ends_with("_ports"))
        .flat_map(|s| s.get("elem").and_then(Value::as_array).into_iter().flatten())
        .collect()
}

fn compiled(entries: &[FlowEntry]) -> NftRuleset {
    nft::compile(&input(), entries, NOW)
}

#[test]
fn a_netlink_delta_leaves_the_table_as_the_nft_text_delta_does() {
    let ns = NetNs::unique().expect("netns");
    ns.run(|| {
        let (old, new) = (compiled(&old_entries()), compiled(&new_entries()));
        let delta = element_delta(&old, &new).expect("same shape");
        assert!(delta.removals().len() >= 8 && delta.additions().len() >= 16, "{delta}");

        assert!(!nft_netlink::table_exists("airlock").unwrap(), "a fresh namespace");
        nftables::apply(&old.to_string()).expect("install the old ruleset");
        assert!(nft_netlink::table_exists("airlock").unwrap());
        nft_netlink::apply_delta(&delta).expect("netlink delta");
        let (by_netlink, exp_netlink) = listing("airlock");

        nftables::apply(&old.to_string()).expect("reinstall the old ruleset");
        nftables::apply(&delta.to_string()).expect("nft -f delta");
        let (by_text, exp_text) = listing("airlock");

        assert_eq!(by_netlink, by_text, "same sets, elements, timeouts, comments, counters");
        assert_eq!(exp_netlink.len(), exp_text.len());
        for (a, b) in exp_netlink.iter().zip(&exp_text) {
            assert!(a.abs_diff(*b) <= 1, "expiries within a second: {a} vs {b}");
        }
        // What the text path produces is the new ruleset: every element with its
        // comment and a counter, the timed ones with their timeout.
        let listed = elements(&by_netlink);
        let n_new: usize = new.sets().iter().map(|s| s.len()).sum();
        assert_eq!(listed.len(), n_new);
        for e in &listed {
            let e = &e["elem"];
            assert!(e["comment"].as_str().unwrap().starts_with("rule "), "{e}");
            assert_eq!(e["counter"], serde_json::json!({"packets": 0, "bytes": 0}), "{e}");
        }
        let timed = listed.iter().filter(|e| e["elem"].get("timeout").is_some()).count();
        let want_timed: usize = new
            .sets()
            .iter()
            .flat_map(|s| s.elements())
            .filter(|e| e.timeout_secs.is_some())
            .count();
        assert_eq!(timed, want_timed);
        assert!(listed.iter().any(|e| e["elem"]["comment"] == "rule 1002 v4"), "a changed rule id");
    })
    .expect("run in the namespace");
}

#[test]
fn a_refused_batch_changes_nothing_and_names_what_was_refused() {
    let ns = NetNs::unique().expect("netns");
    ns.run(|| {
        let old = compiled(&old_entries());
        nftables::apply(&old.to_string()).expect("install");
        let (before, _) = listing("airlock");

        // The delta believes an element is there that is not: its removal
        // fails, and the additions before and after it in the batch are
        // rolled back with it.
        let mut believed = old_entries();
        believed.push(entry(100, 101, None));
        let believed = compiled(&believed);
        let mut wanted = new_entries();
        wanted.retain(|e| e.flow != entry(100, 0, None).flow);
        let delta = element_delta(&believed, &compiled(&wanted)).unwrap();
        assert!(!delta.additions().is_empty());
        let err = nft_netlink::apply_delta(&delta).expect_err("a missing element");
        match &err {
            NetlinkError::Refused { what, errno, .. } => {
                assert_eq!(*errno, libc::ENOENT, "{err}");
                let key = airlock_policy::nft_delta::key_text(&entry(100, 0, None).flow);
                assert!(what.contains(&key), "names the element: {err}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(listing("airlock").0, before, "atomic: nothing changed");

        // A table that is not there.
        let other = NftInput::new(4).with_table("airlock_none").unwrap();
        let missing = nft::compile(&other, &[entry(0, 1, None)], NOW);
        let empty = nft::compile(&other, &[], NOW);
        let err = nft_netlink::apply_delta(&element_delta(&empty, &missing).unwrap())
            .expect_err("no such table");
        assert!(
            matches!(&err, NetlinkError::Refused { what, errno, .. }
                if *errno == libc::ENOENT && what.starts_with("table inet airlock_none")),
            "{err}"
        );
        assert_eq!(listing("airlock").0, before);
    })
    .expect("run in the namespace");
}

#[test]
fn a_batch_refused_at_a_later_set_rolls_back_the_earlier_sets() {
    let ns = NetNs::unique().expect("netns");
    ns.run(|| {
        // A table with only the v4 flow set: additions to it come first in the
        // batch and would succeed alone; the v6 set does not exist.
        nftables::apply(
            "table inet airlock {\n set flow4_patient {\n  type ipv4_addr . ipv4_addr . inet_proto . inet_service\n  flags timeout\n  counter\n }\n}\n",
        )
        .expect("install");
        let (before, _) = listing("airlock");
        let (v4, v6) = (entry(0, 1, Some(60)), entry(1, 2, Some(60)));
        let delta =
            element_delta(&compiled(&[]), &compiled(&[v4, v6])).expect("same shape");
        assert_eq!(delta.additions().len(), 2);
        // One socket for everything below: answers are matched to requests.
        let mut nl = nft_netlink::NftNetlink::open().unwrap();
        assert!(nl.table_exists("airlock").unwrap());
        let err = nl.apply_delta(&delta).expect_err("no v6 set");
        assert!(
            matches!(&err, NetlinkError::Refused { what, errno, .. }
                if *errno == libc::ENOENT && what.starts_with("set inet airlock flow6_patient")),
            "{err}"
        );
        assert_eq!(listing("airlock").0, before, "the v4 addition rolled back");

        // The same v4 addition alone goes through, with its counter and comment.
        let alone = element_delta(&compiled(&[]), &compiled(&[v4])).unwrap();
        nl.apply_delta(&alone).expect("v4 alone");
        assert!(!nl.table_exists("airlock_none").unwrap());
        let listed = nft(&["list", "table", "inet", "airlock"]);
        assert!(
            listed.contains(
                "10.77.0.1 . 10.78.0.1 . tcp . 1000 counter packets 0 bytes 0 timeout 1m expires"
            ) && listed.contains("comment \"rule 1 v4\""),
            "{listed}"
        );
    })
    .expect("run in the namespace");
}

// ---- through the agent, in the lab ----------------------------------------------

const LAB_POLICY: &str = include_str!("../../policies/lab.toml");

/// Packets counted by the element of `flow4_patient` whose source is `src`
/// (`None`: no such element).
fn element_packets(app: &NetNs, src: &str) -> Option<u64> {
    let out = app.exec("nft", &["-j", "list", "set", "inet", "airlock", "flow4_patient"]).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    let sets = v["nftables"].as_array().unwrap().iter().filter_map(|i| i.get("set"));
    let elems = sets.flat_map(|s| s.get("elem").and_then(Value::as_array).into_iter().flatten());
    elems
        .map(|e| &e["elem"])
        .find(|e| e["val"]["concat"][0] == src)
        .map(|e| e["counter"]["packets"].as_u64().unwrap())
}

/// The agent's `policy apply` of a policy text: (stdout, stderr = its log).
fn apply(lab: &airlock_testbed::Lab, text: &str) -> (String, String) {
    let r = lab.agent().record();
    let path = r.state_dir.join("policy.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", r.netns))
        .arg(&r.bin)
        .args(["--config", &r.config.to_string_lossy(), "policy", "apply", &path.to_string_lossy()])
        .args(["--appliance", airlock_testbed::LAB_APPLIANCE])
        .env_remove("RUST_LOG")
        .output()
        .expect("run the agent");
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "policy apply: {stdout}{stderr}");
    (stdout.into_owned(), stderr.into_owned())
}

/// A TCP handshake from `from` to the service (443) completes.
fn connects(from: &NetNs) -> bool {
    let to = std::net::SocketAddr::from((airlock_testbed::addr::EXT_V4, 443));
    from.run(move || {
        std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_millis(600)).is_ok()
    })
    .unwrap()
}

#[test]
fn policy_changes_go_over_netlink_and_a_stale_table_is_replaced() {
    let lab = airlock_testbed::Lab::start(&airlock_testbed::unique_prefix()).expect("lab");
    let t = lab.topology();
    let app = t.appliance();
    let _svc = t
        .external()
        .run(|| std::net::TcpListener::bind((airlock_testbed::addr::EXT_V4, 443)))
        .unwrap()
        .expect("listen");
    let (_, log) = apply(&lab, LAB_POLICY);
    assert!(!log.contains("over netlink"), "the first policy installs the table with nft: {log}");
    assert!(connects(t.p1()) && !connects(t.p2()));
    let p1 = element_packets(app, "10.77.0.11").expect("p1's element");
    assert!(p1 > 0, "the handshake was counted");

    // p2 joins: two elements added. Had the table been replaced, p1's counter
    // would start again from 0; the agent has no other element path than netlink.
    let wider = LAB_POLICY.replace("hosts = [\"p1\"]", "hosts = [\"p1\", \"p2\"]");
    let (out, log) = apply(&lab, &wider);
    assert!(out.contains("0 removed, 2 added"), "{out}");
    assert!(
        log.contains("nftables elements changed over netlink")
            && log.contains("removed=0")
            && log.contains("added=2"),
        "{log}"
    );
    assert_eq!(element_packets(app, "10.77.0.11"), Some(p1), "p1's element kept, not replaced");
    assert_eq!(element_packets(app, "10.77.0.12"), Some(0), "p2's element added");
    assert!(connects(t.p2()), "p2 passes both layers");

    // Someone removes p2's element behind the agent's back: the next change
    // (p2 leaves) refers to it, the kernel refuses the batch (nothing
    // changed), and the agent replaces the table instead.
    app.exec(
        "nft",
        &["delete element inet airlock flow4_patient { 10.77.0.12 . 10.78.0.100 . tcp . 443 }"],
    )
    .expect("delete p2's element");
    let (out, log) = apply(&lab, LAB_POLICY);
    assert!(out.contains("2 removed, 0 added"), "{out}");
    assert!(
        log.contains("nftables element batch not applied; replacing the table")
            && log.contains(
                "element 10.77.0.12 . 10.78.0.100 . tcp . 443 of set inet airlock flow4_patient"
            ),
        "the refusal is logged with what was refused: {log}"
    );
    assert_eq!(element_packets(app, "10.77.0.11"), Some(0), "the table was replaced");
    assert_eq!(element_packets(app, "10.77.0.12"), None);
    let table = app.exec("nft", &["list", "table", "inet", "airlock"]).unwrap();
    assert!(!table.contains("fd00:a1:77::12"), "p2's IPv6 element is gone as well: {table}");
    assert!(connects(t.p1()) && !connects(t.p2()), "and the policy is enforced");
}

/// `policy apply` killed at fault point `point` (SIGKILL, like a crash).
fn apply_and_crash(lab: &airlock_testbed::Lab, text: &str, point: &str) {
    use std::os::unix::process::ExitStatusExt as _;
    let r = lab.agent().record();
    let path = r.state_dir.join("crash.toml");
    std::fs::write(&path, text).unwrap();
    let status = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", r.netns))
        .arg(&r.bin)
        .args(["--config", &r.config.to_string_lossy(), "policy", "apply", &path.to_string_lossy()])
        .args(["--appliance", airlock_testbed::LAB_APPLIANCE])
        .env("AIRLOCK_FAULT", point)
        .status()
        .expect("run the agent");
    assert_eq!(status.signal(), Some(9), "killed at {point}: {status:?}");
}

const MISMATCH: &str = "the eBPF maps did not hold the previously applied entries";

/// The element delta comes from the eBPF step's actions, so it is right only
/// when the maps held what the table holds. After an apply that stopped
/// between its steps they differ, and the next apply replaces the table:
/// built from the actions alone, the delta would miss p2's element after a
/// crash between the layers (p2 never gets through), and leave it in the
/// table after a crash before the save (the table more open than the policy).
#[test]
fn after_an_apply_that_stopped_midway_the_next_one_replaces_the_table() {
    let lab = airlock_testbed::Lab::start(&airlock_testbed::unique_prefix()).expect("lab");
    let t = lab.topology();
    let app = t.appliance();
    let _svc = t
        .external()
        .run(|| std::net::TcpListener::bind((airlock_testbed::addr::EXT_V4, 443)))
        .unwrap()
        .expect("listen");
    let wider = LAB_POLICY.replace("hosts = [\"p1\"]", "hosts = [\"p1\", \"p2\"]");
    apply(&lab, LAB_POLICY);

    // Killed after the eBPF step: the maps hold `wider`, the table and the
    // last-known-good state the lab policy. Applying `wider` again changes
    // nothing in the maps, but the table must gain p2.
    apply_and_crash(&lab, &wider, "after-ebpf");
    assert!(!connects(t.p2()), "the table (lab policy) refuses p2");
    let (out, log) = apply(&lab, &wider);
    assert!(out.contains("0 removed, 0 added"), "the maps already hold it: {out}");
    assert!(log.contains(MISMATCH) && !log.contains("over netlink"), "{log}");
    assert_eq!(element_packets(app, "10.77.0.12"), Some(0), "p2's element, in a new table");
    assert!(connects(t.p1()) && connects(t.p2()));

    // With both layers in step again, a change goes over netlink.
    let (_, log) = apply(&lab, LAB_POLICY);
    assert!(log.contains("nftables elements changed over netlink") && !log.contains(MISMATCH));
    assert_eq!(element_packets(app, "10.77.0.12"), None);

    // Killed after both steps, before the save: both layers hold `wider`, the
    // last-known-good state the lab policy. Applying the lab policy must take
    // p2's element out of the table, which the lab policy never had.
    apply_and_crash(&lab, &wider, "before-save");
    assert!(connects(t.p2()), "both layers hold wider");
    let (out, log) = apply(&lab, LAB_POLICY);
    assert!(!out.contains(" 0 removed"), "the maps close p2: {out}");
    assert!(log.contains(MISMATCH) && !log.contains("over netlink"), "{log}");
    assert_eq!(element_packets(app, "10.77.0.12"), None, "p2's element is gone");
    assert!(connects(t.p1()) && !connects(t.p2()));
}
