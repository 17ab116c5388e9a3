//! Typed access to the pinned dataplane maps. Works whether or not the agent
//! daemon runs: every subcommand opens the pins directly.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use airlock_ebpf_common::layout::{
    map_names, Counter, FlowKeyV4, FlowKeyV6, FlowValue, LocalAddrKey, Reason, Settings,
};
use airlock_policy::{Flow, FlowEntry, MapEntry};
use aya::maps::{
    Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues, RingBuf,
};

use crate::netif::LocalAddrKeyOrd;

/// Map access problems.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// A pin is missing or unreadable.
    #[error(
        "cannot open pinned map {path} (is the agent installed? run `airlock-agent run` first)"
    )]
    Open {
        /// The pin.
        path: String,
        /// The cause.
        #[source]
        source: MapError,
    },
    /// A map operation failed.
    #[error("{op} on map {map} failed")]
    Op {
        /// What was attempted.
        op: &'static str,
        /// Which map.
        map: &'static str,
        /// The cause.
        #[source]
        source: MapError,
    },
    /// The CPU count could not be read.
    #[error("cannot count CPUs: {0}")]
    Cpus(String),
}

fn op(op: &'static str, map: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Op { op, map, source }
}

/// Counters of one flow entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct FlowCounters {
    /// Forward packets.
    pub packets: u64,
    /// Forward bytes.
    pub bytes: u64,
    /// Reply packets.
    pub reply_packets: u64,
    /// Reply bytes.
    pub reply_bytes: u64,
}

impl From<&FlowValue> for FlowCounters {
    fn from(v: &FlowValue) -> Self {
        Self {
            packets: v.packets,
            bytes: v.bytes,
            reply_packets: v.reply_packets,
            reply_bytes: v.reply_bytes,
        }
    }
}

/// An entry read back from the maps; `entry` is `Err` for a value the agent
/// would never write (reported, never trusted).
pub type ListedFlow = (Result<FlowEntry, airlock_policy::FlowError>, FlowCounters, MapEntry);

/// The pinned maps.
pub struct Maps {
    flows_v4: PerCpuHashMap<MapData, FlowKeyV4, FlowValue>,
    flows_v6: PerCpuHashMap<MapData, FlowKeyV6, FlowValue>,
    cpus: usize,
    stats: PerCpuArray<MapData, Counter>,
    budget: PerCpuArray<MapData, u32>,
    local: HashMap<MapData, LocalAddrKey, u8>,
    settings: Array<MapData, Settings>,
}

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maps").finish_non_exhaustive()
    }
}

fn open(dir: &Path, name: &'static str) -> Result<Map, MapsError> {
    let path = dir.join(name);
    let err = |source| MapsError::Open { path: path.display().to_string(), source };
    let data = MapData::from_pin(&path).map_err(err)?;
    Map::from_map_data(data).map_err(err)
}

macro_rules! typed {
    ($dir:expr, $name:expr) => {
        open($dir, $name)?.try_into().map_err(op("open", $name))?
    };
}

impl Maps {
    /// Opens every map pinned in `maps_dir`.
    pub fn open(maps_dir: &Path) -> Result<Self, MapsError> {
        let cpus =
            aya::util::nr_cpus().map_err(|(what, e)| MapsError::Cpus(format!("{what}: {e}")))?;
        Ok(Self {
            cpus,
            flows_v4: typed!(maps_dir, map_names::FLOWS_V4),
            flows_v6: typed!(maps_dir, map_names::FLOWS_V6),
            stats: typed!(maps_dir, map_names::STATS),
            budget: typed!(maps_dir, map_names::EVENT_BUDGET),
            local: typed!(maps_dir, map_names::LOCAL_ADDRS),
            settings: typed!(maps_dir, map_names::SETTINGS),
        })
    }

    /// Opens the drop-event ring buffer.
    pub fn open_events(maps_dir: &Path) -> Result<RingBuf<MapData>, MapsError> {
        Ok(typed!(maps_dir, map_names::EVENTS))
    }

