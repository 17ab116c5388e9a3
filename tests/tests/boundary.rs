//! End to end, as root: the real agent loads the real XDP programs onto the
//! appliance's veth ports in a lab of its own (unique namespaces, removed on
//! drop and on panic), and real TCP, UDP and ICMP traffic crosses — or does not.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use airlock_testbed::{addr, unique_prefix, AgentConfig, Lab, LabOptions, NetNs, Signal};

const OPEN: Duration = Duration::from_secs(3);
/// Packets to a closed boundary vanish; give them this long to (not) arrive.
const SHUT: Duration = Duration::from_millis(600);

fn ip4(a: std::net::Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}
fn ip6(a: std::net::Ipv6Addr) -> IpAddr {
    IpAddr::V6(a)
}

/// A lab with the eBPF layer alone: these tests allow flows by hand
/// (`flow add`, eBPF only), which the nftables layer would drop.
fn lab() -> Lab {
    let prefix = unique_prefix();
    let opts = LabOptions {
        config: AgentConfig::for_lab(&prefix).ebpf_only(),
        ..LabOptions::new(&prefix)
    };
    Lab::start_with(opts).expect("lab with an enforcing agent")
}

/// A TCP server in `ns` answering "pong" to each connection until dropped.
struct TcpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl TcpServer {
    fn start(ns: &NetNs, ip: IpAddr) -> Self {
        let listener = ns
            .run(move || TcpListener::bind(SocketAddr::new(ip, 0)))
            .expect("enter namespace")
            .expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(OPEN));
                        let mut buf = [0u8; 5];
                        if s.read_exact(&mut buf).is_ok() {
                            let _ = s.write_all(b"pong\n");
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { addr, stop }
    }
    fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// True when a TCP exchange from `ns` to `to` completes.
fn tcp_ok(ns: &NetNs, to: SocketAddr) -> bool {
    ns.run(move || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&to, SHUT.max(Duration::from_millis(300)))?;
        s.set_read_timeout(Some(OPEN))?;
        s.write_all(b"ping\n")?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(reply)
    })
    .expect("enter namespace")
    .is_ok_and(|r| r == "pong\n")
}

/// A UDP echo server in `ns` until dropped; counts datagrams received.
struct UdpEcho {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl UdpEcho {
    fn start(ns: &NetNs, ip: IpAddr) -> Self {
        let sock = ns
            .run(move || UdpSocket::bind(SocketAddr::new(ip, 0)))
            .expect("enter namespace")
            .expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
        let addr = sock.local_addr().expect("addr");
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, flag) = (received.clone(), stop.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    count.fetch_add(1, Ordering::Relaxed);
                    let _ = sock.send_to(&buf[..n], peer);
                }
            }
        });
        Self { addr, received, stop }
    }
    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// True when a UDP datagram from `ns` to `to` comes back.
fn udp_ok(ns: &NetNs, to: SocketAddr) -> bool {
    ns.run(move || -> std::io::Result<bool> {
        let any = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let s = UdpSocket::bind(any)?;
        s.set_read_timeout(Some(SHUT))?;
        for _ in 0..2 {
            s.send_to(b"hello", to)?;
            let mut buf = [0u8; 16];
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                return Ok(&buf[..n] == b"hello");
            }
        }
        Ok(false)
    })
    .expect("enter namespace")
    .unwrap_or(false)
}

/// True when one ICMP echo from `ns` to `to` is answered (iputils ping).
fn ping_ok(ns: &NetNs, to: IpAddr) -> bool {
    ns.exec("ping", &["-n", "-c", "1", "-W", "1", &to.to_string()]).is_ok()
}

fn flow_add(lab: &Lab, args: &[&str]) {
    let mut all = vec!["flow", "add"];
    all.extend_from_slice(args);
    lab.agent().cli(&all).unwrap_or_else(|e| panic!("flow add {args:?}: {e}"));
}

