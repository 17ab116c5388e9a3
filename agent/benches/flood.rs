//! The same flood through the appliance with only the eBPF layer enforcing
//! versus only the nftables layer (run as root).
//!
//! `cargo bench -p airlock-agent --bench flood`. For 10 and 100k policy
//! entries it builds a lab, applies a policy (both layers), then removes one
//! layer at a time — the nftables table for "eBPF only", the pinned XDP links
//! (agent stopped) for "nftables only" — and sends 2M UDP packets from a
//! patient host through an AF_PACKET socket (one generator for both layers):
//! to a port no entry allows (dropped) and to the allowed port (forwarded to
//! a sink on the external host). trafgen was tried first; its TX ring gives up
//! when the veth path pushes back. It reports packets per
//! second handled by the layer and busy CPU time (all CPUs, generator
//! included — the same generator for both layers) per packet.

use std::{fmt::Write as _, net::Ipv4Addr, time::Instant};

use airlock_testbed::{addr, unique_prefix, Lab, NetNs};
use anyhow::{Context as _, Result};

const PACKETS: u64 = 2_000_000;
const ALLOWED: u16 = 9000;
const DENIED: u16 = 9001;

fn policy(n: usize) -> String {
    let mut s = String::from(
        "version = 1\n[[appliance]]\nname = \"lab-appliance\"\nports = { patient = [\"patient0\"], uplink = [\"uplink0\"] }\n\
         [[service]]\nname = \"sink\"\nendpoint = \"10.78.0.100:51820\"\n\
         public_key = \"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\"\naddresses = [\"10.78.0.100\"]\n\
         ports = [{ proto = \"udp\", port = 9000 }]\n\
         [[host]]\nname = \"p1\"\nappliance = \"lab-appliance\"\naddresses = [\"10.77.0.11\"]\n\
         [[flow]]\nid = 1\nname = \"p1\"\nfrom = \"host:p1\"\nto = \"service:sink\"\nproto = \"udp\"\nport = 9000\nexpires = \"2099-01-01T00:00:00Z\"\n",
    );
    for i in 1..n {
        let a = Ipv4Addr::from(0x0a40_0000u32 + i as u32);
        let _ = write!(
            s,
            "[[host]]\nname = \"h{i}\"\nappliance = \"lab-appliance\"\naddresses = [\"{a}\"]\n\
             [[flow]]\nid = {}\nname = \"f{i}\"\nfrom = \"host:h{i}\"\nto = \"service:sink\"\nproto = \"udp\"\nport = 9000\nexpires = \"2099-01-01T00:00:00Z\"\n",
            i + 1
        );
    }
    s
}

/// Busy and total CPU jiffies (all CPUs) from /proc/stat.
fn cpu() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat")?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

fn nft_counter(app: &NetNs, comment: &str) -> Result<u64> {
    let chain = app.exec("nft", &["list", "chain", "inet", "airlock", "forward"])?;
    chain
        .lines()
        .find(|l| l.contains(comment))
        .and_then(|l| l.split("packets ").nth(1)?.split_whitespace().next()?.parse().ok())
        .context("counter")
}

fn tx_packets(ns: &NetNs, ifname: &str) -> Result<u64> {
    Ok(ns
        .exec("cat", &[&format!("/sys/class/net/{ifname}/statistics/tx_packets")])?
        .trim()
        .parse()?)
}

fn rx_packets(ns: &NetNs, ifname: &str) -> Result<u64> {
    Ok(ns
        .exec("cat", &[&format!("/sys/class/net/{ifname}/statistics/rx_packets")])?
        .trim()
        .parse()?)
}

struct Run {
    pps: f64,
    ns_per_packet: f64,
}

/// The frame: Ethernet to the appliance's patient port, IPv4/UDP from p1.
fn frame(dst_mac: [u8; 6], src_mac: [u8; 6], dport: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let payload = 18u16;
    let total = 20 + 8 + payload;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&addr::P1_V4.octets());
    ip[16..20].copy_from_slice(&addr::EXT_V4.octets());
    let mut sum: u32 = ip.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&(8 + payload).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (allowed for IPv4)
    f.extend(std::iter::repeat_n(0x41, payload as usize));
    f
}

fn mac(ns: &NetNs, ifname: &str) -> Result<[u8; 6]> {
    let text = ns.exec("cat", &[&format!("/sys/class/net/{ifname}/address")])?;
    let v: Vec<u8> =
        text.trim().split(':').filter_map(|h| u8::from_str_radix(h, 16).ok()).collect();
    v.try_into().map_err(|_| anyhow::anyhow!("bad MAC {text}"))
}

/// Sends `PACKETS` copies of `frame` on p1's eth0 through an AF_PACKET socket,
/// waiting briefly whenever the device queue is full (the same generator for
/// both layers).
fn send(ns: &NetNs, frame: Vec<u8>) -> Result<()> {
    ns.run(move || -> Result<()> {
        let name = std::ffi::CString::new("eth0")?;
        // SAFETY: plain socket calls with valid arguments and buffers.
        unsafe {
            let idx = libc::if_nametoindex(name.as_ptr());
            anyhow::ensure!(idx != 0, "no eth0");
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = idx as i32;
            sll.sll_halen = 6;
            let addr = (&sll as *const libc::sockaddr_ll).cast::<libc::sockaddr>();
            let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            let mut sent = 0;
            while sent < PACKETS {
                let r = libc::sendto(fd, frame.as_ptr().cast(), frame.len(), 0, addr, len);
                if r < 0 {
                    let e = std::io::Error::last_os_error();
                    if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN)) {
                        std::thread::yield_now();
                        continue;
                    }
                    libc::close(fd);
                    anyhow::bail!("sendto: {e}");
                }
                sent += 1;
            }
            libc::close(fd);
        }
        Ok(())
    })?
}