    /// Inserts or replaces an entry (the same metadata on every CPU), keeping
    /// each CPU's counters of an entry with the same key.
    pub fn upsert(&mut self, entry: &FlowEntry) -> Result<(), MapsError> {
        match entry.to_map() {
            MapEntry::V4(k, v) => {
                let old = self.flows_v4.get(&k, 0).ok();
                let values = per_cpu(self.cpus, &v, old.as_ref().map(|o| &o[..]))?;
                self.flows_v4.insert(k, values, 0).map_err(op("insert", map_names::FLOWS_V4))
            }
            MapEntry::V6(k, v) => {
                let old = self.flows_v6.get(&k, 0).ok();
                let values = per_cpu(self.cpus, &v, old.as_ref().map(|o| &o[..]))?;
                self.flows_v6.insert(k, values, 0).map_err(op("insert", map_names::FLOWS_V6))
            }
        }
    }

    /// Removes the entry for `flow`; false when there was none.
    pub fn remove(&mut self, flow: &Flow) -> Result<bool, MapsError> {
        // Any FlowEntry over this flow has the same key.
        let probe = FlowEntry {
            flow: *flow,
            rule_id: 0,
            policy_version: 0,
            ingress: airlock_policy::Ingress::Patient,
            allow_reply: false,
            expiry: airlock_policy::Expiry::At(1),
        };
        let (res, map) = match probe.to_map() {
            MapEntry::V4(k, _) => (self.flows_v4.remove(&k), map_names::FLOWS_V4),
            MapEntry::V6(k, _) => (self.flows_v6.remove(&k), map_names::FLOWS_V6),
        };
        match res {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(op("remove", map)(e)),
        }
    }

    /// Every entry with its counters summed over CPUs, IPv4 first, each family
    /// in key order. The metadata is CPU 0's copy (all copies are equal).
    pub fn list(&self) -> Result<Vec<ListedFlow>, MapsError> {
        let mut v4: Vec<_> = self
            .flows_v4
            .iter()
            .map(|r| r.map(|(k, v)| (k, summed(&v))))
            .collect::<Result<_, _>>()
            .map_err(op("iterate", map_names::FLOWS_V4))?;
        v4.sort_by_key(|(k, _)| *k);
        let mut v6: Vec<_> = self
            .flows_v6
            .iter()
            .map(|r| r.map(|(k, v)| (k, summed(&v))))
            .collect::<Result<_, _>>()
            .map_err(op("iterate", map_names::FLOWS_V6))?;
        v6.sort_by_key(|(k, _)| *k);
        let listed = v4
            .into_iter()
            .map(|(k, v)| MapEntry::V4(k, v))
            .chain(v6.into_iter().map(|(k, v)| MapEntry::V6(k, v)))
            .map(|m| {
                let counters = match &m {
                    MapEntry::V4(_, v) | MapEntry::V6(_, v) => FlowCounters::from(v),
                };
                (FlowEntry::from_map(&m), counters, m)
            })
            .collect();
        Ok(listed)
    }

    /// Number of entries in both maps.
    pub fn len(&self) -> Result<usize, MapsError> {
        Ok(self.flows_v4.keys().count() + self.flows_v6.keys().count())
    }

    /// True when both maps are empty.
    pub fn is_empty(&self) -> Result<bool, MapsError> {
        Ok(self.len()? == 0)
    }

