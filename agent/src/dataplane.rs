//! Loading, pinning and attaching the XDP boundary, and removing it.
//!
//! Pins live under `<pin_dir>/v<LAYOUT_VERSION>/`: `maps/<NAME>` and
//! `links/<port>@<ifindex>` (bpffs refuses dots in names). A pinned link keeps its program attached after
//! the agent exits, so enforcement never depends on the agent being alive. On
//! start the agent reuses the pinned maps (entries and counters survive) and
//! swaps the new program into each existing link with `BPF_LINK_UPDATE`, an
//! atomic replacement: there is no instant without a program on the port.

use std::path::{Path, PathBuf};

use airlock_ebpf_common::layout::{program_names, PortRole, Settings, LAYOUT_VERSION};
use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use tracing::{info, warn};

use crate::{
    applier::Applier,
    config::{AgentConfig, PortConfig, XdpModeConfig},
    maps::{Maps, MapsError},
    netif::{self, NetifError},
};

/// The compiled XDP object, built by build.rs for bpfel-unknown-none.
pub static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/airlock-ebpf"));

/// bpffs magic number (statfs f_type).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where this layout version's pins live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinLayout {
    root: PathBuf,
    base: PathBuf,
}

impl PinLayout {
    /// The layout under `pin_dir`.
    pub fn new(pin_dir: &Path) -> Self {
        Self { base: pin_dir.to_owned(), root: pin_dir.join(format!("v{LAYOUT_VERSION}")) }
    }
    /// The configured pin directory.
    pub fn base(&self) -> &Path {
        &self.base
    }
    /// Directory of map pins.
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    /// Directory of link pins.
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    /// The link pin of `port` at `ifindex`.
    pub fn link(&self, port: &str, ifindex: u32) -> PathBuf {
        self.links().join(format!("{port}@{ifindex}"))
    }
}