/// `flow add` of one exact flow with a lifetime.
fn allow(lab: &Lab, src: &str, dst: &str, proto: &str, dport: Option<&str>, rule: &str, ttl: &str) {
    let mut args = vec!["--src", src, "--dst", dst, "--proto", proto];
    if let Some(p) = dport {
        args.extend(["--dport", p]);
    }
    args.extend(["--rule-id", rule, "--ttl", ttl]);
    flow_add(lab, &args);
}

fn stats(lab: &Lab) -> airlock_testbed::AgentStats {
    lab.agent().stats().expect("stats")
}

fn flows_json(lab: &Lab) -> Vec<serde_json::Value> {
    let out = lab.agent().cli(&["flow", "list", "--json"]).expect("flow list");
    serde_json::from_str(&out).expect("flow list JSON")
}

#[test]
fn no_entries_drops_everything_both_ways_and_counts_it() {
    let lab = lab();
    let t = lab.topology();
    let (p1, ext) = (t.p1(), t.external());
    let before = stats(&lab).packets("drop_no_flow");

    let ext_tcp = TcpServer::start(ext, ip4(addr::EXT_V4));
    let ext_tcp6 = TcpServer::start(ext, ip6(addr::EXT_V6));
    let ext_udp = UdpEcho::start(ext, ip4(addr::EXT_V4));
    let p1_tcp = TcpServer::start(p1, ip4(addr::P1_V4));
    let p1_udp = UdpEcho::start(p1, ip6(addr::P1_V6));

    assert!(!tcp_ok(p1, ext_tcp.addr), "patient → external TCP must be dropped");
    assert!(!tcp_ok(p1, ext_tcp6.addr), "patient → external TCP over IPv6 must be dropped");
    assert!(!udp_ok(p1, ext_udp.addr), "patient → external UDP must be dropped");
    assert!(!ping_ok(p1, ip4(addr::EXT_V4)), "patient → external ICMP must be dropped");
    assert!(!ping_ok(p1, ip6(addr::EXT_V6)), "patient → external ICMPv6 must be dropped");
    assert!(!tcp_ok(ext, p1_tcp.addr), "external → patient TCP must be dropped");
    assert!(!udp_ok(ext, p1_udp.addr), "external → patient UDP over IPv6 must be dropped");
    assert!(!ping_ok(ext, ip4(addr::P1_V4)), "external → patient ICMP must be dropped");
    assert_eq!(ext_udp.received() + p1_udp.received(), 0, "nothing may arrive");

    let s = stats(&lab);
    // At least: TCP SYN retries (≥1 each) ×3, UDP ×2 ×2, ICMP ×3.
    assert!(s.packets("drop_no_flow") >= before + 10, "drops counted: {}", s.summary());
    assert_eq!(s.packets("pass_flow") + s.packets("pass_reply"), 0, "{}", s.summary());
    assert!(s.packets("pass_arp") > 0, "ARP to the appliance works: {}", s.summary());
}