    /// Removes entries whose expiry has passed at `now_ns` (CLOCK_MONOTONIC).
    /// The kernel already refuses them; this frees their slots.
    pub fn remove_expired(&mut self, now_ns: u64) -> Result<usize, MapsError> {
        let dead4: Vec<_> = self
            .flows_v4
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| expired(v, now_ns))
            .map(|(k, _)| k)
            .collect();
        let dead6: Vec<_> = self
            .flows_v6
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| expired(v, now_ns))
            .map(|(k, _)| k)
            .collect();
        // Re-read each value before deleting it: an entry re-added since the
        // scan must survive.
        let mut n = 0;
        for k in dead4 {
            if self.flows_v4.get(&k, 0).is_ok_and(|v| expired(&v, now_ns)) {
                ignore_missing(self.flows_v4.remove(&k))
                    .map_err(op("remove", map_names::FLOWS_V4))?;
                n += 1;
            }
        }
        for k in dead6 {
            if self.flows_v6.get(&k, 0).is_ok_and(|v| expired(&v, now_ns)) {
                ignore_missing(self.flows_v6.remove(&k))
                    .map_err(op("remove", map_names::FLOWS_V6))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Removes the entry for `flow` if it has expired at `now_ns` (read again
    /// first: an entry re-added since it was found expired survives); true
    /// when it removed one.
    pub fn remove_if_expired(&mut self, flow: &Flow, now_ns: u64) -> Result<bool, MapsError> {
        let probe = FlowEntry {
            flow: *flow,
            rule_id: 0,
            policy_version: 0,
            ingress: airlock_policy::Ingress::Patient,
            allow_reply: false,
            expiry: airlock_policy::Expiry::At(1),
        };
        match probe.to_map() {
            MapEntry::V4(k, _) => {
                if !self.flows_v4.get(&k, 0).is_ok_and(|v| expired(&v, now_ns)) {
                    return Ok(false);
                }
                ignore_missing(self.flows_v4.remove(&k))
                    .map_err(op("remove", map_names::FLOWS_V4))?;
            }
            MapEntry::V6(k, _) => {
                if !self.flows_v6.get(&k, 0).is_ok_and(|v| expired(&v, now_ns)) {
                    return Ok(false);
                }
                ignore_missing(self.flows_v6.remove(&k))
                    .map_err(op("remove", map_names::FLOWS_V6))?;
            }
        }
        Ok(true)
    }

    /// Counters per reason, summed over CPUs, in reason order.
    pub fn stats(&self) -> Result<BTreeMap<Reason, Counter>, MapsError> {
        let mut out = BTreeMap::new();
        for r in Reason::ALL {
            let per_cpu = self.stats.get(&(r as u32), 0).map_err(op("read", map_names::STATS))?;
            let mut sum = Counter::default();
            for c in per_cpu.iter() {
                sum.packets += c.packets;
                sum.bytes += c.bytes;
            }
            out.insert(r, sum);
        }
        Ok(out)
    }

    /// Writes the dataplane settings.
    pub fn set_settings(&mut self, s: Settings) -> Result<(), MapsError> {
        self.settings.set(0, s, 0).map_err(op("write", map_names::SETTINGS))
    }

    /// Gives every CPU `per_cpu` drop events to spend.
    pub fn refill_event_budget(&mut self, per_cpu: u32) -> Result<(), MapsError> {
        let n =
            aya::util::nr_cpus().map_err(|(what, e)| MapsError::Cpus(format!("{what}: {e}")))?;
        let values = PerCpuValues::try_from(vec![per_cpu; n])
            .map_err(|e| MapsError::Cpus(format!("per-CPU values for {n} CPUs: {e}")))?;
        self.budget.set(0, values, 0).map_err(op("write", map_names::EVENT_BUDGET))
    }

    /// Makes `LOCAL_ADDRS` equal `want` (adds first, then removes).
    pub fn sync_local_addrs(&mut self, want: &BTreeSet<LocalAddrKeyOrd>) -> Result<(), MapsError> {
        for k in want {
            self.local.insert(k.0, 1, 0).map_err(op("insert", map_names::LOCAL_ADDRS))?;
        }
        let have: Vec<_> = self.local.keys().filter_map(Result::ok).collect();
        for k in have {
            if !want.contains(&LocalAddrKeyOrd(k)) {
                ignore_missing(self.local.remove(&k))
                    .map_err(op("remove", map_names::LOCAL_ADDRS))?;
            }
        }
        Ok(())
    }
}

/// `v` for every CPU, with each CPU's counters carried over from `old`.
fn per_cpu(
    cpus: usize,
    v: &FlowValue,
    old: Option<&[FlowValue]>,
) -> Result<PerCpuValues<FlowValue>, MapsError> {
    let values = (0..cpus)
        .map(|cpu| {
            let mut v = *v;
            if let Some(o) = old.and_then(|o| o.get(cpu)) {
                v.packets = o.packets;
                v.bytes = o.bytes;
                v.reply_packets = o.reply_packets;
                v.reply_bytes = o.reply_bytes;
            }
            v
        })
        .collect::<Vec<_>>();
    PerCpuValues::try_from(values)
        .map_err(|e| MapsError::Cpus(format!("per-CPU values for {cpus} CPUs: {e}")))
}

/// CPU 0's metadata with every CPU's counters added up.
fn summed(values: &[FlowValue]) -> FlowValue {
    let mut out = values.first().copied().unwrap_or_default();
    for v in values.iter().skip(1) {
        out.packets += v.packets;
        out.bytes += v.bytes;
        out.reply_packets += v.reply_packets;
        out.reply_bytes += v.reply_bytes;
    }
    out
}

fn expired(values: &[FlowValue], now_ns: u64) -> bool {
    values.first().is_some_and(|v| v.expires_ns != 0 && v.expires_ns <= now_ns)
}

fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(e) if is_not_found(&e) => Ok(()),
        other => other,
    }
}
