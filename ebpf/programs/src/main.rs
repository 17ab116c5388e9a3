//! Airlock's XDP programs: the patient-network boundary in the kernel.
//!
//! Three entry points, one per port role, share every map; the role is a
//! compile-time constant of each. Each entry is thin: parse the frame
//! ([`airlock_ebpf_common::parse`]), decide ([`airlock_ebpf_common::decide`]),
//! count, maybe emit a drop event, return the verdict. All logic lives in the
//! common crate where it is unit-tested on the host; this file only supplies map
//! lookups, the clock and the counters. Every error path returns XDP_DROP.
#![no_std]
#![no_main]

use airlock_ebpf_common::{
    layout::{
        Counter, DropEvent, FlowKeyV4, FlowKeyV6, FlowValue, LocalAddrKey, PortRole, Reason,
        Settings, DEFAULT_MAX_FLOWS, EVENTS_BYTES, MAX_LOCAL_ADDRS,
    },
    parse::{ethertype_of, parse_into, Frame, FrameKind, Packet},
    verdict::{decide, decide_management_egress, Action, Direction, EntryMeta, FlowTable},
};
use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{TcContext, XdpContext},
};

// Per-CPU values: each CPU bumps its own counters without atomics (~10 ns a
// packet saved); the agent writes the same metadata to every CPU and sums the
// counters.
#[map]
static FLOWS_V4: PerCpuHashMap<FlowKeyV4, FlowValue> = PerCpuHashMap::pinned(DEFAULT_MAX_FLOWS, 0);
#[map]
static FLOWS_V6: PerCpuHashMap<FlowKeyV6, FlowValue> = PerCpuHashMap::pinned(DEFAULT_MAX_FLOWS, 0);
#[map]
static STATS: PerCpuArray<Counter> = PerCpuArray::pinned(Reason::SLOTS, 0);
#[map]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);
#[map]
static EVENT_BUDGET: PerCpuArray<u32> = PerCpuArray::pinned(1, 0);
#[map]
static LOCAL_ADDRS: HashMap<LocalAddrKey, u8> = HashMap::pinned(MAX_LOCAL_ADDRS, 0);
#[map]
static SETTINGS: Array<Settings> = Array::pinned(1, 0);

/// XDP program for ports facing the patient network.
#[xdp]
pub fn airlock_patient(ctx: XdpContext) -> u32 {
    handle::<true>(&ctx, PortRole::Patient)
}

/// XDP program for ports facing the uplink.
#[xdp]
pub fn airlock_uplink(ctx: XdpContext) -> u32 {
    handle::<true>(&ctx, PortRole::Uplink)
}

/// XDP program for management ports: only answers to the agent's own
/// connections, addressed to the appliance itself.
#[xdp]
pub fn airlock_management(ctx: XdpContext) -> u32 {
    handle::<true>(&ctx, PortRole::Management)
}

/// The headers the parser reads at most (Ethernet + IPv6 + TCP), pulled into
/// the linear part of an skb before parsing.
const HEADERS: u32 = 14 + 40 + 20;

/// tc egress program for management ports: only the appliance's own packets
/// leave through them; anything forwarded there from another port is
/// dropped (counted as `drop_wrong_port`). Passes are not counted: they are
/// the appliance's own traffic, not the boundary's.
#[classifier]
pub fn airlock_management_egress(ctx: TcContext) -> i32 {
    // A frame shorter than the headers fails to pull; the parser then
    // refuses it from what is there.
    let _ = ctx.pull_data(HEADERS);
    // The frame's length is the skb's (a GSO packet is longer than its
    // linear part); reads are bounded by the linear part.
    let pkt = SkbPacket { start: ctx.data(), end: ctx.data_end(), len: ctx.len() as usize };
    // SAFETY: the context's skb pointer is valid for this run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let mut frame = Frame::EMPTY;
    let reason = match parse_into(&pkt, &mut frame) {
        Err(reason) => reason,
        Ok(()) => {
            let d = decide_management_egress(&frame, ifindex, &Maps);
            if d.action == Action::Pass {
                return TC_ACT_OK;
            }
            d.reason
        }
    };
    count(reason, pkt.len as u64);
    TC_ACT_SHOT
}

/// The headers of an skb: `len` bytes long, of which `[start, end)` readable.
struct SkbPacket {
    start: usize,
    end: usize,
    len: usize,
}

impl Packet for SkbPacket {
    #[inline(always)]
    fn len(&self) -> usize {
        self.len
    }

    #[inline(always)]
    fn bytes<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let at = self.start + off;
        if at + N > self.end {
            return None;
        }
        // SAFETY: [at, at + N) lies inside the linear data, checked just above.
        Some(unsafe { core::ptr::read_unaligned(at as *const [u8; N]) })
    }
}

/// The patient program without drop events: never attached, it is the
/// benchmark's "silent drop" reference for the cost of the event budget.
#[xdp]
pub fn airlock_silent(ctx: XdpContext) -> u32 {
    handle::<false>(&ctx, PortRole::Patient)
}