/// Dataplane failures.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The pin directory is not on a bpffs and none could be mounted.
    #[error("{0} is not on a bpffs; mount one (mount -t bpf bpf /sys/fs/bpf) or choose a pin_dir under one")]
    NotBpffs(PathBuf),
    /// Mounting /sys/fs/bpf failed.
    #[error("cannot mount bpffs at /sys/fs/bpf")]
    Mount(#[source] std::io::Error),
    /// Creating or reading pin directories failed.
    #[error("cannot use pin directory {path}")]
    PinDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Loading the object (or reusing its pinned maps) failed.
    #[error("cannot load the XDP object")]
    Load(#[source] EbpfError),
    /// A program is missing from the object.
    #[error("program {0} missing from the XDP object")]
    MissingProgram(&'static str),
    /// The verifier or the kernel refused a program, or attaching failed.
    #[error("{what} failed for program {program}")]
    Program {
        /// What was attempted.
        what: &'static str,
        /// Which program.
        program: &'static str,
        /// The cause.
        #[source]
        source: ProgramError,
    },
    /// The kernel attached through netlink, which cannot be pinned.
    #[error("port {0}: the kernel did not create a bpf_link (needs Linux >= 5.9); refusing an unpinnable attachment")]
    NotALink(String),
    /// Interfaces that no program guards would be routed through.
    #[error("refusing to turn on forwarding: interface(s) {0:?} are not boundary ports (add them to the configuration or remove them)")]
    ForeignInterfaces(Vec<String>),
    /// The pins belong to ports of another network namespace.
    #[error("the pins under {pins} belong to interfaces that are not here ({detail}); run this inside the appliance's network namespace (nsenter --net=...), or pass --force")]
    WrongNamespace {
        /// The link pin directory.
        pins: PathBuf,
        /// Which pin does not match.
        detail: String,
    },
    /// Pinning a link failed.
    #[error("cannot pin the link of port {port}")]
    PinLink {
        /// The port.
        port: String,
        /// The cause.
        #[source]
        source: aya::pin::PinError,
    },
    /// Interface trouble.
    #[error(transparent)]
    Netif(#[from] NetifError),
    /// Map trouble.
    #[error(transparent)]
    Maps(#[from] MapsError),
}

/// Makes sure `pin_dir` lies on a bpffs, mounting /sys/fs/bpf when that is
/// where it should be and nothing is mounted there yet.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), DataplaneError> {
    let sys = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(sys) && !is_bpffs(sys) {
        let src = c"bpf";
        let target = c"/sys/fs/bpf";
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(src.as_ptr(), target.as_ptr(), src.as_ptr(), 0, std::ptr::null())
        };
        if rc != 0 {
            return Err(DataplaneError::Mount(std::io::Error::last_os_error()));
        }
        info!("mounted bpffs at /sys/fs/bpf");
    }
    let mut probe = pin_dir.to_owned();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if !is_bpffs(&probe) {
        return Err(DataplaneError::NotBpffs(pin_dir.to_owned()));
    }
    Ok(())
}

fn is_bpffs(p: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else { return false };
    // SAFETY: zeroed statfs is a valid out buffer; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

fn mkdirs(p: &Path) -> Result<(), DataplaneError> {
    std::fs::create_dir_all(p)
        .map_err(|source| DataplaneError::PinDir { path: p.to_owned(), source })
}

/// How a port came to enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attachment {
    /// A new link was created and pinned.
    Attached(XdpMode),
    /// The program in an existing pinned link was replaced atomically.
    Replaced,
}

/// The loaded boundary. Dropping it closes file descriptors only: the pinned
/// links and maps keep enforcing.
pub struct Dataplane {
    _ebpf: Ebpf,
    /// The pinned maps.
    pub maps: Maps,
    /// Port name, ifindex and role.
    pub ports: Vec<(String, u32, PortRole)>,
    /// The applier with its record of the maps and the nftables table; a
    /// new installation starts with none (it lists the maps first).
    pub applier: Applier,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane").field("ports", &self.ports).finish_non_exhaustive()
    }
}

const fn program_for(role: PortRole) -> &'static str {
    match role {
        PortRole::Patient => program_names::PATIENT,
        PortRole::Uplink => program_names::UPLINK,
        PortRole::Management => program_names::MANAGEMENT,
    }
}

impl Dataplane {
    /// Loads the programs, reuses or creates the pinned maps, writes settings
    /// and local addresses, and attaches every port. Forwarding is turned off
    /// before the first attach of a port that had no pinned link (fail closed);
    /// turning it on is [`Dataplane::open_gate`], after the caller has applied
    /// its state.
    pub fn install(cfg: &AgentConfig) -> Result<Self, DataplaneError> {
        let layout = cfg.pins();
        ensure_bpffs(&cfg.appliance.pin_dir)?;
        mkdirs(&layout.maps())?;
        mkdirs(&layout.links())?;

        let mut ports = Vec::new();
        for p in &cfg.ports {
            ports.push((p.name.clone(), netif::ifindex(&p.name)?, PortRole::from(p.role)));
        }
        let fresh = ports.iter().any(|(name, idx, _)| !layout.link(name, *idx).exists());
        if fresh {
            netif::set_forwarding(false)?;
        }

        let max = cfg.dataplane.max_flows;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(layout.maps())
            .map_max_entries("FLOWS_V4", max)
            .map_max_entries("FLOWS_V6", max)
            .load(PROGRAMS)
            .map_err(DataplaneError::Load)?;
        let mut maps = Maps::open(&layout.maps())?;
        maps.set_settings(Settings { reply_min_port: cfg.dataplane.reply_min_port, pad: [0; 6] })?;
        maps.refill_event_budget(cfg.dataplane.events_per_second)?;
        maps.sync_local_addrs(&netif::local_addrs(&name_index(&ports))?)?;

        for name in [program_names::PATIENT, program_names::UPLINK, program_names::MANAGEMENT] {
            xdp(&mut ebpf, name)?.load().map_err(|source| DataplaneError::Program {
                what: "verifier load",
                program: name,
                source,
            })?;
        }
        if ports.iter().any(|(_, _, role)| *role == PortRole::Management) {
            egress_program(&mut ebpf)?.load().map_err(|source| DataplaneError::Program {
                what: "verifier load",
                program: program_names::MANAGEMENT_EGRESS,
                source,
            })?;
        }
        for (p, (_, ifindex, role)) in cfg.ports.iter().zip(&ports) {
            if *role == PortRole::Management {
                // Egress first: from its first packet in, nothing forwarded
                // leaves through the port.
                let how = guard_egress(&mut ebpf, &p.name)?;
                info!(port = %p.name, ifindex, attachment = ?how, "management port: egress guarded");
            }
            let how = attach_port(&mut ebpf, &layout, p, *ifindex, *role)?;
            info!(port = %p.name, ifindex, role = role.as_str(), attachment = ?how, "port enforcing");
        }
        Ok(Self { _ebpf: ebpf, maps, ports, applier: Applier::new(cfg) })
    }

