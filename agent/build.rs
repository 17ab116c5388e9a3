//! Builds the XDP programs for bpfel-unknown-none (nightly, build-std=core,
//! bpf-linker) and leaves the object in OUT_DIR for `include_bytes_aligned!`.
use anyhow::{anyhow, Context as _};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest)
        .parent()
        .ok_or_else(|| anyhow!("agent has no parent dir"))?
        .join("ebpf/programs");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    // The programs depend on the common crate too.
    println!("cargo:rerun-if-changed={root}/../common/src");
    aya_build::build_ebpf(
        [aya_build::Package { name: "airlock-ebpf", root_dir: root, ..Default::default() }],
        Toolchain::default(),
    )
}