/// Returns DROP and does nothing else: the benchmark's empty-program baseline.
#[xdp]
pub fn airlock_baseline(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// The frame bytes of an XDP context, bounds-checked on every read.
struct XdpPacket {
    start: usize,
    end: usize,
}

impl Packet for XdpPacket {
    #[inline(always)]
    fn len(&self) -> usize {
        self.end - self.start
    }

    #[inline(always)]
    fn bytes<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let at = self.start + off;
        if at + N > self.end {
            return None;
        }
        // SAFETY: [at, at + N) lies inside the packet, checked just above.
        Some(unsafe { core::ptr::read_unaligned(at as *const [u8; N]) })
    }
}

/// Map lookups for the verdict.
struct Maps;

impl FlowTable for Maps {
    type Entry = *mut FlowValue;
    const NO_ENTRY: *mut FlowValue = core::ptr::null_mut();

    #[inline(always)]
    fn get_v4(&self, key: &FlowKeyV4) -> Option<*mut FlowValue> {
        FLOWS_V4.get_ptr_mut(key)
    }

    #[inline(always)]
    fn get_v6(&self, key: &FlowKeyV6) -> Option<*mut FlowValue> {
        FLOWS_V6.get_ptr_mut(key)
    }

    #[inline(always)]
    fn meta(&self, e: *mut FlowValue) -> EntryMeta {
        // SAFETY: `e` came from a successful map lookup in this invocation.
        unsafe {
            EntryMeta { expires_ns: (*e).expires_ns, ingress: (*e).ingress, flags: (*e).flags }
        }
    }

    #[inline(always)]
    fn is_local(&self, key: &LocalAddrKey) -> bool {
        // SAFETY: the value is only tested for presence.
        unsafe { LOCAL_ADDRS.get(key).is_some() }
    }
}

#[inline(always)]
fn count(reason: Reason, len: u64) {
    if let Some(c) = STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it during this run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
}

#[inline(always)]
fn handle<const WITH_EVENTS: bool>(ctx: &XdpContext, role: PortRole) -> u32 {
    let pkt = XdpPacket { start: ctx.data(), end: ctx.data_end() };
    let len = pkt.len() as u64;
    let ifindex = ctx.ingress_ifindex() as u32;
    let mut frame = Frame::EMPTY;
    if let Err(reason) = parse_into(&pkt, &mut frame) {
        count(reason, len);
        if WITH_EVENTS {
            drop_event(&pkt, None, reason, ifindex, role);
        }
        return xdp_action::XDP_DROP;
    }
    let settings = match SETTINGS.get(0) {
        Some(s) => *s,
        None => Settings::default(),
    };
    // CLOCK_MONOTONIC_COARSE: ~25 ns a packet cheaper than a precise clock
    // read here, at most one tick (≤ 4 ms) late. See ARCHITECTURE.md on clocks.
    // SAFETY: a helper without arguments.
    let d =
        decide(&frame, role, ifindex, &Maps, &settings, || unsafe { bpf_ktime_get_coarse_ns() });
    count(d.reason, len);
    match d.action {
        Action::Pass => {
            let e = d.entry;
            // SAFETY: when `dir` is not None, `e` came from a successful lookup
            // in this run (never null then) and is this CPU's own copy.
            unsafe {
                match d.dir {
                    Direction::Forward if !e.is_null() => {
                        (*e).packets += 1;
                        (*e).bytes += len;
                    }
                    Direction::Reply if !e.is_null() => {
                        (*e).reply_packets += 1;
                        (*e).reply_bytes += len;
                    }
                    _ => {}
                }
            }
            xdp_action::XDP_PASS
        }
        Action::Drop => {
            if WITH_EVENTS {
                drop_event(&pkt, Some(&frame), d.reason, ifindex, role);
            }
            xdp_action::XDP_DROP
        }
    }
}

/// Emits a drop event if this CPU's budget (refilled by the agent every second)
/// allows; otherwise only counts it as suppressed. A dead agent means no refill,
/// hence no events, while drops go on.
#[inline(always)]
fn drop_event(
    pkt: &XdpPacket,
    frame: Option<&Frame>,
    reason: Reason,
    ifindex: u32,
    role: PortRole,
) {
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot.
    unsafe {
        if *budget == 0 {
            count(Reason::EventsSuppressed, 0);
            return;
        }
        *budget -= 1;
    }
    let Some(mut slot) = EVENTS.reserve::<DropEvent>(0) else {
        count(Reason::EventsLost, 0);
        return;
    };
    let mut ev = DropEvent {
        // SAFETY: a helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        ifindex,
        reason: reason as u32,
        len: pkt.len() as u32,
        role: role as u8,
        ethertype: match ethertype_of(pkt) {
            Ok(t) => t.to_be_bytes(),
            Err(_) => [0, 0],
        },
        ..DropEvent::default()
    };
    if let Some(f) = frame {
        ev.family = f.family();
        ev.src = f.src;
        ev.dst = f.dst;
        ev.proto = f.proto;
        ev.sport = f.sport;
        ev.dport = f.dport;
        if f.kind == FrameKind::Arp {
            ev.proto = 0;
        }
    }
    slot.write(ev);
    slot.submit(0);
    count(Reason::EventsSent, 0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
