//! Builds the eBPF program (`tcptrace-ebpf`) for the BPF target with the nightly toolchain
//! and bpf-linker, so that `cargo build -p tcptrace` yields one self-contained binary.
//! `cargo xtask setup` installs what this needs.
use std::{env, path::PathBuf};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=TCPTRACE_TOOLS_DIR");
    println!("cargo:rerun-if-env-changed=PATH");
    if which("bpf-linker").is_none() {
        // `cargo xtask setup` installs bpf-linker into the per-user tools directory; find it
        // there so a plain `cargo build` works without touching PATH.
        let bin = tools_dir().join("bin");
        if !bin.join("bpf-linker").is_file() {
            bail!(
                "bpf-linker was not found on PATH nor in {}.\n\
                 Run `cargo xtask setup` once: it installs bpf-linker and the nightly rust-src \
                 that the eBPF side needs.",
                bin.display()
            );
        }
        let path = env::var_os("PATH").unwrap_or_default();
        let joined = env::join_paths(std::iter::once(bin).chain(env::split_paths(&path)))
            .context("PATH contains an invalid entry")?;
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { env::set_var("PATH", joined) };
    }
    // aya-build relays every line the nested cargo prints as a `cargo:warning`: a first
    // build showed dozens of "Compiling core…" warnings, later ones a "Finished" one. Quiet,
    // that cargo prints only what matters (errors, and the compiler's real warnings).
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
    let ebpf = aya_build::Package {
        name: "tcptrace-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../tcptrace-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
        .context("building the eBPF program failed (try `cargo xtask setup`)")
}

/// Where `cargo xtask setup` puts the tools it builds (keep in sync with xtask's `tools_dir`).
fn tools_dir() -> PathBuf {
    if let Some(dir) = env::var_os("TCPTRACE_TOOLS_DIR") {
        return dir.into();
    }
    let data = env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    data.join("tcptrace-dev/tools")
}

fn which(cmd: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}
