//! End to end, as root: the lab with its controller. The real
//! `airlock-controller` runs in the lab's controller namespace, the real
//! agent enrolls with it by itself over the management port, streams its
//! signed bundle over mTLS and enforces it on both layers; the tests change,
//! cut and restore that link and check what crosses the boundary.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use airlock_testbed::{
    addr, is_applied, unique_prefix, ApplianceView, Lab, LabOptions, LabState, NetNs, Node, Signal,
    LAB_APPLIANCE,
};

const LAB_POLICY: &str = include_str!("../../policies/lab.toml");
/// Generous: convergence includes reconnect backoff (up to 2^n s, jittered).
const CONVERGE: Duration = Duration::from_secs(120);

fn lab() -> Lab {
    Lab::start_with(LabOptions::with_controller(&unique_prefix()))
        .expect("lab with a controller and an enrolled agent")
}

/// lab.toml without its flow: nothing allowed.
fn closed_policy() -> String {
    let end = LAB_POLICY.find("[[flow]]").expect("lab.toml has a flow");
    LAB_POLICY[..end].to_owned()
}

/// A TCP service in `ns` on `ip`:`port` answering "pong" until the process ends.
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

/// True when a TCP exchange from `ns` to `to` completes.
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

/// The lab service of policies/lab.toml (tcp/443 on the external host), IPv4 and IPv6.
fn lab_service(lab: &Lab) -> (SocketAddr, SocketAddr) {
    let ext = lab.topology().external();
    (serve(ext, IpAddr::V4(addr::EXT_V4), 443), serve(ext, IpAddr::V6(addr::EXT_V6), 443))
}

/// The policy's verdicts: p1 reaches the service over both families, p2 does not.
fn assert_lab_policy_enforced(lab: &Lab, svc: (SocketAddr, SocketAddr), when: &str) {
    let t = lab.topology();
    assert!(tcp_ok(t.p1(), svc.0), "{when}: p1 (imaging) reaches the service");
    assert!(tcp_ok(t.p1(), svc.1), "{when}: p1 reaches the service over IPv6");
    assert!(!tcp_ok(t.p2(), svc.0), "{when}: p2 is not in the policy");
    assert!(!tcp_ok(t.p2(), svc.1), "{when}: p2 is not in the policy (IPv6)");
}