    /// Turns IP forwarding on when configured, and only when every interface
    /// of the namespace besides `lo` is a boundary port.
    pub fn open_gate(&self, cfg: &AgentConfig) -> Result<(), DataplaneError> {
        if !cfg.dataplane.enable_forwarding {
            return Ok(());
        }
        let names: Vec<&str> = self.ports.iter().map(|(n, _, _)| n.as_str()).collect();
        let foreign = netif::foreign_interfaces(&names)?;
        if !foreign.is_empty() {
            netif::set_forwarding(false)?;
            return Err(DataplaneError::ForeignInterfaces(foreign));
        }
        netif::set_forwarding(true)?;
        Ok(())
    }

    /// What is wrong with the boundary now: a port gone or recreated under
    /// another ifindex (its new device has no program), a link pin removed, a
    /// management port's egress guard gone, or an interface that is not a
    /// port. Empty when healthy.
    pub fn problems(&self, cfg: &AgentConfig) -> Vec<String> {
        let layout = cfg.pins();
        let mut out = Vec::new();
        for (name, ifindex, role) in &self.ports {
            match netif::ifindex(name) {
                Ok(i) if i == *ifindex => {
                    if !layout.link(name, i).exists() {
                        out.push(format!("port {name}: link pin missing"));
                    }
                    if *role == PortRole::Management {
                        let program = program_names::MANAGEMENT_EGRESS;
                        match crate::tc_guard::egress_guard_present(i, program) {
                            Ok(true) => {}
                            Ok(false) => out.push(format!("port {name}: egress guard missing")),
                            Err(e) => out.push(format!("port {name}: egress guard unknown: {e}")),
                        }
                    }
                }
                Ok(i) => out.push(format!("port {name}: recreated (ifindex {ifindex} -> {i})")),
                Err(_) => out.push(format!("port {name}: gone")),
            }
        }
        let names: Vec<&str> = self.ports.iter().map(|(n, _, _)| n.as_str()).collect();
        match netif::foreign_interfaces(&names) {
            Ok(f) if !f.is_empty() => out.push(format!("interfaces that are not ports: {f:?}")),
            Ok(_) => {}
            Err(e) => out.push(format!("cannot list interfaces: {e}")),
        }
        out
    }

    /// Re-reads the ports' addresses into `LOCAL_ADDRS`.
    pub fn refresh_local_addrs(&mut self) -> Result<(), DataplaneError> {
        let want = netif::local_addrs(&name_index(&self.ports))?;
        Ok(self.maps.sync_local_addrs(&want)?)
    }
}

fn name_index(ports: &[(String, u32, PortRole)]) -> Vec<(String, u32)> {
    ports.iter().map(|(n, i, _)| (n.clone(), *i)).collect()
}

fn xdp<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DataplaneError> {
    ebpf.program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DataplaneError::Program { what: "type check", program: name, source })
}