/// Floods `dport` from p1; `handled` reads the layer's count of such packets.
fn flood(lab: &Lab, dport: u16, handled: &dyn Fn() -> Result<u64>) -> Result<Run> {
    let t = lab.topology();
    let f = frame(mac(t.appliance(), "patient0")?, mac(t.p1(), "eth0")?, dport);
    let before = handled()?;
    let (b0, _) = cpu()?;
    let start = Instant::now();
    send(t.p1(), f)?;
    let secs = start.elapsed().as_secs_f64();
    // Let the last packets drain through the appliance.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (b1, _) = cpu()?;
    let n = handled()? - before;
    anyhow::ensure!(n > PACKETS / 10, "only {n} packets reached the layer");
    // USER_HZ is 100 on Linux: a jiffy is 10 ms.
    let busy_ns = (b1 - b0) as f64 * 10_000_000.0;
    Ok(Run { pps: n as f64 / secs, ns_per_packet: busy_ns / n as f64 })
}

fn main() -> Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!(
            "flood benchmark: run it with `cargo bench -p airlock-agent --bench flood` (root)"
        );
        return Ok(());
    }
    println!("| entries | layer | traffic | handled/s | busy CPU per packet |");
    println!("|---:|---|---|---:|---:|");
    let mut rows = Vec::new();
    let mut baselines = Vec::new();
    for n in [10usize, 100_000] {
        let mut lab = Lab::start(&unique_prefix())?;
        let path = lab.agent().record().state_dir.join("flood.toml");
        std::fs::write(&path, policy(n))?;
        lab.agent().apply_policy(&path)?;
        let ext = NetNs::existing(lab.topology().external().name());
        let _sink =
            ext.run(|| std::net::UdpSocket::bind((addr::EXT_V4, ALLOWED)))?.context("sink")?;
        let app = NetNs::existing(lab.topology().appliance().name());

        // The generator and the path up to the appliance alone: its bridge
        // port is down, so the switch drops every frame.
        let sw = NetNs::existing(lab.topology().switch().name());
        let p1 = NetNs::existing(lab.topology().p1().name());
        sw.ip(&["link", "set", "app", "down"])?;
        let base = flood(&lab, DENIED, &|| tx_packets(&p1, "eth0"))?;
        sw.ip(&["link", "set", "app", "up"])?;
        std::thread::sleep(std::time::Duration::from_millis(300));
        baselines.push((n, base));

        // eBPF only.
        app.exec("nft", &["delete", "table", "inet", "airlock"])?;
        let stat = |r: &'static str| {
            let lab = &lab;
            move || -> Result<u64> { Ok(lab.agent().stats()?.packets(r)) }
        };
        let deny = flood(&lab, DENIED, &stat("drop_no_flow"))?;
        let allow = flood(&lab, ALLOWED, &stat("pass_flow"))?;
        rows.push((n, "eBPF", deny, allow));

        // nftables only.
        lab.agent().apply_policy(&path)?;
        lab.agent_mut().stop()?;
        lab.agent().unpin_links()?;
        let deny = flood(&lab, DENIED, &|| nft_counter(&app, "default deny"))?;
        let allow = flood(&lab, ALLOWED, &|| rx_packets(&ext, "eth0"))?;
        rows.push((n, "nftables", deny, allow));
    }
    for (n, layer, deny, allow) in &rows {
        println!(
            "| {n} | {layer} only | disallowed (dropped) | {:.0} | {:.0} ns |",
            deny.pps, deny.ns_per_packet
        );
        println!(
            "| {n} | {layer} only | allowed (forwarded) | {:.0} | {:.0} ns |",
            allow.pps, allow.ns_per_packet
        );
    }
    for (n, b) in &baselines {
        println!(
            "| {n} | none (appliance port down) | generator and switch only | {:.0} | {:.0} ns |",
            b.pps, b.ns_per_packet
        );
    }
    for n in [10usize, 100_000] {
        let get = |l: &str| rows.iter().find(|r| r.0 == n && r.1 == l);
        let base = baselines.iter().find(|b| b.0 == n).map_or(0.0, |b| b.1.ns_per_packet);
        if let (Some(e), Some(f)) = (get("eBPF"), get("nftables")) {
            println!(
                "\n{n} entries: CPU per dropped packet above the generator-only baseline: eBPF {:.0} ns, nftables {:.0} ns ({:.1}x); \
                 per forwarded packet: eBPF {:.0} ns, nftables {:.0} ns ({:.1}x)",
                e.2.ns_per_packet - base,
                f.2.ns_per_packet - base,
                (f.2.ns_per_packet - base) / (e.2.ns_per_packet - base),
                e.3.ns_per_packet - base,
                f.3.ns_per_packet - base,
                (f.3.ns_per_packet - base) / (e.3.ns_per_packet - base),
            );
        }
    }
    Ok(())
}
