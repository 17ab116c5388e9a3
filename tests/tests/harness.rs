//! The lab harness itself (root; no agent): the topology is wired as
//! documented, is closed before any agent runs, and leaves nothing behind.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use airlock_testbed::{addr, names, unique_prefix, LabState, NetNs, Node, Topology};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// For connections that must fail (the packets are silently dropped).
const BLOCKED_TIMEOUT: Duration = Duration::from_millis(700);

/// Listens in `ns` on `ip` (port chosen by the kernel).
fn listen(ns: &NetNs, ip: IpAddr) -> TcpListener {
    ns.run(move || TcpListener::bind(SocketAddr::new(ip, 0)))
        .expect("enter namespace")
        .expect("bind")
}

/// Connects from `ns`, sends a line, returns the reply.
fn ping_pong(ns: &NetNs, to: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&to, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"ping\n")?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(reply)
    })
    .expect("enter namespace")
}

/// Accepts one connection, answers "pong" to whatever comes.
fn serve_once(listener: TcpListener) -> std::thread::JoinHandle<std::io::Result<SocketAddr>> {
    std::thread::spawn(move || {
        let (mut s, peer) = listener.accept()?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf)?;
        s.write_all(b"pong\n")?;
        Ok(peer)
    })
}

#[test]
fn topology_is_wired_closed_and_cleaned_up() {
    let prefix = unique_prefix();
    let topo = Topology::build(&prefix).expect("build topology");

    // Fail closed: no forwarding on the appliance before an agent enforces.
    let app = topo.appliance();
    assert_eq!(app.read_sysctl("net.ipv4.ip_forward").expect("sysctl"), "0");
    assert_eq!(app.read_sysctl("net.ipv6.conf.all.forwarding").expect("sysctl"), "0");

    // p1 reaches the appliance's patient address, IPv4 and IPv6.
    for ip in [IpAddr::V4(addr::APPLIANCE_PATIENT_V4), IpAddr::V6(addr::APPLIANCE_PATIENT_V6)] {
        let listener = listen(app, ip);
        let to = listener.local_addr().expect("local addr");
        let server = serve_once(listener);
        let reply =
            ping_pong(topo.p1(), to, CONNECT_TIMEOUT).unwrap_or_else(|e| panic!("p1 -> {to}: {e}"));
        assert_eq!(reply, "pong\n");
        let peer = server.join().expect("server thread").expect("accept");
        let p1_ip: IpAddr = if ip.is_ipv4() { addr::P1_V4.into() } else { addr::P1_V6.into() };
        assert_eq!(peer.ip(), p1_ip);
    }

    // p2 too (the switch bridges both hosts), and ext reaches the uplink side.
    let listener = listen(app, addr::APPLIANCE_PATIENT_V4.into());
    let to = listener.local_addr().expect("local addr");
    let server = serve_once(listener);
    assert_eq!(ping_pong(topo.p2(), to, CONNECT_TIMEOUT).expect("p2 -> appliance"), "pong\n");
    server.join().expect("server thread").expect("accept");
    let listener = listen(app, addr::APPLIANCE_UPLINK_V6.into());
    let to = listener.local_addr().expect("local addr");
    let server = serve_once(listener);
    assert_eq!(
        ping_pong(topo.external(), to, CONNECT_TIMEOUT).expect("ext -> appliance"),
        "pong\n"
    );
    server.join().expect("server thread").expect("accept");

    // p1 cannot reach ext through the appliance: forwarding is off.
    for ip in [IpAddr::V4(addr::EXT_V4), IpAddr::V6(addr::EXT_V6)] {
        let listener = listen(topo.external(), ip);
        listener.set_nonblocking(true).expect("nonblocking");
        let to = listener.local_addr().expect("local addr");
        let result = ping_pong(topo.p1(), to, BLOCKED_TIMEOUT);
        assert!(result.is_err(), "p1 reached ext at {to} with forwarding off: {result:?}");
        assert!(listener.accept().is_err(), "ext accepted a connection from the patient side");
    }

    // Status sees the whole lab.
    let status = topo.status();
    assert_eq!(status.state, LabState::Running);
    assert_eq!(status.lab, prefix);
    let app_status = status
        .namespaces
        .iter()
        .find(|n| n.name == Node::Appliance.namespace(&prefix))
        .expect("appliance in status");
    let names_up: Vec<(&str, bool)> =
        app_status.interfaces.iter().map(|i| (i.name.as_str(), i.up)).collect();
    assert_eq!(names_up, [("patient0", true), ("uplink0", true)]);
    assert_eq!(app_status.interfaces[0].ipv4, ["10.77.0.1/24"]);
    assert_eq!(app_status.interfaces[1].ipv6, ["fd00:a1:78::1/64"]);
    assert!(status.agent.is_none());

    // A second lab with the same prefix is refused while this one exists.
    assert!(Topology::build(&prefix).is_err());

    drop(topo);
    assert_eq!(names::lab_namespaces(&prefix), Vec::<String>::new());
    assert_eq!(airlock_testbed::LabStatus::probe(&prefix, None).state, LabState::Down);
}