fn attach_port(
    ebpf: &mut Ebpf,
    layout: &PinLayout,
    port: &PortConfig,
    ifindex: u32,
    role: PortRole,
) -> Result<Attachment, DataplaneError> {
    let program = program_for(role);
    let pin = layout.link(&port.name, ifindex);
    remove_stale_link_pins(layout, &port.name, &pin)?;
    let prog = xdp(ebpf, program)?;
    if pin.exists() {
        match replace_in_pinned_link(prog, &pin) {
            Ok(()) => return Ok(Attachment::Replaced),
            Err(e) => {
                // A link whose device went away (or that is not ours): drop it
                // and attach anew. Forwarding is off in that case (see install).
                warn!(port = %port.name, error = %e, "pinned link unusable; attaching a new one");
                netif::set_forwarding(false)?;
                std::fs::remove_file(&pin)
                    .map_err(|source| DataplaneError::PinDir { path: pin.clone(), source })?;
            }
        }
    }
    let attach = |prog: &mut Xdp, mode| {
        prog.attach_to_if_index(ifindex, mode).map_err(|source| DataplaneError::Program {
            what: "attach",
            program,
            source,
        })
    };
    let (id, mode) = match port.xdp_mode {
        XdpModeConfig::Native => (attach(prog, XdpMode::Driver)?, XdpMode::Driver),
        XdpModeConfig::Generic => (attach(prog, XdpMode::Skb)?, XdpMode::Skb),
        XdpModeConfig::Auto => match attach(prog, XdpMode::Driver) {
            Ok(id) => (id, XdpMode::Driver),
            Err(e) => {
                warn!(port = %port.name, error = %e, "native XDP unavailable; using generic mode");
                (attach(prog, XdpMode::Skb)?, XdpMode::Skb)
            }
        },
    };
    let link = prog.take_link(id).map_err(|source| DataplaneError::Program {
        what: "take link",
        program,
        source,
    })?;
    let fd_link =
        FdLink::try_from(link).map_err(|_| DataplaneError::NotALink(port.name.clone()))?;
    fd_link
        .pin(&pin)
        .map_err(|source| DataplaneError::PinLink { port: port.name.clone(), source })?;
    Ok(Attachment::Attached(mode))
}

/// The tc filter of the management egress program: a fixed priority and
/// handle, so that a restart replaces the program in place (there is no
/// instant without it). A tc filter stays attached when the agent exits.
const EGRESS_PRIORITY: u16 = 0xa1;
const EGRESS_HANDLE: TcHandle = TcHandle::new(0, 0xa1);

fn egress_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, DataplaneError> {
    let name = program_names::MANAGEMENT_EGRESS;
    ebpf.program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DataplaneError::Program { what: "type check", program: name, source })
}

/// Puts the management egress program on `port` (tc egress, clsact): only
/// the appliance's own packets leave through it. Replaces the filter of an
/// earlier run atomically, else adds it. Netlink tc rather than a tcx link:
/// the appliance image's kernel (6.1) has no tcx.
fn guard_egress(ebpf: &mut Ebpf, port: &str) -> Result<Attachment, DataplaneError> {
    let program = program_names::MANAGEMENT_EGRESS;
    let err = |what| move |source| DataplaneError::Program { what, program, source };
    // Already there after an earlier run: that is fine.
    if let Err(e) = tc::qdisc_add_clsact(port) {
        tracing::debug!(port, error = %e, "clsact qdisc not added (present already?)");
    }
    let prog = egress_program(ebpf)?;
    let earlier = SchedClassifierLink::attached(
        port,
        TcAttachType::Egress,
        EGRESS_PRIORITY,
        EGRESS_HANDLE,
        None,
    );
    let (id, how) = match earlier
        .map_err(|e| e.to_string())
        .and_then(|l| prog.attach_to_link(l).map_err(|e| e.to_string()))
    {
        Ok(id) => (id, Attachment::Replaced),
        Err(_) => {
            let options = TcAttachOptions::Netlink(NlOptions {
                priority: EGRESS_PRIORITY,
                handle: EGRESS_HANDLE,
                ..NlOptions::default()
            });
            let id = prog
                .attach_with_options(port, TcAttachType::Egress, options)
                .map_err(err("tc egress attach"))?;
            (id, Attachment::Attached(XdpMode::Skb))
        }
    };
    let link = prog.take_link(id).map_err(err("take link"))?;
    // Dropping the link would detach the filter; it must outlive the agent.
    std::mem::forget(link);
    Ok(how)
}