/// Waits until `done()` holds.
fn wait_until(what: &str, timeout: Duration, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "{what}: not after {timeout:?}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `log()` contains `needle`.
fn wait_log(what: &str, log: impl Fn() -> String, needle: &str) {
    wait_until(&format!("{what} logs {needle:?}"), CONVERGE, || log().contains(needle));
}

fn applied(lab: &Lab) -> ApplianceView {
    let mut api = lab.api().expect("log in");
    api.wait_applied(LAB_APPLIANCE, CONVERGE).expect("the appliance applies its bundle")
}

#[test]
fn the_lab_appliance_enrolls_and_enforces_the_controllers_policy() {
    let lab = lab();
    let view = applied(&lab);
    assert!(view.connected, "on the bundle stream: {view:?}");
    assert!(view.enrolled_at.is_some() && view.cert_expires_at.is_some(), "{view:?}");
    assert_eq!(view.refused, None);

    // The token was used and deleted; the agent holds its own identity.
    let state = &lab.agent().record().state_dir;
    assert!(!state.join("enrollment-token").exists(), "the used token file is deleted");
    assert!(lab.agent().log().contains("enrolled"), "{}", lab.agent().log_tail(20));

    let svc = lab_service(&lab);
    assert_lab_policy_enforced(&lab, svc, "enrolled");

    // What the dashboard shows of the appliance: its ports with their roles,
    // the drop of p2's disallowed connection with its cause, and the
    // WireGuard public key the appliance generated for itself.
    let mut api = lab.api().expect("log in");
    let p2 = addr::P2_V4.to_string();
    let seen = api
        .wait_for(LAB_APPLIANCE, "a report with p2's drop", CONVERGE, |v| {
            v.health.as_ref().is_some_and(|h| {
                h.recent_drops.iter().any(|d| d.src.as_deref() == Some(p2.as_str()))
            })
        })
        .expect("the drop reaches the controller");
    let health = seen.health.as_ref().expect("health");
    let ports: Vec<(&str, &str)> =
        health.ports.iter().map(|p| (p.name.as_str(), p.role.as_str())).collect();
    assert!(ports.contains(&("patient0", "patient")), "{ports:?}");
    assert!(ports.contains(&("uplink0", "uplink")), "{ports:?}");
    assert!(
        health.ports.iter().all(|p| p.attached && p.xdp_mode != "detached"),
        "{:?}",
        health.ports
    );
    let drop = health
        .recent_drops
        .iter()
        .find(|d| d.src.as_deref() == Some(p2.as_str()))
        .expect("p2's drop");
    assert_eq!(drop.cause, "default deny", "{drop:?}");
    assert_eq!(
        (drop.reason.as_str(), drop.port.as_str()),
        ("drop_no_flow", "patient0"),
        "{drop:?}"
    );
    assert_eq!((drop.proto, drop.dport), (6, 443), "{drop:?}");
    assert_eq!(drop.dst.as_deref(), Some(addr::EXT_V4.to_string().as_str()), "{drop:?}");
    let key = seen.wireguard_public_key.as_deref().expect("a WireGuard public key");
    assert_eq!(key.len(), 44, "{key}");
    assert!(base64_32(key), "{key} is base64 of 32 bytes");
    let key_file = state.join("store/wireguard.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_file).expect("the private key file").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let private = std::fs::read_to_string(&key_file).expect("key");
    assert!(!lab.agent().log().contains(private.trim()), "the private key is never logged");

    // The controller sits behind the boundary like everything else: neither
    // side's hosts reach it (only the appliance's own connection does).
    let t = lab.topology();
    let ctl = SocketAddr::from((addr::CONTROLLER_V4, addr::CONTROLLER_PORT));
    let ctl_ns = t.controller().expect("controller namespace");
    assert!(tcp_reachable(ctl_ns, ctl), "the controller listens");
    assert!(!tcp_reachable(t.p1(), ctl), "a patient host cannot reach the controller");
    assert!(!tcp_reachable(t.external(), ctl), "the uplink side cannot reach the controller");

    let status = lab.status();
    assert_eq!(status.state, LabState::Running);
    let names: Vec<&str> = status.namespaces.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names.len(), 6);
    assert_eq!(names[5], Node::Controller.namespace(&status.lab));
    let c = status.controller.expect("controller section");
    assert!(c.alive);
    assert_eq!(c.url, "https://10.90.0.100:8443");
    assert_eq!(c.agent_url, "https://10.90.0.100:8444");
    assert!(c.ca_fingerprint.starts_with("sha256:"), "{}", c.ca_fingerprint);
    let app = status.namespaces.iter().find(|n| n.name.ends_with("-app")).expect("appliance");
    let ifs: Vec<&str> = app.interfaces.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(ifs, ["mgmt0", "patient0", "uplink0"]);
}

/// `s` is standard base64 of exactly 32 bytes (a WireGuard key).
fn base64_32(s: &str) -> bool {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).is_ok_and(|b| b.len() == 32)
}

/// True when a TCP connection from `ns` to `to` is accepted.
fn tcp_reachable(ns: &NetNs, to: SocketAddr) -> bool {
    ns.run(move || TcpStream::connect_timeout(&to, Duration::from_millis(600)).is_ok())
        .expect("netns")
}

#[test]
fn a_policy_change_through_the_api_converges_and_closes_the_flow() {
    let lab = lab();
    let before = applied(&lab);
    let svc = lab_service(&lab);
    assert!(tcp_ok(lab.topology().p1(), svc.0), "open with the lab policy");

    let mut api = lab.api().expect("log in");
    let closed = api.apply_policy(&closed_policy(), "close the lab flow").expect("apply");
    let view = api.wait_applied(LAB_APPLIANCE, CONVERGE).expect("converges");
    assert!(view.applied_version > before.applied_version, "{before:?} -> {view:?}");
    let t = lab.topology();
    assert!(!tcp_ok(t.p1(), svc.0), "closed by the new policy");
    assert!(!tcp_ok(t.p1(), svc.1), "closed by the new policy (IPv6)");

    let back = api.rollback(closed.version - 1, "reopen").expect("rollback");
    assert_eq!(back.rollback_of, Some(closed.version - 1));
    let reopened = api.wait_applied(LAB_APPLIANCE, CONVERGE).expect("converges");
    assert!(reopened.applied_version > view.applied_version, "{view:?} -> {reopened:?}");
    assert_lab_policy_enforced(&lab, svc, "after the rollback");
}

