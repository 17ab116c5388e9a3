//! End to end, as root: a policy file applied to a lab appliance opens exactly
//! its flows, and a changed file opens and closes with minimal changes.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use airlock_testbed::{addr, unique_prefix, Lab, LabOptions, NetNs, LAB_APPLIANCE};

const LAB_POLICY: &str = include_str!("../../policies/lab.toml");

fn serve(ns: &NetNs, ip: IpAddr, port: u16) -> SocketAddr {
    let l =
        ns.run(move || TcpListener::bind(SocketAddr::new(ip, port))).expect("netns").expect("bind");
    let at = l.local_addr().expect("addr");
    thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut b = [0u8; 5];
            if s.read_exact(&mut b).is_ok() {
                let _ = s.write_all(b"pong\n");
            }
        }
    });
    at
}

fn tcp_ok(ns: &NetNs, to: SocketAddr) -> bool {
    ns.run(move || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_millis(600))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"ping\n")?;
        let mut r = String::new();
        s.read_to_string(&mut r)?;
        Ok(r)
    })
    .expect("netns")
    .is_ok_and(|r| r == "pong\n")
}

fn apply(lab: &Lab, text: &str) -> String {
    let path = lab.agent().record().state_dir.join("policy.toml");
    std::fs::write(&path, text).expect("write policy");
    lab.agent().apply_policy(&path).expect("policy apply")
}

#[test]
fn a_policy_file_opens_exactly_its_flows_and_changes_minimally() {
    let lab = Lab::start(&unique_prefix()).expect("lab");
    let t = lab.topology();
    let svc = serve(t.external(), IpAddr::V4(addr::EXT_V4), 443);
    let svc6 = serve(t.external(), IpAddr::V6(addr::EXT_V6), 443);
    assert!(!tcp_ok(t.p1(), svc), "closed before the policy");

    let out = apply(&lab, LAB_POLICY);
    assert!(out.contains("0 removed, 2 added"), "{out}");
    assert!(tcp_ok(t.p1(), svc), "imaging (p1) reaches the service");
    assert!(tcp_ok(t.p1(), svc6), "and over IPv6");
    assert!(!tcp_ok(t.p2(), svc), "p2 is not in the group");

    let wider = LAB_POLICY.replace("hosts = [\"p1\"]", "hosts = [\"p1\", \"p2\"]");
    let out = apply(&lab, &wider);
    assert!(out.contains("0 removed, 2 added"), "only p2's two entries are added: {out}");
    assert!(tcp_ok(t.p2(), svc), "p2 now reaches the service");

    let out = apply(&lab, &wider);
    assert!(out.contains("0 removed, 0 added"), "applying again changes nothing: {out}");

    let out = apply(&lab, LAB_POLICY);
    assert!(out.contains("2 removed, 0 added"), "{out}");
    assert!(!tcp_ok(t.p2(), svc), "p2 closed again");
    assert!(tcp_ok(t.p1(), svc), "p1 untouched");

    // An invalid file changes nothing and says why.
    let path = lab.agent().record().state_dir.join("bad.toml");
    std::fs::write(&path, LAB_POLICY.replace("service:regional-lab", "service:nope"))
        .expect("write");
    let err = lab.agent().apply_policy(&path).expect_err("invalid policy refused");
    assert!(
        err.to_string().contains("unknown service \\\"nope\\\"")
            || err.to_string().contains("unknown service"),
        "{err}"
    );
    assert!(tcp_ok(t.p1(), svc), "still enforcing the last good policy");
}

#[test]
fn the_last_known_good_policy_is_enforced_after_a_full_reinstall() {
    let mut lab = Lab::start(&unique_prefix()).expect("lab");
    let svc = serve(lab.topology().external(), IpAddr::V4(addr::EXT_V4), 443);
    apply(&lab, LAB_POLICY);
    assert!(tcp_ok(lab.topology().p1(), svc));

    // Stop the agent and remove every pin: the maps are gone, the ports bare.
    lab.agent_mut().stop().expect("stop");
    lab.agent().cli(&["detach"]).expect("detach");
    assert_eq!(lab.topology().appliance().read_sysctl("net.ipv4.ip_forward").expect("sysctl"), "0");
    assert!(!tcp_ok(lab.topology().p1(), svc), "nothing is forwarded without the boundary");

    // A fresh start applies the stored policy before it turns forwarding on.
    lab.agent_mut().restart().expect("start again");
    assert!(
        lab.agent().log().contains("last-known-good policy applied"),
        "{}",
        lab.agent().log_tail(15)
    );
    assert!(tcp_ok(lab.topology().p1(), svc), "the stored policy is enforced at once");
    assert!(!tcp_ok(lab.topology().p2(), svc), "and only it");
}

