//! `cargo xtask dist`: the Debian package, built with `dpkg-deb` from the release binary and
//! the files under `packaging/`.
//!
//! Debian already ships a package `tcptrace` (the classic tcpdump-output analyzer, also
//! `/usr/bin/tcptrace`): this one is `tcptrace-ebpf`, and it declares `Conflicts` and
//! `Replaces` on it, so that installing one announces the removal of the other.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{capture, root, run};

/// The package's name (see the module's documentation).
pub const PACKAGE: &str = "tcptrace-ebpf";
/// Where packages are written, under the workspace root.
const DIST_DIR: &str = "target/dist";
/// The shells whose completions are installed, and where each looks for them.
const COMPLETIONS: [(&str, &str); 3] = [
    ("bash", "usr/share/bash-completion/completions/tcptrace"),
    ("zsh", "usr/share/zsh/vendor-completions/_tcptrace"),
    ("fish", "usr/share/fish/vendor_completions.d/tcptrace.fish"),
];
/// Files of `packaging/` and where they go, with their modes.
const PACKAGED: [(&str, &str, u32); 5] = [
    (
        "tcptrace.service",
        "lib/systemd/system/tcptrace.service",
        0o644,
    ),
    ("default", "etc/default/tcptrace", 0o644),
    ("deb/postinst", "DEBIAN/postinst", 0o755),
    ("deb/prerm", "DEBIAN/prerm", 0o755),
    ("deb/postrm", "DEBIAN/postrm", 0o755),
];
/// The package's configuration folder, under the tree's root.
const CONFIG_DIR: &str = "etc/tcptrace";
/// Configuration files: kept across upgrades when the admin changed them.
const CONFFILES: [&str; 1] = ["/etc/default/tcptrace"];

/// Writes the `.deb` of `bin` (a release build) under `target/dist/`; returns its path.
pub fn dist(bin: &Path) -> Result<PathBuf> {
    let version = binary_version(bin)?;
    let arch = capture(Command::new("dpkg").arg("--print-architecture"))
        .context("dpkg names the architecture (dpkg-deb builds the package)")?
        .trim()
        .to_string();
    let dist = root().join(DIST_DIR);
    let tree = dist.join("deb-root");
    if tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    }
    install(bin, &tree.join("usr/bin/tcptrace"), 0o755)?;
    // Where an admin puts a web config and its key (the group is the service's, set when
    // its user exists).
    fs::create_dir_all(tree.join(CONFIG_DIR))?;
    fs::set_permissions(tree.join(CONFIG_DIR), fs::Permissions::from_mode(0o750))?;
    for (from, to, mode) in PACKAGED {
        install(&root().join("packaging").join(from), &tree.join(to), mode)?;
    }
    man_pages(bin, &tree.join("usr/share/man/man1"))?;
    completions(bin, &tree)?;
    write(
        &tree.join(format!("usr/share/doc/{PACKAGE}/copyright")),
        COPYRIGHT,
        0o644,
    )?;
    let conffiles: String = CONFFILES.iter().map(|f| format!("{f}\n")).collect();
    write(&tree.join("DEBIAN/conffiles"), &conffiles, 0o644)?;
    let control = control(&version, &arch, &depends(bin)?, installed_kib(&tree)?);
    write(&tree.join("DEBIAN/control"), &control, 0o644)?;
    let deb = dist.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&tree)
        .arg(&deb))?;
    Ok(deb)
}

/// The version `bin --version` prints ("tcptrace 0.1.0").
fn binary_version(bin: &Path) -> Result<String> {
    let out = capture(Command::new(bin).arg("--version"))?;
    match out.split_whitespace().collect::<Vec<_>>()[..] {
        ["tcptrace", v] => Ok(v.to_string()),
        _ => bail!("{} --version printed {out:?}", bin.display()),
    }
}

/// Copies `from` to `to` (creating its folder) with `mode`.
fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write_bytes(to, &bytes, mode)
}

fn write(to: &Path, text: &str, mode: u32) -> Result<()> {
    write_bytes(to, text.as_bytes(), mode)
}

fn write_bytes(to: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(to, bytes).with_context(|| format!("writing {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", to.display()))
}

/// The man pages `bin man-pages` writes, compressed as Debian installs them.
fn man_pages(bin: &Path, dir: &Path) -> Result<()> {
    run(Command::new(bin).arg("man-pages").arg(dir))?;
    for page in fs::read_dir(dir)? {
        let page = page?.path();
        fs::set_permissions(&page, fs::Permissions::from_mode(0o644))?;
        capture(Command::new("gzip").args(["-9", "-n", "-f"]).arg(&page))?;
    }
    Ok(())
}