#[test]
fn one_entry_lets_exactly_that_flow_pass() {
    let lab = lab();
    let t = lab.topology();
    let (p1, p2, ext) = (t.p1(), t.p2(), t.external());
    let tcp = TcpServer::start(ext, ip4(addr::EXT_V4));
    let other_tcp = TcpServer::start(ext, ip4(addr::EXT_V4));
    let tcp6 = TcpServer::start(ext, ip6(addr::EXT_V6));
    let udp = UdpEcho::start(ext, ip4(addr::EXT_V4));
    let (p1s, p1s6, ext4, ext6) = (
        addr::P1_V4.to_string(),
        addr::P1_V6.to_string(),
        addr::EXT_V4.to_string(),
        addr::EXT_V6.to_string(),
    );
    let (tport, t6port, uport) =
        (tcp.port().to_string(), tcp6.port().to_string(), udp.addr.port().to_string());

    assert!(!tcp_ok(p1, tcp.addr), "closed before the entry exists");
    allow(&lab, &p1s, &ext4, "tcp", Some(&tport), "11", "10m");
    allow(&lab, &p1s6, &ext6, "tcp", Some(&t6port), "12", "10m");
    allow(&lab, &p1s, &ext4, "udp", Some(&uport), "13", "10m");
    allow(&lab, &p1s, &ext4, "icmp", None, "14", "10m");

    // Exactly these flows pass, with their replies...
    assert!(tcp_ok(p1, tcp.addr), "allowed TCP flow");
    assert!(tcp_ok(p1, tcp6.addr), "allowed TCP flow over IPv6");
    assert!(udp_ok(p1, udp.addr), "allowed UDP flow and its reply");
    assert!(ping_ok(p1, ip4(addr::EXT_V4)), "allowed ICMP echo and its reply");
    // ...and nothing else: another host, another port, another protocol, the
    // other direction.
    assert!(!tcp_ok(p2, tcp.addr), "another patient host");
    assert!(!udp_ok(p2, udp.addr), "another patient host, UDP");
    assert!(!tcp_ok(p1, other_tcp.addr), "another port");
    assert!(!ping_ok(p1, ip6(addr::EXT_V6)), "ICMPv6 has no entry");
    assert!(!ping_ok(ext, ip4(addr::P1_V4)), "the far side may not start ICMP");
    let p1_srv = TcpServer::start(p1, ip4(addr::P1_V4));
    assert!(!tcp_ok(ext, p1_srv.addr), "the far side may not open TCP");

    let flows = flows_json(&lab);
    let rule = |id: u64| flows.iter().find(|f| f["rule_id"] == id).expect("entry listed");
    for id in [11, 12, 13, 14] {
        let f = rule(id);
        assert!(f["packets"].as_u64() > Some(0), "forward counter of rule {id}: {f}");
        assert!(f["reply_packets"].as_u64() > Some(0), "reply counter of rule {id}: {f}");
        assert_eq!(f["state"], "live");
    }
    let s = stats(&lab);
    assert!(s.packets("pass_flow") > 0 && s.packets("pass_reply") > 0, "{}", s.summary());
    assert!(s.packets("drop_no_flow") > 0, "{}", s.summary());

    // Removing the entry closes it again.
    lab.agent()
        .cli(&[
            "flow", "remove", "--src", &p1s, "--dst", &ext4, "--proto", "tcp", "--dport", &tport,
        ])
        .expect("remove");
    assert!(!tcp_ok(p1, tcp.addr), "closed after removal");
}

#[test]
fn expiry_is_enforced_by_the_kernel_with_the_agent_stopped() {
    let mut lab = lab();
    let (p1s, ext4) = (addr::P1_V4.to_string(), addr::EXT_V4.to_string());
    let udp = UdpEcho::start(lab.topology().external(), ip4(addr::EXT_V4));
    let port = udp.addr.port().to_string();
    allow(&lab, &p1s, &ext4, "udp", Some(&port), "21", "6s");
    let added = Instant::now();
    assert!(udp_ok(lab.topology().p1(), udp.addr), "passes while live");

    lab.agent_mut().stop().expect("stop the agent");
    assert!(udp_ok(lab.topology().p1(), udp.addr), "still passes with the agent stopped (pinned)");
    let expiry = Duration::from_secs(6) + Duration::from_millis(100);
    if let Some(left) = expiry.checked_sub(added.elapsed()) {
        thread::sleep(left);
    }
    let before = stats(&lab).packets("drop_expired");
    assert!(!udp_ok(lab.topology().p1(), udp.addr), "dropped after expiry, agent still stopped");
    let s = stats(&lab);
    assert!(s.packets("drop_expired") > before, "counted as expired: {}", s.summary());
    assert_eq!(flows_json(&lab)[0]["state"], "expired");
}