#[test]
fn netns_guard_runs_code_inside_and_cleans_up() {
    let ns = NetNs::unique().expect("create namespace");
    let name = ns.name().to_owned();
    assert!(ns.path().exists());
    // Only loopback in a fresh namespace, and it is up.
    let links = ns.exec("ip", &["-o", "link", "show"]).expect("ip link");
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains("lo:") && links.contains("UP"), "{links}");
    let port = ns
        .run(|| TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()))
        .expect("enter")
        .expect("bind")
        .port();
    assert!(port > 0);
    let err = ns.exec("sh", &["-c", "echo nope >&2; exit 4"]).expect_err("must fail");
    assert!(err.to_string().contains("nope"), "{err}");

    // A panic inside run() reaches the caller; the guard still cleans up.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let inner = NetNs::unique().expect("create namespace");
        let inner_name = inner.name().to_owned();
        let _ = inner.run(|| panic!("boom in {inner_name}"));
    }));
    assert!(result.is_err());
    drop(ns);
    assert!(!names::namespace_exists(&name));
}

#[test]
fn destroy_by_prefix_removes_leftovers() {
    let prefix = unique_prefix();
    let topo = Topology::build(&prefix).expect("build topology");
    let kept = topo.into_detached();
    assert_eq!(names::lab_namespaces(&kept).len(), 5);
    let removed = Topology::destroy_by_prefix(&kept).expect("destroy");
    assert_eq!(removed.len(), 5);
    assert!(names::lab_namespaces(&kept).is_empty());
    // Idempotent.
    assert!(Topology::destroy_by_prefix(&kept).expect("destroy again").is_empty());
}

#[test]
fn lab_agent_is_driven_and_cleaned_up() {
    let prefix = unique_prefix();
    // The eBPF layer alone: the flow below is added by hand (eBPF only).
    let opts = airlock_testbed::LabOptions {
        config: airlock_testbed::AgentConfig::for_lab(&prefix).ebpf_only(),
        ..airlock_testbed::LabOptions::new(&prefix)
    };
    let mut lab = airlock_testbed::Lab::start_with(opts).expect("start lab (agent built?)");
    let topo = lab.topology();
    let record = lab.agent().record().clone();

    // Enforcing: forwarding is on, the boundary is pinned, nothing is allowed.
    assert_eq!(topo.appliance().read_sysctl("net.ipv4.ip_forward").expect("sysctl"), "1");
    assert!(record.pin_dir.exists());
    let status = lab.status();
    assert_eq!(status.state, LabState::Running);
    assert!(status.agent.as_ref().is_some_and(|a| a.alive && a.pinned));

    let listener = listen(topo.external(), addr::EXT_V4.into());
    let to = listener.local_addr().expect("local addr");
    assert!(ping_pong(topo.p1(), to, BLOCKED_TIMEOUT).is_err(), "passed without a flow");
    assert!(lab.agent().stats().expect("stats").packets("drop_no_flow") > 0);

    // One exact flow through the CLI opens exactly that.
    let port = to.port().to_string();
    let flow = ["--src", "10.77.0.11", "--dst", "10.78.0.100", "--proto", "tcp", "--dport", &port];
    let mut add = vec!["flow", "add"];
    add.extend(flow);
    add.extend(["--rule-id", "7", "--ttl", "5m"]);
    lab.agent().cli(&add).expect("flow add");
    let server = serve_once(listener);
    assert_eq!(ping_pong(topo.p1(), to, CONNECT_TIMEOUT).expect("p1 -> ext with a flow"), "pong\n");
    server.join().expect("server thread").expect("accept");
    let stats = lab.agent().stats().expect("stats");
    assert_eq!(stats.flows, 1);
    assert!(stats.packets("pass_flow") > 0, "{}", stats.summary());
    let bad = lab.agent().cli(&["flow", "add", "--src", "nonsense"]).expect_err("bad input");
    assert!(matches!(bad, airlock_testbed::Error::Command { .. }), "{bad}");

    // Restart keeps the flows; a killed agent shows in the status.
    lab.agent_mut().restart().expect("restart");
    assert_eq!(lab.agent().stats().expect("stats").flows, 1);
    lab.agent_mut().kill(airlock_testbed::Signal::Kill).expect("kill");
    lab.agent_mut().wait(Duration::from_secs(5)).expect("exits");
    assert!(!lab.agent_mut().is_running());
    let status = lab.status();
    assert_eq!(status.state, LabState::Degraded);
    assert!(status.agent.as_ref().is_some_and(|a| !a.alive && a.pinned));

    drop(lab);
    assert!(names::lab_namespaces(&prefix).is_empty());
    assert!(!record.pin_dir.exists(), "pins left behind");
    assert!(!record.state_dir.exists(), "state dir left behind");
}

