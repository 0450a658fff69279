//! Root-only: the Debian package that `cargo xtask dist` writes (named by `TCPTRACE_DEB`,
//! which `cargo xtask test` sets after building it; else the newest under `target/dist`).
//! Its contents and control fields; its unit as `systemd-analyze verify` reads it; an
//! install with `dpkg -i`; `tcptrace check` and a scraped `tcptrace serve` as the service's
//! user with the unit's capabilities and nothing else; a purge that leaves no file behind.

mod common;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use common::{root_or_skip, sample, scrape, serve_from};

/// The package's name, and the system user its unit runs as.
const PACKAGE: &str = "tcptrace-ebpf";
const SERVICE_USER: &str = "tcptrace";
const UNIT: &str = "/lib/systemd/system/tcptrace.service";
const DEFAULTS: &str = "/etc/default/tcptrace";
const BINARY: &str = "/usr/bin/tcptrace";
const CONFIG_DIR: &str = "/etc/tcptrace";
/// The capabilities tracing needs (README, Requirements), and no more.
const CAPABILITIES: [&str; 4] = [
    "CAP_BPF",
    "CAP_PERFMON",
    "CAP_SYSLOG",
    "CAP_DAC_READ_SEARCH",
];
/// Files the package must install, with their modes as `dpkg-deb -c` shows them.
const FILES: [(&str, &str); 9] = [
    ("./usr/bin/tcptrace", "-rwxr-xr-x"),
    ("./lib/systemd/system/tcptrace.service", "-rw-r--r--"),
    ("./etc/default/tcptrace", "-rw-r--r--"),
    ("./usr/share/man/man1/tcptrace.1.gz", "-rw-r--r--"),
    ("./usr/share/man/man1/tcptrace-serve.1.gz", "-rw-r--r--"),
    (
        "./usr/share/bash-completion/completions/tcptrace",
        "-rw-r--r--",
    ),
    ("./usr/share/zsh/vendor-completions/_tcptrace", "-rw-r--r--"),
    (
        "./usr/share/fish/vendor_completions.d/tcptrace.fish",
        "-rw-r--r--",
    ),
    ("./usr/share/doc/tcptrace-ebpf/copyright", "-rw-r--r--"),
];

#[test]
fn the_debian_package_installs_a_least_privileged_service_and_purges_cleanly() {
    if !root_or_skip("the_debian_package_installs_a_least_privileged_service_and_purges_cleanly") {
        return;
    }
    let Some(deb) = package() else {
        return;
    };
    check_control(&deb);
    check_contents(&deb);
    let installed = Installed::new(&deb);
    check_unit();
    check_extras();
    check_as_service_user();
    installed.purge();
    for gone in [BINARY, UNIT, DEFAULTS] {
        assert!(!Path::new(gone).exists(), "{gone} is left after the purge");
    }
}

/// The package to test; `None` (skipped, said) when there is none outside CI.
fn package() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TCPTRACE_DEB") {
        return Some(PathBuf::from(p));
    }
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dist");
    let newest = std::fs::read_dir(&dist)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".deb"))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
    if let Some(e) = newest {
        return Some(e.path());
    }
    assert!(
        !std::env::var("CI").is_ok_and(|v| v == "true"),
        "no package to test under CI=true: `cargo xtask test` builds one (cargo xtask dist)"
    );
    eprintln!("SKIPPED the package test: no package (run `cargo xtask dist`)");
    None
}

/// Runs `cmd`, returning its output; panics naming it when it cannot start.
fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `cmd`, which must succeed; returns its stdout.
fn stdout(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The name and the conflict with Debian's own `tcptrace` (the tcpdump analyzer, which
/// ships `/usr/bin/tcptrace` too): announced, never overwritten silently.
fn check_control(deb: &Path) {
    let fields = stdout(Command::new("dpkg-deb").arg("-f").arg(deb).args([
        "Package",
        "Conflicts",
        "Replaces",
        "Depends",
    ]));
    for want in [
        format!("Package: {PACKAGE}"),
        "Conflicts: tcptrace".into(),
        "Replaces: tcptrace".into(),
    ] {
        assert!(fields.lines().any(|l| l == want), "{want} in\n{fields}");
    }
    assert!(
        fields.contains("libc6 (>= 2."),
        "depends on the C library: {fields}"
    );
    assert!(
        fields.contains("passwd"),
        "its scripts need useradd: {fields}"
    );
    let conffiles = stdout(Command::new("dpkg-deb").arg("-I").arg(deb).arg("conffiles"));
    assert_eq!(conffiles.trim(), DEFAULTS, "the flags are a conffile");
}

/// Every file the package must hold, with its mode; all root's, none writable by others.
fn check_contents(deb: &Path) {
    let listing = stdout(Command::new("dpkg-deb").arg("-c").arg(deb));
    let entries: Vec<(&str, &str, &str)> = listing
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((*f.first()?, *f.get(1)?, *f.last()?))
        })
        .collect();
    for (path, mode) in FILES {
        assert!(
            entries.iter().any(|e| e.2 == path && e.0 == mode),
            "{path} with mode {mode} in\n{listing}"
        );
    }
    for (mode, owner, path) in &entries {
        assert_eq!(*owner, "root/root", "{path} belongs to root");
        assert_ne!(&mode[8..9], "w", "{path} is writable by any user");
    }
}

/// The package installed for the test: purged (and its user removed, if the test made it)
/// whatever happens.
struct Installed {
    user_was_there: bool,
}