#[test]
fn sigkill_during_traffic_lets_nothing_through_and_restart_keeps_enforcing() {
    let mut lab = lab();
    let (p1s, ext4) = (addr::P1_V4.to_string(), addr::EXT_V4.to_string());
    let allowed = UdpEcho::start(lab.topology().external(), ip4(addr::EXT_V4));
    let denied = UdpEcho::start(lab.topology().external(), ip4(addr::EXT_V4));
    let port = allowed.addr.port().to_string();
    allow(&lab, &p1s, &ext4, "udp", Some(&port), "31", "10m");

    // A steady stream to both ports from the patient host.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (flag, count, to_ok, to_bad) = (stop.clone(), sent.clone(), allowed.addr, denied.addr);
    let sender = lab
        .topology()
        .p1()
        .spawn(move || -> std::io::Result<()> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            while !flag.load(Ordering::Relaxed) {
                for _ in 0..50 {
                    let _ = s.send_to(b"x", to_ok);
                    let _ = s.send_to(b"y", to_bad);
                    count.fetch_add(1, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        })
        .expect("sender");
    thread::sleep(Duration::from_millis(500));
    lab.agent_mut().kill(Signal::Kill).expect("SIGKILL");
    lab.agent_mut().wait(Duration::from_secs(5)).expect("agent died");
    let at_kill = allowed.received();
    thread::sleep(Duration::from_millis(700));
    let after_kill = allowed.received();
    lab.agent_mut().restart().expect("restart");
    let at_restart = allowed.received();
    thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    sender.join().expect("sender thread").expect("namespace").expect("sender socket");
    thread::sleep(Duration::from_millis(100));

    assert!(sent.load(Ordering::Relaxed) > 1_000, "the stream ran");
    assert_eq!(denied.received(), 0, "no packet of the denied flow crossed, ever");
    assert!(after_kill > at_kill, "the allowed flow kept passing while the agent was dead");
    assert!(allowed.received() > at_restart, "and after the restart");
    assert!(
        lab.agent().log().contains("attachment=Replaced"),
        "the restart swapped the program atomically: {}",
        lab.agent().log_tail(20)
    );
    assert!(!ping_ok(lab.topology().p1(), ip4(addr::EXT_V4)), "still default deny");
}

/// Crafted frames the parser does not handle, sent with scapy from a patient
/// host: every one dropped and counted under its reason.
#[test]
fn odd_packets_are_dropped_and_counted_by_reason() {
    const COUNT: u64 = 5;
    let lab = lab();
    let t = lab.topology();
    let mac = |ns: &NetNs, ifname: &str| {
        ns.exec("cat", &[&format!("/sys/class/net/{ifname}/address")])
            .expect("read MAC")
            .trim()
            .to_owned()
    };
    let (p1_mac, app_mac) = (mac(t.p1(), "eth0"), mac(t.appliance(), "patient0"));
    let before = stats(&lab);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scapy/odd_packets.py");
    let out = t
        .p1()
        .exec(
            "/usr/bin/python3",
            &[
                script,
                "eth0",
                &p1_mac,
                &app_mac,
                &addr::P1_V4.to_string(),
                &addr::EXT_V4.to_string(),
                &addr::P1_V6.to_string(),
                &addr::EXT_V6.to_string(),
                "10.77.0.99",
                &COUNT.to_string(),
            ],
        )
        .expect("scapy sender");
    let expected: std::collections::BTreeMap<String, String> =
        serde_json::from_str(out.trim()).expect("scapy output");
    assert!(expected.len() >= 12, "{expected:?}");
    let mut per_reason = std::collections::BTreeMap::<&str, u64>::new();
    for reason in expected.values() {
        *per_reason.entry(reason.as_str()).or_default() += COUNT;
    }
    // Counters are read after the kernel processed the frames.
    thread::sleep(Duration::from_millis(300));
    let after = stats(&lab);
    for (reason, n) in per_reason {
        let got = after.packets(reason) - before.packets(reason);
        assert!(got >= n, "{reason}: {got} counted, {n} sent; {}", after.summary());
    }
    assert_eq!(after.packets("pass_flow") + after.packets("pass_reply"), 0, "{}", after.summary());
}

/// Sends `count` copies of a scapy frame expression from `ns`'s eth0 to the
/// MAC of `peer_if` in `peer`.
fn scapy_send(ns: &NetNs, peer: &NetNs, peer_if: &str, frame: &str, count: u32) {
    let mac = |ns: &NetNs, ifname: &str| {
        ns.exec("cat", &[&format!("/sys/class/net/{ifname}/address")])
            .expect("MAC")
            .trim()
            .to_owned()
    };
    let (src, dst) = (mac(ns, "eth0"), mac(peer, peer_if));
    let code = format!(
        "from scapy.all import *\nconf.verb=0\n\
         sendp(Ether(src='{src}', dst='{dst}')/{frame}, iface='eth0', count={count})\n"
    );
    ns.exec("/usr/bin/python3", &["-c", &code]).expect("scapy");
}

#[test]
fn reply_rules_are_enforced_in_the_kernel() {
    let lab = lab();
    let t = lab.topology();
    let (p1s, ext4) = (addr::P1_V4.to_string(), addr::EXT_V4.to_string());
    allow(&lab, &p1s, &ext4, "tcp", Some("443"), "41", "10m");
    let before = stats(&lab);
    let ip = |s: &str, d: &str| format!("IP(src='{s}', dst='{d}')");
    // The service may not open connections back, nor reach privileged ports.
    scapy_send(
        t.external(),
        t.appliance(),
        "uplink0",
        &format!("{}/TCP(sport=443, dport=40000, flags='S')", ip(&ext4, &p1s)),
        3,
    );
    scapy_send(
        t.external(),
        t.appliance(),
        "uplink0",
        &format!("{}/TCP(sport=443, dport=22, flags='A')", ip(&ext4, &p1s)),
        3,
    );
    // The forward direction arriving on the uplink is spoofed.
    scapy_send(
        t.external(),
        t.appliance(),
        "uplink0",
        &format!("{}/TCP(sport=40000, dport=443, flags='S')", ip(&p1s, &ext4)),
        3,
    );
    // A proper reply passes.
    scapy_send(
        t.external(),
        t.appliance(),
        "uplink0",
        &format!("{}/TCP(sport=443, dport=40000, flags='SA')", ip(&ext4, &p1s)),
        3,
    );
    thread::sleep(Duration::from_millis(300));
    let after = stats(&lab);
    let d = |r: &str| after.packets(r) - before.packets(r);
    assert_eq!(d("drop_reply_syn"), 3, "{}", after.summary());
    assert_eq!(d("drop_reply_port"), 3, "{}", after.summary());
    assert_eq!(d("drop_wrong_port"), 3, "{}", after.summary());
    assert_eq!(d("pass_reply"), 3, "{}", after.summary());
}

#[test]
fn drop_events_reach_the_log_and_a_flood_is_rate_limited() {
    let lab = lab();
    let t = lab.topology();
    let to = SocketAddr::new(ip4(addr::EXT_V4), 9);
    t.p1()
        .run(move || -> std::io::Result<()> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            for _ in 0..5_000 {
                let _ = s.send_to(b"flood", to);
            }
            Ok(())
        })
        .expect("enter namespace")
        .expect("flood");
    // The agent drains the ring buffer as events arrive.
    let deadline = Instant::now() + OPEN;
    while !lab.agent().log().contains("reason=\"drop_no_flow\"") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    let log = lab.agent().log();
    let line =
        log.lines().find(|l| l.contains("reason=\"drop_no_flow\"")).expect("a drop event logged");
    assert!(line.contains("dst=Some(10.78.0.100)") && line.contains("dport=9"), "{line}");
    let s = stats(&lab);
    assert!(s.packets("drop_no_flow") >= 5_000, "{}", s.summary());
    assert!(s.packets("events_sent") > 0, "{}", s.summary());
    // 200 events per CPU per second: most of a 5,000-packet burst is only counted.
    assert!(s.packets("events_suppressed") >= 4_000, "{}", s.summary());
}

#[test]
fn an_unguarded_interface_turns_forwarding_off_until_it_is_gone() {
    let lab = lab();
    let app = lab.topology().appliance();
    assert_eq!(app.read_sysctl("net.ipv4.ip_forward").expect("sysctl"), "1");
    app.ip(&["link", "add", "sneaky0", "type", "veth", "peer", "name", "sneaky1"])
        .expect("add interface");
    let wait_for = |want: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while app.read_sysctl("net.ipv4.ip_forward").expect("sysctl") != want {
            assert!(
                Instant::now() < deadline,
                "forwarding never became {want}: {}",
                lab.agent().log_tail(10)
            );
            thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for("0");
    assert!(lab.agent().log().contains("boundary degraded"), "{}", lab.agent().log_tail(10));
    app.ip(&["link", "del", "sneaky0"]).expect("remove interface");
    wait_for("1");
    assert!(lab.agent().log().contains("boundary restored"), "{}", lab.agent().log_tail(10));
    assert!(!ping_ok(lab.topology().p1(), ip4(addr::EXT_V4)), "still default deny");
}

#[test]
fn detach_outside_the_appliance_namespace_is_refused() {
    let lab = lab();
    let r = lab.agent().record();
    let out = std::process::Command::new(&r.bin)
        .args(["--config", &r.config.to_string_lossy(), "detach"])
        .output()
        .expect("run the agent binary in the host namespace");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("appliance's network namespace"));
    assert!(r.pin_dir.exists(), "pins untouched");
    assert!(
        !tcp_ok(lab.topology().p1(), SocketAddr::new(ip4(addr::EXT_V4), 80)),
        "still enforcing"
    );
    assert_eq!(lab.topology().appliance().read_sysctl("net.ipv4.ip_forward").expect("sysctl"), "1");
}

/// The packets counted by the nftables rule in `app` whose comment is `comment`.
fn nft_rule_packets(app: &NetNs, comment: &str) -> u64 {
    let t = app.exec("nft", &["list", "table", "inet", "airlock"]).expect("nft table");
    t.lines()
        .find(|l| l.contains(comment))
        .and_then(|l| l.split("packets ").nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no rule {comment:?} in {t}"))
}

/// UDP datagrams from `from` to `to` (nothing is expected back).
fn udp_send(from: &NetNs, to: SocketAddr, n: usize) {
    from.run(move || -> std::io::Result<()> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        for _ in 0..n {
            s.send_to(b"across", to)?;
        }
        Ok(())
    })
    .expect("enter namespace")
    .expect("send");
}

/// True once the agent reports its controller stream connected (over mgmt0).
fn stream_connected(lab: &Lab) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let out = lab.agent().cli(&["controller", "status", "--json"]).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        if v["stream_connected"] == true {
            return true;
        }
        thread::sleep(Duration::from_millis(200));
    }
    false
}