#[test]
fn agent_start_failure_shows_the_log() {
    let ns = NetNs::unique().expect("create namespace");
    let prefix = unique_prefix();
    let dir = std::env::temp_dir().join(format!("airlock-testbed-{prefix}"));
    // A stand-in that rejects the agent's arguments on stderr and exits.
    let mut opts = airlock_testbed::AgentOptions::new(ns.name(), &dir, &prefix);
    opts.bin = Some("/usr/bin/env".into());
    let err = airlock_testbed::Agent::start(opts).expect_err("a fake agent must not start");
    let msg = err.to_string();
    assert!(matches!(err, airlock_testbed::Error::AgentExited { .. }), "{msg}");
    assert!(msg.contains("--config"), "log tail missing: {msg}");
    assert!(!dir.exists(), "state dir left behind");

    let mut opts = airlock_testbed::AgentOptions::new(ns.name(), &dir, &prefix);
    opts.bin = Some(dir.join("no-such-agent"));
    let err = airlock_testbed::Agent::start(opts).expect_err("missing binary");
    assert!(matches!(err, airlock_testbed::Error::AgentBinaryMissing { .. }), "{err}");
}

#[test]
fn controller_topology_adds_the_management_network_only() {
    let prefix = unique_prefix();
    let opts = airlock_testbed::TopologyOptions { controller: true, host_link: false };
    let topo = Topology::build_with(&prefix, opts).expect("build topology with a controller");
    let ctl = topo.controller().expect("controller namespace");
    assert_eq!(ctl.name(), Node::Controller.namespace(&prefix));
    assert_eq!(names::lab_namespaces(&prefix).len(), 6);

    // The controller reaches the appliance's management address (both
    // families), and nothing beyond it: it has no route.
    let app = topo.appliance();
    for ip in [IpAddr::V4(addr::APPLIANCE_MGMT_V4), IpAddr::V6(addr::APPLIANCE_MGMT_V6)] {
        let listener = listen(app, ip);
        let to = listener.local_addr().expect("local addr");
        let server = serve_once(listener);
        assert_eq!(ping_pong(ctl, to, CONNECT_TIMEOUT).expect("ctl -> appliance"), "pong\n");
        let peer = server.join().expect("server thread").expect("accept");
        assert!(peer.ip() == IpAddr::from(addr::CONTROLLER_V4) || peer.ip() == addr::CONTROLLER_V6);
    }
    let to = SocketAddr::new(addr::P1_V4.into(), 443);
    let err = ping_pong(ctl, to, BLOCKED_TIMEOUT).expect_err("no route to the patient side");
    assert_eq!(err.kind(), std::io::ErrorKind::NetworkUnreachable, "{err}");
    assert_eq!(app.read_sysctl("net.ipv4.ip_forward").expect("sysctl"), "0");

    let status = topo.status();
    assert_eq!(status.state, LabState::Running);
    let last = status.namespaces.last().expect("namespaces");
    assert_eq!((last.name.as_str(), last.role), (ctl.name(), airlock_testbed::Role::Controller));
    let app_status = status.namespaces.iter().find(|n| n.name == app.name()).expect("appliance");
    let ifs: Vec<&str> = app_status.interfaces.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(ifs, ["mgmt0", "patient0", "uplink0"]);

    // The agent accepts the configuration the lab writes for a managed appliance.
    let dir = std::env::temp_dir().join(format!("airlock-testbed-{prefix}-cfg"));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let config = airlock_testbed::AgentConfig::for_lab(&prefix).with_controller(
        airlock_testbed::ControllerSection {
            url: "https://10.90.0.100:8443".into(),
            ca_fingerprint: format!("sha256:{}", "ab".repeat(32)),
            enrollment_token_file: Some(dir.join("enrollment-token")),
            report_interval_secs: 2,
        },
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, config.render()).expect("write config");
    let bin = airlock_testbed::agent_bin().expect("agent binary");
    let out = std::process::Command::new(bin)
        .args(["--config", &path.to_string_lossy(), "config", "check"])
        .output()
        .expect("run the agent");
    std::fs::remove_dir_all(&dir).expect("rm");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let kept = topo.into_detached();
    assert_eq!(Topology::destroy_by_prefix(&kept).expect("destroy").len(), 6);
    assert!(names::lab_namespaces(&kept).is_empty());
}
