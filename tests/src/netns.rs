//! [`NetNs`]: a named network namespace that is deleted when dropped.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    thread::JoinHandle,
};

use crate::{cmd, names, Error, Result};

/// A named network namespace (`ip netns add`), deleted on drop, also when a
/// test panics. Its loopback is up.
///
/// Code runs inside it in two ways: [`NetNs::run`] / [`NetNs::spawn`] run a
/// closure on a thread that has entered the namespace (std sockets created
/// there stay in it, even when used from other threads later), and
/// [`NetNs::exec`] runs a program in it.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
    /// Delete on drop (false once detached, or for namespaces only looked at).
    owned: bool,
}

impl NetNs {
    /// Creates the namespace `name`; fails if it exists.
    pub fn create(name: &str) -> Result<Self> {
        if names::namespace_exists(name) {
            return Err(Error::NamespaceExists(name.to_owned()));
        }
        cmd::ip(&["netns", "add", name])?;
        let ns = NetNs { name: name.to_owned(), path: Self::path_of(name), owned: true };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Creates a namespace with a fresh name (`<unique prefix>-ns`).
    pub fn unique() -> Result<Self> {
        Self::create(&names::namespace_name(&names::unique_prefix(), "ns"))
    }

    /// A handle on an existing namespace that is NOT deleted on drop.
    pub fn existing(name: &str) -> Self {
        NetNs { name: name.to_owned(), path: Self::path_of(name), owned: false }
    }

    fn path_of(name: &str) -> PathBuf {
        Path::new(names::NETNS_DIR).join(name)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME` (what `nsenter --net=` and `setns` take).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the namespace still exists.
    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Runs `f` on a new thread inside the namespace and returns its result.
    /// A panic in `f` is resumed in the caller (so assertions work inside).
    pub fn run<F, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let path = &self.path;
        std::thread::scope(|s| {
            let handle = std::thread::Builder::new()
                .name(format!("netns:{}", self.name))
                .spawn_scoped(s, move || enter(path).map(|()| f()))
                .map_err(|source| Error::Thread { ns: self.name.clone(), source })?;
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Starts `f` on a new thread inside the namespace (a server, say).
    /// The handle's result is an error if the thread could not enter it.
    pub fn spawn<F, T>(&self, f: F) -> Result<JoinHandle<Result<T>>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let path = self.path.clone();
        std::thread::Builder::new()
            .name(format!("netns:{}", self.name))
            .spawn(move || enter(&path).map(|()| f()))
            .map_err(|source| Error::Thread { ns: self.name.clone(), source })
    }

    /// Runs `program args...` in the namespace (`ip netns exec`); its stdout,
    /// or an error with its stderr. Note that `ip netns exec` remounts /sys:
    /// start the agent with [`crate::Agent`] (nsenter), not with this.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        cmd::output(Command::new("ip").args(["netns", "exec", &self.name, program]).args(args))
    }

    /// `ip -n NAME args...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        cmd::ip_in(&self.name, args)
    }

    /// Sets sysctls in the namespace.
    pub fn sysctl(&self, settings: &[(&str, &str)]) -> Result<()> {
        cmd::sysctl_in(&self.name, settings)
    }

    /// Reads one sysctl in the namespace (`net.ipv4.ip_forward` → `"0"`).
    pub fn read_sysctl(&self, key: &str) -> Result<String> {
        Ok(self.exec("sysctl", &["-n", key])?.trim().to_owned())
    }

    /// Keeps the namespace after this handle is dropped; returns its name.
    pub fn into_detached(mut self) -> String {
        self.owned = false;
        std::mem::take(&mut self.name)
    }

    /// Deletes the namespace now, reporting failure (drop only logs it).
    pub fn delete(mut self) -> Result<()> {
        self.owned = false;
        delete(&self.name)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if self.owned {
            if let Err(e) = delete(&self.name) {
                eprintln!("airlock-testbed: cannot delete namespace {}: {e}", self.name);
            }
        }
    }
}

/// `ip netns del NAME` unless it is gone already.
pub(crate) fn delete(name: &str) -> Result<()> {
    if !names::namespace_exists(name) {
        return Ok(());
    }
    cmd::ip(&["netns", "del", name]).map(drop)
}

/// Moves the calling thread into the namespace at `path`.
fn enter(path: &Path) -> Result<()> {
    let setns_err = |source| Error::Setns { path: path.to_owned(), source };
    let file = File::open(path).map_err(setns_err)?;
    // SAFETY: setns only reads the descriptor, which `file` keeps open for the
    // duration of the call; CLONE_NEWNET affects only the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(setns_err(std::io::Error::last_os_error()));
    }
    Ok(())
}