#[test]
fn the_management_port_carries_only_the_agents_own_connection() {
    // Returns once the controller reports the appliance's bundle applied: the
    // agent enrolled and streamed it over mgmt0, a port with role management.
    let prefix = unique_prefix();
    let mut lab =
        Lab::start_with(LabOptions::with_controller(&prefix)).expect("lab with its controller");
    let (p1, ctl, app) = {
        let t = lab.topology();
        let ctl = t.controller().expect("controller namespace").name().to_owned();
        (t.p1().name().to_owned(), ctl, t.appliance().name().to_owned())
    };
    let ns = |n: &str| NetNs::existing(n);
    let link = ns(&app).exec("ip", &["link", "show", "mgmt0"]).expect("ip link");
    assert!(link.contains("xdp"), "mgmt0 is guarded: {link}");
    assert!(stream_connected(&lab), "the agent reaches its controller over mgmt0");
    let own = flows_json(&lab);
    assert!(
        own.iter().any(|f| f["ingress"] == "management"
            && f["dst"] == addr::CONTROLLER_V4.to_string()
            && f["src"] == addr::APPLIANCE_MGMT_V4.to_string()),
        "the agent's own entry is a management entry: {own:?}"
    );

    // The controller's network routes to the patient side through the
    // appliance, and an eBPF entry would allow the controller to p1 if
    // mgmt0 were a boundary port.
    ns(&ctl)
        .exec("ip", &["route", "add", "10.77.0.0/24", "via", &addr::APPLIANCE_MGMT_V4.to_string()])
        .expect("route");
    let on_p1 = UdpEcho::start(&ns(&p1), ip4(addr::P1_V4));
    let on_ctl = UdpEcho::start(&ns(&ctl), ip4(addr::CONTROLLER_V4));
    let p1_port = on_p1.addr.port().to_string();
    let ctl_ip = addr::CONTROLLER_V4.to_string();
    let ctl_port = on_ctl.addr.port().to_string();
    allow(&lab, &ctl_ip, "10.77.0.11", "udp", Some(&p1_port), "9", "10m");
    // ... and one would allow p1 to the controller: its packets pass XDP on
    // patient0 but may not leave through mgmt0 (the tc egress guard).
    allow(&lab, "10.77.0.11", &ctl_ip, "udp", Some(&ctl_port), "8", "10m");
    let guarded = || {
        ns(&app)
            .exec("tc", &["filter", "show", "dev", "mgmt0", "egress"])
            .is_ok_and(|f| f.contains("airlock_management_egress"))
    };
    assert!(guarded(), "egress guarded");
    // A guard that goes away is noticed by the health check: forwarding off,
    // the boundary installed again (guard back), forwarding on.
    ns(&app).exec("tc", &["qdisc", "del", "dev", "mgmt0", "clsact"]).expect("remove the guard");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(guarded() && lab.agent().log().contains("boundary restored")) {
        assert!(Instant::now() < deadline, "guard not restored: {}", lab.agent().log_tail(20));
        thread::sleep(Duration::from_millis(200));
    }
    assert!(lab.agent().log().contains("egress guard missing"), "{}", lab.agent().log_tail(20));
    assert_eq!(ns(&app).read_sysctl("net.ipv4.ip_forward").expect("sysctl"), "1");
    let across = |what: &str| {
        udp_send(&ns(&ctl), on_p1.addr, 20);
        udp_send(&ns(&p1), on_ctl.addr, 20);
        thread::sleep(SHUT);
        assert_eq!(on_p1.received(), 0, "{what}: nothing from the controller reaches p1");
        assert_eq!(on_ctl.received(), 0, "{what}: nothing from p1 reaches the controller");
    };
    across("both layers");

    // eBPF alone: the nftables table is gone.
    let before = stats(&lab);
    ns(&app).exec("nft", &["delete", "table", "inet", "airlock"]).expect("delete table");
    across("eBPF alone");
    let after = stats(&lab);
    assert!(
        after.packets("drop_no_flow") >= before.packets("drop_no_flow") + 20,
        "the controller's packets dropped by XDP on mgmt0: {}",
        after.summary()
    );
    assert!(
        after.packets("drop_wrong_port") >= before.packets("drop_wrong_port") + 20,
        "p1's packets, allowed on patient0, dropped leaving through mgmt0: {}",
        after.summary()
    );

    // nftables alone: a restart applies the last-known-good bundle (the
    // table is back), the agent reaches its controller again; then it stops
    // and the XDP programs are unpinned.
    lab.agent_mut().restart().expect("restart");
    assert!(stream_connected(&lab), "the agent reaches its controller again");
    lab.agent_mut().stop().expect("stop");
    assert_eq!(lab.agent().unpin_links().expect("unpin"), 3, "one link per port");
    let link = ns(&app).exec("ip", &["link", "show", "mgmt0"]).expect("ip link");
    assert!(!link.contains("xdp"), "no XDP program left: {link}");
    ns(&app).exec("tc", &["qdisc", "del", "dev", "mgmt0", "clsact"]).expect("remove the tc guard");
    across("nftables alone");
    let app_ns = ns(&app);
    assert!(
        nft_rule_packets(&app_ns, airlock_policy_guard::IN) >= 20,
        "forwarding from the management port refused"
    );
    assert!(
        nft_rule_packets(&app_ns, airlock_policy_guard::OUT) >= 20,
        "forwarding to the management port refused"
    );
}

/// The nftables guard chain's rule comments (as `airlock_policy::nft` renders them).
mod airlock_policy_guard {
    pub const IN: &str = "enters through no boundary port";
    pub const OUT: &str = "leaves through no boundary port";
}
