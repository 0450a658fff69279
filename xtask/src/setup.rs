//! `cargo xtask setup`: everything the build and the tests need, from a machine that only has
//! rustup with the `stable` and `nightly` toolchains. Idempotent: a second run checks and
//! changes nothing.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{capture, run};

/// The bpf-linker release that builds against the nightly toolchain's LLVM here.
const BPF_LINKER: &str = "0.13.0";

/// Where the project's tools live. Keep in sync with `tools_dir` in `tcptrace/build.rs`.
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = env::var_os("TCPTRACE_TOOLS_DIR") {
        return dir.into();
    }
    let data = env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    data.join("tcptrace-dev/tools")
}

/// PATH with the tools' bin directory first.
pub fn tools_path() -> Result<std::ffi::OsString> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::join_paths(std::iter::once(tools_dir().join("bin")).chain(env::split_paths(&path)))
        .context("PATH has an entry that cannot be joined")
}

/// Runs every step; `quiet` prints only what it changes.
pub fn setup(quiet: bool) -> Result<()> {
    let say = |msg: String| {
        if !quiet {
            println!("{msg}");
        }
    };
    if capture(Command::new("rustup").arg("--version")).is_err() {
        bail!(
            "rustup was not found on PATH. tcptrace's eBPF side needs rustup's nightly \
             toolchain: install rustup (https://rustup.rs) and run `cargo xtask setup` again."
        );
    }
    let nightly = nightly_version()?;
    say(format!(
        "✓ nightly toolchain ({})",
        nightly.lines().next().unwrap_or("?")
    ));
    rust_src(&say)?;
    bpf_linker(&nightly, &say)?;
    system_tools(&say)?;
    Ok(())
}

/// `rustc -vV` of the nightly toolchain, installing the toolchain if it is missing.
fn nightly_version() -> Result<String> {
    let vv = || capture(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]));
    if let Ok(v) = vv() {
        return Ok(v);
    }
    println!("nightly toolchain missing: installing it");
    run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))
        .context(
        "the nightly toolchain is required to build the eBPF program and could not be \
             installed; install it with `rustup toolchain install nightly` (network needed)",
    )?;
    vv().context("the nightly toolchain was installed but `rustc -vV` fails")
}

fn rust_src(say: &dyn Fn(String)) -> Result<()> {
    let installed = capture(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        say("✓ rust-src (nightly)".into());
        return Ok(());
    }
    println!("installing rust-src for nightly (needed for -Z build-std=core)");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context(
            "could not add rust-src to the nightly toolchain; check the network and run \
             `rustup component add rust-src --toolchain nightly`",
        )
}

/// The stamp that says which bpf-linker was built against which nightly.
fn stamp_text(nightly: &str) -> String {
    format!("bpf-linker {BPF_LINKER}\n{nightly}")
}

/// The libLLVM shared object of a toolchain's `lib` directory: `libLLVM.so.<version>`
/// preferred, else `libLLVM-<major>-….so`.
pub fn pick_libllvm<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let names: Vec<&str> = names.into_iter().collect();
    names
        .iter()
        .find(|n| n.starts_with("libLLVM.so."))
        .or_else(|| {
            names
                .iter()
                .find(|n| n.starts_with("libLLVM-") && n.ends_with(".so"))
        })
        .copied()
}

fn bpf_linker(nightly: &str, say: &dyn Fn(String)) -> Result<()> {
    let tools = tools_dir();
    let bin = tools.join("bin/bpf-linker");
    let stamp = tools.join("bpf-linker.stamp");
    let works = capture(Command::new(&bin).arg("--version")).is_ok_and(|v| v.contains(BPF_LINKER));
    if works && fs::read_to_string(&stamp).is_ok_and(|s| s == stamp_text(nightly)) {
        say(format!("✓ bpf-linker {BPF_LINKER} ({})", bin.display()));
        return Ok(());
    }
    println!(
        "building bpf-linker {BPF_LINKER} against the nightly toolchain's LLVM into {} (about a minute)",
        tools.display()
    );
    let sysroot =
        capture(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let names: Vec<String> = fs::read_dir(&lib)
        .with_context(|| format!("cannot list {}", lib.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    let Some(llvm) = pick_libllvm(names.iter().map(String::as_str)) else {
        bail!(
            "no libLLVM shared object in {}: the nightly toolchain should ship one \
             (try `rustup update nightly`)",
            lib.display()
        );
    };
    let prefix = tools.join("llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    for link in ["libLLVM.so", llvm] {
        let at = prefix_lib.join(link);
        let _ = fs::remove_file(&at);
        std::os::unix::fs::symlink(lib.join(llvm), &at)
            .with_context(|| format!("cannot link {}", at.display()))?;
    }
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "stable",
        "cargo",
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER,
    ])
    .args(["--locked", "--force", "--root"])
    .arg(&tools)
    .env("LLVM_PREFIX", &prefix);
    // `cargo run` of xtask leaks its own build settings into the environment.
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_") && k != "CARGO_HOME"
            || [
                "RUSTC",
                "RUSTC_WRAPPER",
                "RUSTC_WORKSPACE_WRAPPER",
                "RUSTFLAGS",
                "RUSTUP_TOOLCHAIN",
            ]
            .contains(&k.as_ref())
        {
            cmd.env_remove(k.as_ref());
        }
    }
    run(&mut cmd).context(
        "building bpf-linker failed; it needs the network to fetch its sources from the \
         Rust package registry",
    )?;
    let v = capture(Command::new(&bin).arg("--version"))
        .context("bpf-linker was built but does not run")?;
    fs::write(&stamp, stamp_text(nightly))
        .with_context(|| format!("cannot write {}", stamp.display()))?;
    println!("✓ {} ({})", v.trim(), bin.display());
    Ok(())
}