fn replace_in_pinned_link(prog: &mut Xdp, pin: &Path) -> Result<(), String> {
    let pinned = PinnedLink::from_pin(pin).map_err(|e| e.to_string())?;
    let link =
        aya::programs::xdp::XdpLink::try_from(FdLink::from(pinned)).map_err(|e| e.to_string())?;
    prog.attach_to_link(link).map_err(|e| e.to_string())?;
    Ok(())
}

/// Removes pins of `port` for other ifindexes (a recreated interface).
fn remove_stale_link_pins(
    layout: &PinLayout,
    port: &str,
    keep: &Path,
) -> Result<(), DataplaneError> {
    let dir = layout.links();
    let rd = std::fs::read_dir(&dir)
        .map_err(|source| DataplaneError::PinDir { path: dir.clone(), source })?;
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let same_port = name.rsplit_once('@').is_some_and(|(n, _)| n == port);
        if p != keep && same_port {
            warn!(pin = %p.display(), "removing stale link pin");
            std::fs::remove_file(&p)
                .map_err(|source| DataplaneError::PinDir { path: p.clone(), source })?;
        }
    }
    Ok(())
}

/// Removes the boundary: forwarding off first (so nothing crosses once the
/// programs are gone), then every link pin (detaching the programs), then the
/// map pins. The agent daemon must be stopped: it holds the links open.
pub fn detach(cfg: &AgentConfig, force: bool) -> Result<usize, DataplaneError> {
    let layout = cfg.pins();
    if !force {
        check_pins_are_here(&layout)?;
    }
    netif::set_forwarding(false)?;
    for p in cfg.ports.iter().filter(|p| p.role == crate::config::Role::Management) {
        match tc::qdisc_detach_program(
            &p.name,
            TcAttachType::Egress,
            program_names::MANAGEMENT_EGRESS,
        ) {
            Ok(()) => info!(port = %p.name, "management egress guard removed"),
            Err(e) => warn!(port = %p.name, error = %e, "no management egress guard removed"),
        }
    }
    let mut removed = 0;
    for dir in [layout.links(), layout.maps()] {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(DataplaneError::PinDir { path: dir, source }),
        };
        for e in rd.flatten() {
            std::fs::remove_file(e.path())
                .map_err(|source| DataplaneError::PinDir { path: e.path(), source })?;
            removed += 1;
        }
    }
    for dir in [layout.links(), layout.maps(), layout.root.clone(), layout.base().to_owned()] {
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EBUSY)) => {}
            Err(source) => return Err(DataplaneError::PinDir { path: dir, source }),
        }
    }
    Ok(removed)
}

/// Refuses when a link pin names a port whose ifindex differs here: the caller
/// is in another network namespace, and switching forwarding off *here* while
/// unpinning the appliance's links would leave the appliance forwarding with
/// no program.
fn check_pins_are_here(layout: &PinLayout) -> Result<(), DataplaneError> {
    let dir = layout.links();
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(DataplaneError::PinDir { path: dir, source }),
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((port, idx)) = name.rsplit_once('@') else { continue };
        let here = netif::ifindex(port).ok().map(|i| i.to_string());
        if here.as_deref() != Some(idx) {
            let detail = match here {
                Some(i) => format!("{port} is ifindex {i} here, the pin says {idx}"),
                None => format!("no interface {port} here"),
            };
            return Err(DataplaneError::WrongNamespace { pins: dir, detail });
        }
    }
    Ok(())
}