#[test]
fn with_the_controller_gone_the_appliance_keeps_its_last_known_good() {
    let mut lab = lab();
    let view = applied(&lab);
    let svc = lab_service(&lab);
    assert_lab_policy_enforced(&lab, svc, "enrolled");

    let ctl = lab.controller_mut().expect("controller");
    ctl.kill(Signal::Kill).expect("SIGKILL the controller");
    ctl.wait(Duration::from_secs(10)).expect("the controller died");
    assert_lab_policy_enforced(&lab, svc, "controller killed");

    // A crashed agent restarting without its controller applies the
    // last-known-good bundle before it forwards anything.
    lab.agent_mut().kill(Signal::Kill).expect("SIGKILL the agent");
    lab.agent_mut().wait(Duration::from_secs(10)).expect("the agent died");
    lab.agent_mut().restart().expect("the agent restarts without its controller");
    let log = lab.agent().log();
    assert!(log.contains("last-known-good bundle applied"), "{}", lab.agent().log_tail(30));
    assert_lab_policy_enforced(&lab, svc, "agent restarted, controller still down");

    // The controller comes back: the agent reconnects and reports again.
    let connects = lab.agent().log().matches("bundle stream connected").count();
    lab.controller_mut().expect("controller").restart().expect("the controller restarts");
    let mut api = lab.api().expect("log in again (sessions do not survive a restart)");
    let back = api
        .wait_for(LAB_APPLIANCE, "reconnected and reporting", CONVERGE, |v| {
            v.connected && is_applied(v)
        })
        .expect("the agent reconnects");
    assert_eq!(back.applied_version, view.applied_version, "the same bundle, not a new one");
    wait_until("the agent logs its reconnect", CONVERGE, || {
        lab.agent().log().matches("bundle stream connected").count() > connects
    });
    assert_lab_policy_enforced(&lab, svc, "controller back");
}

#[test]
fn a_revoked_appliance_is_cut_off_but_keeps_enforcing() {
    let lab = lab();
    applied(&lab);
    let svc = lab_service(&lab);
    assert_lab_policy_enforced(&lab, svc, "enrolled");

    let mut api = lab.api().expect("log in");
    let revoked = api.revoke(LAB_APPLIANCE).expect("revoke");
    assert_eq!(revoked.state, airlock_testbed::ApplianceState::Revoked);

    // The stream ends, and every reconnect is refused at the TLS handshake.
    let agent_log = || lab.agent().log();
    wait_log("the agent", agent_log, "bundle stream lost");
    wait_log("the agent", agent_log, "cannot open the bundle stream");
    let ctl = lab.controller().expect("controller");
    wait_log("the controller", || ctl.log(), "handshake refused");
    let view = api
        .wait_for(LAB_APPLIANCE, "disconnected", CONVERGE, |v| !v.connected)
        .expect("the appliance is off the stream");
    assert_eq!(view.state, airlock_testbed::ApplianceState::Revoked);

    // Enforcement is unchanged, and nothing new reaches the appliance: a
    // policy that would open p2 does not open it.
    assert_lab_policy_enforced(&lab, svc, "revoked");
    let wider = LAB_POLICY.replace("hosts = [\"p1\"]", "hosts = [\"p1\", \"p2\"]");
    assert_ne!(wider, LAB_POLICY);
    api.apply_policy(&wider, "would open p2").expect("apply");
    thread::sleep(Duration::from_secs(3));
    assert_lab_policy_enforced(&lab, svc, "revoked, after a wider policy");
}