#[test]
fn each_layer_alone_enforces_the_policy() {
    let mut lab = Lab::start(&unique_prefix()).expect("lab");
    let (p1, p2, ext, app) = {
        let t = lab.topology();
        (
            t.p1().name().to_owned(),
            t.p2().name().to_owned(),
            t.external().name().to_owned(),
            t.appliance().name().to_owned(),
        )
    };
    let ns = |n: &str| NetNs::existing(n);
    let svc = serve(&ns(&ext), IpAddr::V4(addr::EXT_V4), 443);
    let other = serve(&ns(&ext), IpAddr::V4(addr::EXT_V4), 8443);
    let check = |what: &str| {
        assert!(tcp_ok(&ns(&p1), svc), "{what}: the policy's flow passes");
        assert!(!tcp_ok(&ns(&p1), other), "{what}: another port is blocked");
        assert!(!tcp_ok(&ns(&p2), svc), "{what}: another host is blocked");
    };
    apply(&lab, LAB_POLICY);
    let table = ns(&app).exec("nft", &["list", "table", "inet", "airlock"]).expect("nft table");
    assert!(table.contains("10.77.0.11 . 10.78.0.100 . tcp . 443"), "{table}");
    check("both layers");

    // eBPF alone: the nftables table is gone.
    ns(&app).exec("nft", &["delete", "table", "inet", "airlock"]).expect("delete table");
    check("eBPF alone");

    // nftables alone: the table is back, the XDP programs are unpinned (agent stopped).
    apply(&lab, LAB_POLICY);
    lab.agent_mut().stop().expect("stop");
    assert_eq!(lab.agent().unpin_links().expect("unpin"), 2, "one link per port");
    let link = ns(&app).exec("ip", &["link", "show", "patient0"]).expect("ip link");
    assert!(!link.contains("xdp"), "no XDP program left: {link}");
    check("nftables alone");
    let chain =
        ns(&app).exec("nft", &["list", "chain", "inet", "airlock", "forward"]).expect("chain");
    let dropped = chain
        .lines()
        .find(|l| l.contains("default deny"))
        .and_then(|l| l.split("packets ").nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
        .expect("default-deny counter");
    assert!(dropped > 0, "nftables counted the refused packets: {chain}");
}

/// The "default deny" counter of the nftables forward chain in `app`.
fn nft_default_deny(app: &NetNs) -> u64 {
    let chain = app.exec("nft", &["list", "chain", "inet", "airlock", "forward"]).expect("chain");
    chain
        .lines()
        .find(|l| l.contains("default deny"))
        .and_then(|l| l.split("packets ").nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no default-deny counter in {chain}"))
}

#[test]
fn with_no_state_at_all_the_nftables_layer_fails_closed_too() {
    // A fresh agent: no policy, no last-known-good state.
    let lab = Lab::start(&unique_prefix()).expect("lab");
    let t = lab.topology();
    let app = NetNs::existing(t.appliance().name());
    assert!(lab.agent().log().contains("nftables table installed with no flows"));
    let table = app.exec("nft", &["list", "table", "inet", "airlock"]).expect("the table is there");
    assert!(table.contains("drop comment \"default deny\""), "its final drop: {table}");
    assert!(!table.contains(" . tcp . "), "and no flow: {table}");

    // The eBPF layer lets this one flow through (an entry added by hand, eBPF
    // only); the nftables layer alone still drops it, and counts it.
    let svc = serve(t.external(), IpAddr::V4(addr::EXT_V4), 443);
    let before = nft_default_deny(&app);
    lab.agent()
        .cli(&[
            "flow",
            "add",
            "--src",
            "10.77.0.11",
            "--dst",
            "10.78.0.100",
            "--proto",
            "tcp",
            "--dport",
            "443",
            "--rule-id",
            "5",
            "--ttl",
            "5m",
        ])
        .expect("flow add");
    assert!(!tcp_ok(t.p1(), svc), "dropped by the nftables layer");
    assert!(nft_default_deny(&app) > before, "by its final drop");
    // Without the table the entry passes it: the table was what dropped it.
    app.exec("nft", &["delete", "table", "inet", "airlock"]).expect("delete table");
    assert!(tcp_ok(t.p1(), svc), "the eBPF entry passes it alone");
}

/// The rule ids of the flow entries in the maps.
fn rule_ids(lab: &Lab) -> Vec<u64> {
    let out = lab.agent().cli(&["flow", "list", "--json"]).expect("flow list");
    let v: Vec<serde_json::Value> = serde_json::from_str(&out).expect("JSON");
    v.iter().filter_map(|f| f["rule_id"].as_u64()).collect()
}

#[test]
fn an_entry_another_process_wrote_is_seen_by_the_agents_next_change() {
    // The running agent applies bundles against its record of what it wrote.
    let lab = Lab::start_with(LabOptions::with_controller(&unique_prefix()))
        .expect("lab with controller");
    let svc = serve(lab.topology().external(), IpAddr::V4(addr::EXT_V4), 443);
    assert!(tcp_ok(lab.topology().p1(), svc), "the lab policy is enforced");

    // Another process writes the maps: an entry no policy has.
    lab.agent()
        .cli(&[
            "flow",
            "add",
            "--src",
            "10.77.0.12",
            "--dst",
            "10.78.0.100",
            "--proto",
            "tcp",
            "--dport",
            "8443",
            "--rule-id",
            "77",
            "--ttl",
            "10m",
        ])
        .expect("flow add");
    assert!(rule_ids(&lab).contains(&77));

    // The next change (every flow closed) lists the maps again, so it also
    // removes the entry its record did not have: nothing stays open.
    let closed = &LAB_POLICY[..LAB_POLICY.find("[[flow]]").expect("lab.toml has a flow")];
    let mut api = lab.api().expect("controller API");
    api.apply_policy(closed, "close every flow").expect("apply");
    api.wait_applied(LAB_APPLIANCE, Duration::from_secs(30)).expect("applied");
    let left = rule_ids(&lab);
    assert!(!left.contains(&77), "the hand-written entry is gone: {left:?}");
    assert!(
        left.iter().all(|r| *r == u64::from(u32::MAX)),
        "only the agent's management entries are left: {left:?}"
    );
    assert!(lab.agent().log().contains("another process wrote the flow maps"));
    assert!(!tcp_ok(lab.topology().p1(), svc), "closed");
}

#[test]
fn expired_entries_leave_the_maps_by_the_agents_record() {
    let lab = Lab::start_with(LabOptions::with_controller(&unique_prefix()))
        .expect("lab with controller");
    // p2 gets a flow that ends in a few seconds.
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{}", unix + 6), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("date");
    let end = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let policy = format!(
        "{LAB_POLICY}\n[[flow]]\nid = 2\nname = \"p2, briefly\"\nfrom = \"host:p2\"\n\
         to = \"service:regional-lab\"\nproto = \"tcp\"\nport = 443\nexpires = \"{end}\"\n"
    );
    let mut api = lab.api().expect("controller API");
    api.apply_policy(&policy, "p2 for a few seconds").expect("apply");
    api.wait_applied(LAB_APPLIANCE, Duration::from_secs(30)).expect("applied");
    assert_eq!(rule_ids(&lab).iter().filter(|r| **r == 2).count(), 2, "v4 and v6");

    // The sweep finds them through the agent's record, and removes them.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while rule_ids(&lab).contains(&2) {
        assert!(std::time::Instant::now() < deadline, "{}", lab.agent().log_tail(20));
        thread::sleep(Duration::from_millis(250));
    }
    assert!(lab.agent().log().contains("expired flow entries removed"));
    assert!(rule_ids(&lab).contains(&1), "the standing flow stays");
}

/// `policy apply` with the agent's fault-injection point set: the process
/// SIGKILLs itself after the eBPF step, before nftables and the save.
fn apply_and_crash_after_ebpf(lab: &Lab, text: &str) -> std::process::ExitStatus {
    let r = lab.agent().record();
    let path = r.state_dir.join("crash.toml");
    std::fs::write(&path, text).expect("write policy");
    std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", r.netns))
        .arg(&r.bin)
        .args(["--config", &r.config.to_string_lossy(), "policy", "apply", &path.to_string_lossy()])
        .args(["--appliance", airlock_testbed::LAB_APPLIANCE])
        .env("AIRLOCK_FAULT", "after-ebpf")
        .status()
        .expect("run the agent")
}

#[test]
fn a_crash_between_the_layers_opens_nothing_and_converges_on_restart() {
    use std::os::unix::process::ExitStatusExt as _;
    let mut lab = Lab::start(&unique_prefix()).expect("lab");
    let t = lab.topology();
    let (p1, app) = (t.p1().name().to_owned(), t.appliance().name().to_owned());
    let a443 = serve(t.external(), IpAddr::V4(addr::EXT_V4), 443);
    let a8443 = serve(t.external(), IpAddr::V4(addr::EXT_V4), 8443);
    apply(&lab, LAB_POLICY);
    assert!(tcp_ok(&NetNs::existing(&p1), a443));

    // Policy B moves the flow from 443 to 8443.
    let b = LAB_POLICY
        .replace(
            "ports = [{ proto = \"tcp\", port = 443 }",
            "ports = [{ proto = \"tcp\", port = 443 }, { proto = \"tcp\", port = 8443 }",
        )
        .replace("port = 443\nexpires", "port = 8443\nexpires");
    let status = apply_and_crash_after_ebpf(&lab, &b);
    assert_eq!(status.signal(), Some(9), "killed between the layers: {status:?}");

    // eBPF now holds B, nftables still A: only what both allow passes, i.e. nothing.
    let p1ns = NetNs::existing(&p1);
    assert!(!tcp_ok(&p1ns, a443), "443: eBPF (B) refuses");
    assert!(!tcp_ok(&p1ns, a8443), "8443: nftables (A) refuses");

    // A restart applies the last-known-good policy (A: B was never acknowledged) to both layers.
    lab.agent_mut().restart().expect("restart");
    assert!(tcp_ok(&p1ns, a443), "converged on A");
    assert!(!tcp_ok(&p1ns, a8443));
    let flows = lab.agent().cli(&["flow", "list", "--json"]).expect("flow list");
    assert!(flows.contains("\"dport\": 443") && !flows.contains("8443"), "{flows}");
    let table =
        NetNs::existing(&app).exec("nft", &["list", "table", "inet", "airlock"]).expect("nft");
    assert!(table.contains(". tcp . 443") && !table.contains("8443"), "{table}");
}

#[test]
fn a_hundred_policy_swaps_under_a_flood_let_no_disallowed_packet_through() {
    use std::{
        collections::BTreeMap,
        net::UdpSocket,
        sync::{
            atomic::{AtomicBool, Ordering},
            Arc, Mutex,
        },
    };
    let lab = Lab::start(&unique_prefix()).expect("lab");
    let t = lab.topology();
    // The service accepts UDP 5001..5003; A allows p1 → 5001, B allows p1 → 5002.
    // Never allowed: 5003 from p1, anything from p2.
    let base = LAB_POLICY
        .replace(
            "ports = [{ proto = \"tcp\", port = 443 }, { proto = \"icmp\" }]",
            "ports = [{ proto = \"udp\", port = 5001 }, { proto = \"udp\", port = 5002 }, { proto = \"udp\", port = 5003 }]",
        )
        .replace("proto = \"tcp\"\nport = 443", "proto = \"udp\"\nport = PORT");
    let (pa, pb) = (base.replace("PORT", "5001"), base.replace("PORT", "5002"));

    let seen: Arc<Mutex<BTreeMap<(IpAddr, u16), u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    for port in [5001u16, 5002, 5003] {
        let sock = t
            .external()
            .run(move || UdpSocket::bind(SocketAddr::new(IpAddr::V4(addr::EXT_V4), port)))
            .expect("netns")
            .expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
        let (seen, stop) = (seen.clone(), stop.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    *seen.lock().expect("lock").entry((from.ip(), port)).or_default() += 1;
                }
            }
        });
    }
    let mut senders = Vec::new();
    for host in [t.p1(), t.p2()] {
        let stop = stop.clone();
        senders.push(
            host.spawn(move || -> std::io::Result<u64> {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    for port in [5001u16, 5002, 5003] {
                        let _ = s.send_to(b"x", SocketAddr::new(IpAddr::V4(addr::EXT_V4), port));
                        n += 1;
                    }
                    if n % 300 == 0 {
                        thread::sleep(Duration::from_millis(1));
                    }
                }
                Ok(n)
            })
            .expect("sender"),
        );
    }
    for i in 0..100 {
        apply(&lab, if i % 2 == 0 { &pa } else { &pb });
    }
    stop.store(true, Ordering::Relaxed);
    let sent: u64 =
        senders.into_iter().map(|h| h.join().expect("join").expect("netns").expect("send")).sum();
    thread::sleep(Duration::from_millis(100));
    let seen = seen.lock().expect("lock").clone();
    let got =
        |ip: std::net::Ipv4Addr, port: u16| seen.get(&(IpAddr::V4(ip), port)).copied().unwrap_or(0);
    assert!(sent > 10_000, "the flood ran: {sent} datagrams");
    assert!(
        got(addr::P1_V4, 5001) > 0 && got(addr::P1_V4, 5002) > 0,
        "the allowed flows passed: {seen:?}"
    );
    assert_eq!(got(addr::P1_V4, 5003), 0, "never-allowed port: {seen:?}");
    for port in [5001, 5002, 5003] {
        assert_eq!(got(addr::P2_V4, port), 0, "never-allowed host: {seen:?}");
    }
}