/// iproute2 for the network-namespace tests, Prometheus for the exporter's end-to-end test
/// (Debian's package; its service is not started in a container, and the test runs its own),
/// tmux for `tcptrace top`'s.
fn system_tools(say: &dyn Fn(String)) -> Result<()> {
    let missing: Vec<&str> = [
        ("ip", &["-V"][..], "iproute2"),
        ("prometheus", &["--version"], "prometheus"),
        ("nft", &["--version"], "nftables"),
        // The real-software suite's servers and clients.
        ("nginx", &["-v"], "nginx-light"),
        ("redis-server", &["--version"], "redis-server"),
        ("redis-benchmark", &["--version"], "redis-tools"),
        ("ab", &["-V"], "apache2-utils"),
        ("curl", &["--version"], "curl"),
        // The terminal that `tcptrace top`'s test draws in.
        ("tmux", &["-V"], "tmux"),
        // The package test verifies the service unit.
        ("systemd-analyze", &["--version"], "systemd"),
        // The scripted peers (Debian's python, whatever `python3` is first on PATH).
        (
            "/usr/bin/python3",
            &["-c", "import scapy.all"],
            "python3-scapy",
        ),
    ]
    .into_iter()
    .filter(|(cmd, args, _)| capture(Command::new(cmd).args(*args)).is_err())
    .map(|(_, _, pkg)| pkg)
    .collect();
    if missing.is_empty() {
        say(
            "✓ iproute2, prometheus, nftables, nginx, redis, ab, curl, tmux, scapy, systemd-analyze"
                .into(),
        );
        return Ok(());
    }
    if !crate::is_root() || capture(Command::new("apt-get").arg("--version")).is_err() {
        println!(
            "! missing {} (the namespace, Prometheus, retransmission, real-software and top \
             tests need them): install with your package manager",
            missing.join(", ")
        );
        return Ok(());
    }
    println!("installing {}", missing.join(", "));
    run(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    // The servers are for the tests to start in their own namespaces: the packages must not
    // start them on the host (Debian's policy-rc.d convention; one already there stays).
    let _guard = NoServiceStarts::new()?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("apt-get could not install {}", missing.join(", ")))
}

/// While it lives, package scripts may not start services (`/usr/sbin/policy-rc.d` exits
/// 101); it removes only the file it wrote.
struct NoServiceStarts(Option<PathBuf>);

impl NoServiceStarts {
    const PATH: &str = "/usr/sbin/policy-rc.d";

    /// What marks the file as this guard's.
    const MARK: &str = "# Written by cargo xtask setup while it installs.";

    fn new() -> Result<Self> {
        let path = Path::new(Self::PATH);
        // One left by an interrupted run (Ctrl-C kills without unwinding) goes first.
        if fs::read_to_string(path).is_ok_and(|t| t.contains(Self::MARK)) {
            fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        }
        if path.exists() {
            return Ok(NoServiceStarts(None));
        }
        fs::write(path, format!("#!/bin/sh\n{}\nexit 101\n", Self::MARK))
            .with_context(|| format!("writing {}", path.display()))?;
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
        Ok(NoServiceStarts(Some(path.to_path_buf())))
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_versioned_libllvm() {
        let names = [
            "librustc_driver-x.so",
            "libLLVM-22-rust-1.97.0-nightly.so",
            "libLLVM.so.22.1-rust-1.97.0-nightly",
        ];
        assert_eq!(
            pick_libllvm(names),
            Some("libLLVM.so.22.1-rust-1.97.0-nightly")
        );
        assert_eq!(
            pick_libllvm(["libLLVM-22-rust-1.97.0-nightly.so"]),
            Some("libLLVM-22-rust-1.97.0-nightly.so")
        );
        assert_eq!(pick_libllvm(["librustc_driver.so"]), None);
    }

    #[test]
    fn the_stamp_names_linker_and_toolchain() {
        let a = stamp_text("rustc 1.97.0-nightly (e50aa6fba 2026-05-19)");
        assert!(a.contains(BPF_LINKER) && a.contains("e50aa6fba"));
        assert_ne!(a, stamp_text("rustc 1.98.0-nightly"));
    }
}