/// Each shell's completions, as `bin completions SHELL` prints them.
fn completions(bin: &Path, tree: &Path) -> Result<()> {
    for (shell, path) in COMPLETIONS {
        let script = capture(Command::new(bin).args(["completions", shell]))?;
        write(&tree.join(path), &script, 0o644)?;
    }
    Ok(())
}

/// The libraries the binary links, as package dependencies: the C library at the newest
/// symbol version it uses, and GCC's runtime when linked.
fn depends(bin: &Path) -> Result<String> {
    let symbols = capture(Command::new("objdump").arg("-T").arg(bin))
        .context("objdump (binutils) lists the binary's dynamic symbols")?;
    let glibc = newest_glibc(&symbols)
        .with_context(|| format!("{} uses no versioned C library symbol", bin.display()))?;
    // passwd: the maintainer scripts create the service's user and group.
    let mut deps = format!("libc6 (>= {}.{}), passwd", glibc.0, glibc.1);
    if symbols.contains("GCC_") {
        deps.push_str(", libgcc-s1");
    }
    Ok(deps)
}

/// The newest `GLIBC_x.y` symbol version in `objdump -T`'s output.
fn newest_glibc(symbols: &str) -> Option<(u32, u32)> {
    symbols
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut parts = v.split('.');
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next()?.parse().ok()?;
            Some((major, minor))
        })
        .max()
}

/// The size of the installed files, in KiB, as `Installed-Size` wants it.
fn installed_kib(tree: &Path) -> Result<u64> {
    fn bytes(dir: &Path) -> Result<u64> {
        let mut total = 0;
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            total += if meta.is_dir() {
                bytes(&entry.path())?
            } else {
                meta.len()
            };
        }
        Ok(total)
    }
    Ok(bytes(tree)?.div_ceil(1024))
}

/// The package's control file.
fn control(version: &str, arch: &str, depends: &str, installed_kib: u64) -> String {
    format!(
        "Package: {PACKAGE}
Version: {version}
Architecture: {arch}
Maintainer: tcptrace developers <tcptrace@users.noreply.github.com>
Installed-Size: {installed_kib}
Depends: {depends}
Conflicts: tcptrace
Replaces: tcptrace
Section: net
Priority: optional
Description: eBPF tracer of TCP state transitions: who closes first, TIME_WAIT, ports
 tcptrace traces every TCP socket's state transitions with eBPF and tells which
 side closes each connection first (only that side holds TIME_WAIT), on which
 ports, for which process and container, how long sockets sit in TIME_WAIT and
 in each state. It streams, reports, draws histograms, and exports Prometheus
 metrics (tcptrace.service runs `tcptrace serve`; flags in /etc/default/tcptrace).
 .
 This is not Debian's `tcptrace` (the analyzer of tcpdump files), whose command
 it replaces.
"
    )
}

const COPYRIGHT: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: tcptrace
License: MIT OR Apache-2.0

Files: *
Copyright: tcptrace developers
License: MIT OR Apache-2.0
 Licensed under either of the Apache License, Version 2.0 or the MIT license, at
 your option.
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_glibc_version_wins() {
        let symbols = "0000 DF *UND* 0000 (GLIBC_2.2.5) memcpy
0000 DF *UND* 0000 (GLIBC_2.34) __libc_start_main
0000 DF *UND* 0000 (GLIBC_2.14) memcpy
0000 DF *UND* 0000 (GCC_3.0) _Unwind_Resume";
        assert_eq!(newest_glibc(symbols), Some((2, 34)));
        assert_eq!(newest_glibc("no versions here"), None);
    }

    #[test]
    fn the_control_file_names_the_package_and_its_conflict() {
        let c = control("1.2.3", "amd64", "libc6 (>= 2.34)", 7000);
        for line in [
            "Package: tcptrace-ebpf",
            "Version: 1.2.3",
            "Conflicts: tcptrace",
            "Replaces: tcptrace",
            "Depends: libc6 (>= 2.34)",
            "Installed-Size: 7000",
        ] {
            assert!(c.lines().any(|l| l == line), "{line} in {c}");
        }
        // Every continuation line of the description starts with a space.
        let description = c.split("Description:").nth(1).unwrap();
        assert!(description.lines().skip(1).all(|l| l.starts_with(' ')));
    }
}