impl Installed {
    fn new(deb: &Path) -> Installed {
        let status = output(Command::new("dpkg-query").args(["-W", "-f=${Status}", PACKAGE]));
        assert!(
            !String::from_utf8_lossy(&status.stdout).contains("installed"),
            "{PACKAGE} is already installed here: the test would remove it"
        );
        assert!(
            !Path::new(BINARY).exists(),
            "{BINARY} exists (Debian's tcptrace?): installing would replace it"
        );
        let user_was_there = user_exists();
        let installed = Installed { user_was_there };
        stdout(Command::new("dpkg").arg("-i").arg(deb));
        installed
    }

    fn purge(self) {
        drop(self);
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let out = output(Command::new("dpkg").args(["--purge", PACKAGE]));
        if !out.status.success() {
            eprintln!("dpkg --purge: {}", String::from_utf8_lossy(&out.stderr));
        }
        if !self.user_was_there && user_exists() {
            let _ = Command::new("userdel").arg(SERVICE_USER).status();
        }
    }
}

fn user_exists() -> bool {
    output(Command::new("getent").args(["passwd", SERVICE_USER]))
        .status
        .success()
}

/// The unit as installed: hardened as the issue asks, and clean for `systemd-analyze
/// verify` (which only warns, so any word it says is a failure).
fn check_unit() {
    let unit = std::fs::read_to_string(UNIT).expect("the unit is installed");
    for line in [
        &format!("User={SERVICE_USER}"),
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_NETLINK AF_UNIX",
        "EnvironmentFile=-/etc/default/tcptrace",
        "ExecStart=/usr/bin/tcptrace serve $TCPTRACE_SERVE_ARGS",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} in {UNIT}");
    }
    // ProtectKernelLogs takes CAP_SYSLOG away: no tw_timer_handler, no TIME_WAIT exits.
    assert!(
        !unit.lines().any(|l| l.starts_with("ProtectKernelLogs=")),
        "{UNIT} keeps CAP_SYSLOG"
    );
    let want: BTreeSet<&str> = CAPABILITIES.into_iter().collect();
    for key in ["AmbientCapabilities", "CapabilityBoundingSet"] {
        assert_eq!(unit_capabilities(&unit, key), want, "{key} in {UNIT}");
    }
    let verify = output(Command::new("systemd-analyze").args(["verify", UNIT]));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        verify.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {UNIT}: {said}"
    );
    let user = stdout(Command::new("getent").args(["passwd", SERVICE_USER]));
    assert!(
        user.trim_end().ends_with(":/usr/sbin/nologin"),
        "a system user without a login: {user}"
    );
}

/// The capability names of `key`'s line in `unit`.
fn unit_capabilities<'a>(unit: &'a str, key: &str) -> BTreeSet<&'a str> {
    unit.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_default()
        .split_whitespace()
        .collect()
}

/// Man pages and completions, installed where man and each shell find them.
fn check_extras() {
    // Where a web config and its key go: the service's group reads it, nobody else.
    let dir = stdout(Command::new("stat").args(["-c", "%a %U %G", CONFIG_DIR]));
    assert_eq!(
        dir.trim(),
        format!("750 root {SERVICE_USER}"),
        "{CONFIG_DIR}"
    );
    let page = stdout(Command::new("zcat").arg("/usr/share/man/man1/tcptrace-serve.1.gz"));
    assert!(page.contains(".TH"), "a man page: {page:.200}");
    for (file, mark) in [
        (
            "/usr/share/bash-completion/completions/tcptrace",
            "complete -F",
        ),
        (
            "/usr/share/zsh/vendor-completions/_tcptrace",
            "#compdef tcptrace",
        ),
        (
            "/usr/share/fish/vendor_completions.d/tcptrace.fish",
            "complete -c tcptrace",
        ),
    ] {
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(text.contains(mark), "{file} holds {mark}");
    }
}

/// `setpriv` as the unit runs the exporter: its user, its four capabilities (inheritable,
/// ambient and bounding), no new privileges.
fn as_service_user() -> Command {
    let caps: Vec<String> = CAPABILITIES
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let set = format!("-all,{}", caps.join(","));
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={SERVICE_USER}"),
        &format!("--regid={SERVICE_USER}"),
        "--clear-groups",
        "--no-new-privs",
        &format!("--inh-caps={set}"),
        &format!("--ambient-caps={set}"),
        &format!("--bounding-set={set}"),
        BINARY,
    ]);
    cmd
}

/// `tcptrace check` passes, and the exporter serves real metrics, with the unit's
/// privileges only.
fn check_as_service_user() {
    let check = output(as_service_user().arg("check"));
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && text.contains("tcptrace can run here."),
        "tcptrace check as {SERVICE_USER}: {text}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with('✓') && l.contains("load and attach")),
        "the programs load as {SERVICE_USER}: {text}"
    );
    // The iterator over every task's files sees every process's sockets, where /proc/*/fd
    // would need CAP_SYS_PTRACE for other users' processes. It is one of the BTF programs:
    // where check says the classic programs run, owners come from /proc/*/fd instead.
    let btf_programs = text.lines().any(|l| {
        l.starts_with('✓') && l.contains("load and attach") && l.contains("(BTF tracepoints")
    });
    if btf_programs {
        assert!(
            text.lines()
                .any(|l| l.starts_with('✓') && l.contains("owners of the sockets open at start")),
            "the owners' iterator runs as {SERVICE_USER}: {text}"
        );
    }
    let (mut serve, addr) = serve_from(as_service_user(), &[]);
    let body = scrape(&addr);
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(
        sample(&body, "tcptrace_lost_events_total").is_some(),
        "the exporter's metrics as {SERVICE_USER}: {body:.300}"
    );
}
