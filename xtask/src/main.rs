//! tcptrace's developer workflow: `cargo xtask <command>`.

mod backfill;
mod bench;
mod demo;
mod dist;
mod setup;
mod soak;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

/// tcptrace's developer workflow.
#[derive(Parser)]
#[command(
    name = "cargo xtask",
    after_help = "Examples:
  cargo xtask demo             set up, build, and trace a scripted loopback workload
  cargo xtask test             fmt, clippy and every test (as root: the eBPF ones too)
  cargo xtask run -- --state TIME_WAIT"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build needs: nightly rust-src, bpf-linker (built against nightly's
    /// LLVM), iproute2. Idempotent; tools go to ~/.local/share/tcptrace-dev/tools (or
    /// $TCPTRACE_TOOLS_DIR).
    #[command(after_help = "Example:\n  cargo xtask setup")]
    Setup,
    /// Build tcptrace (release, eBPF program embedded).
    #[command(after_help = "Example:\n  cargo xtask build && sudo target/release/tcptrace")]
    Build {
        /// Build the debug profile instead.
        #[arg(long)]
        debug: bool,
    },
    /// Build, then run tcptrace as root (through sudo when not root).
    #[command(
        after_help = "Examples:\n  cargo xtask run -- --state TIME_WAIT\n  cargo xtask run -- --port 8080 --json"
    )]
    Run {
        /// Build the debug profile instead.
        #[arg(long)]
        debug: bool,
        /// Arguments for tcptrace.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up if needed, then cargo fmt --check, clippy -D warnings, and every test.
    /// Root-only tests need root; under CI=true their not running is a failure.
    #[command(after_help = "Examples:\n  sudo -E cargo xtask test\n  cargo xtask test -- track::")]
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The newcomer's tour: set up, build, trace a scripted loopback workload, explain it.
    #[command(after_help = "Example:\n  cargo xtask demo")]
    Demo,
    /// Build the Debian package (tcptrace-ebpf: binary, man pages, completions, a hardened
    /// tcptrace.service for `serve`) into target/dist.
    #[command(
        after_help = "Example:\n  cargo xtask dist && sudo apt install ./target/dist/tcptrace-ebpf_*.deb"
    )]
    Dist,
    /// Write the man pages (tcptrace.1 and one per subcommand) into target/man.
    #[command(after_help = "Example:\n  cargo xtask man && man -l target/man/tcptrace.1")]
    Man,
    /// Measure what tracing costs on a bounded loopback connection storm, side by side.
    #[command(
        after_help = "Examples:\n  sudo -E cargo xtask bench                 the comparison (about 5 minutes)\n  sudo -E cargo xtask bench --rounds 5 --profile\n  sudo -E cargo xtask bench --soak --minutes 10   a long run, then floods"
    )]
    Bench(bench::Args),
    /// A storm's server process (internal to bench).
    #[command(hide = true)]
    StormServer(bench::ServerArgs),
    /// A storm's client process (internal to bench).
    #[command(hide = true)]
    StormClient(bench::ClientArgs),
    /// A process holding connections open (internal to bench).
    #[command(hide = true)]
    HoldOpen(backfill::HoldArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup::setup(false),
        Cmd::Build { debug } => build(debug).map(|bin| println!("built {}", bin.display())),
        Cmd::Run { debug, args } => build(debug).and_then(|bin| run_tcptrace(&bin, &args)),
        Cmd::Test { args } => test(&args),
        Cmd::Demo => build(false).and_then(|bin| demo::demo(&bin)),
        Cmd::Dist => build(false)
            .and_then(|bin| dist::dist(&bin))
            .map(|deb| println!("wrote {}", deb.display())),
        Cmd::Man => build(false).and_then(|bin| {
            let dir = root().join("target/man");
            run(Command::new(&bin).arg("man-pages").arg(&dir))?;
            println!("wrote the man pages into {}", dir.display());
            Ok(())
        }),
        Cmd::Bench(args) => match &args.tcptrace {
            Some(bin) => bench::bench(bin, &args),
            None => build_with(false, BENCH_FEATURES).and_then(|bin| bench::bench(&bin, &args)),
        },
        Cmd::StormServer(args) => bench::server(&args),
        Cmd::StormClient(args) => bench::client(&args),
        Cmd::HoldOpen(args) => backfill::hold_open(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Whether this process runs as root.
fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a command, echoing it, failing on a non-zero exit.
fn run(cmd: &mut Command) -> Result<()> {
    println!("$ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {}", show(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", show(cmd));
    }
    Ok(())
}

/// Runs a command quietly and returns its stdout, failing on a non-zero exit.
fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {}", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            show(cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `cargo` with the project's tools on PATH, run from the workspace root.
fn cargo(args: &[&str]) -> Result<Command> {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(args)
        .current_dir(root())
        .env("PATH", setup::tools_path()?);
    Ok(cmd)
}

/// Integration test binaries that mostly wait (a real 2MSL expiry, ~62 s each): run on their
/// own, beside the rest, rather than one after the other.
const WAITING_TESTS: [&str; 2] = ["timewait", "software"];

/// Integration test binaries that load the host on purpose (a storm that nests softirq
/// work over both CPUs): run alone, before the others, whose tracers would lose events to it.
const ALONE_TESTS: [&str; 1] = ["nesting"];

/// Names the package that the package test installs.
const DEB_VARIABLE: &str = "TCPTRACE_DEB";

/// An integration test target, built: its name, its executable and its package's folder
/// (where cargo runs it).
struct TestBinary {
    name: String,
    executable: PathBuf,
    dir: PathBuf,
}

/// The workspace's integration test binaries, as `cargo test --no-run` built them.
fn test_binaries() -> Result<Vec<TestBinary>> {
    let out = capture(&mut cargo(&["test", "--no-run", "--message-format=json"])?)?;
    let mut found = Vec::new();
    for line in out.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let kinds = &v["target"]["kind"];
        let is_test = v["profile"]["test"] == true
            && kinds
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"));
        let (Some(exe), Some(name), Some(manifest)) = (
            v["executable"].as_str(),
            v["target"]["name"].as_str(),
            v["manifest_path"].as_str(),
        ) else {
            continue;
        };
        if is_test {
            found.push(TestBinary {
                name: name.to_string(),
                executable: exe.into(),
                dir: Path::new(manifest)
                    .parent()
                    .unwrap_or(Path::new("."))
                    .into(),
            });
        }
    }
    Ok(found)
}

/// Every test: the waiting binaries started on their own, `cargo test` for all the rest
/// meanwhile; each waiting binary's output is printed once it is done.
fn tests_in_parallel(extra: &[String], deb: &Path) -> Result<()> {
    let binaries = test_binaries()?;
    let waiting: Vec<&TestBinary> = binaries
        .iter()
        .filter(|b| WAITING_TESTS.contains(&b.name.as_str()))
        .collect();
    // A change in cargo's output must not turn into tests silently not run.
    if waiting.len() != WAITING_TESTS.len() || binaries.len() <= waiting.len() {
        bail!(
            "cargo test --no-run listed {} test binaries, {} of {WAITING_TESTS:?}",
            binaries.len(),
            waiting.len()
        );
    }
    for name in ALONE_TESTS {
        if !binaries.iter().any(|b| b.name == name) {
            bail!("cargo test --no-run listed no test binary {name}");
        }
        let mut alone = vec!["test", "--test", name];
        if !extra.is_empty() {
            alone.push("--");
            alone.extend(extra.iter().map(String::as_str));
        }
        run(&mut cargo(&alone)?)?;
    }
    let mut children = Running(Vec::new());
    for b in &waiting {
        let child = Command::new(&b.executable)
            .args(extra)
            .env(DEB_VARIABLE, deb)
            .current_dir(&b.dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", b.executable.display()))?;
        children.0.push(child);
    }
    let mut args = vec!["test".to_string(), "--lib".into(), "--bins".into()];
    for b in binaries.iter().filter(|b| {
        !WAITING_TESTS.contains(&b.name.as_str()) && !ALONE_TESTS.contains(&b.name.as_str())
    }) {
        args.extend(["--test".to_string(), b.name.clone()]);
    }
    if !extra.is_empty() {
        args.push("--".into());
        args.extend(extra.iter().cloned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut doc = vec!["test", "--doc"];
    if !extra.is_empty() {
        doc.push("--");
        doc.extend(extra.iter().map(String::as_str));
    }
    let rest = run(cargo(&args)?.env(DEB_VARIABLE, deb)).and_then(|()| run(&mut cargo(&doc)?));
    let mut failed = Vec::new();
    for (b, child) in waiting.iter().zip(std::mem::take(&mut children.0)) {
        let out = child.wait_with_output()?;
        println!("\n== test {} (run beside the others)", b.name);
        print!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            failed.push(b.name.clone());
        }
    }
    rest?;
    if !failed.is_empty() {
        bail!("{} failed", failed.join(", "));
    }
    Ok(())
}

/// Test processes started on their own: killed and reaped if the run ends early.
struct Running(Vec<std::process::Child>);

impl Drop for Running {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The features the bench's binary is built with: its `--idle-probes` variant.
const BENCH_FEATURES: &[&str] = &["--features", "test-knobs"];

/// Sets up (quietly when done already) and builds; returns the binary.
fn build(debug: bool) -> Result<PathBuf> {
    build_with(debug, &[])
}

/// [`build`] with extra cargo arguments (features).
fn build_with(debug: bool, extra: &[&str]) -> Result<PathBuf> {
    setup::setup(true)?;
    let mut args = vec!["build", "--package", "tcptrace"];
    if !debug {
        args.push("--release");
    }
    args.extend(extra);
    run(&mut cargo(&args)?)?;
    Ok(root()
        .join("target")
        .join(if debug { "debug" } else { "release" })
        .join("tcptrace"))
}

/// A command that runs `bin` as root: directly, or through `sudo -E`.
fn as_root(bin: &Path) -> Result<Command> {
    if is_root() {
        return Ok(Command::new(bin));
    }
    if capture(Command::new("sudo").arg("--version")).is_err() {
        bail!("tcptrace needs root and sudo is not installed: run this as root");
    }
    let mut cmd = Command::new("sudo");
    cmd.arg("-E").arg(bin);
    Ok(cmd)
}

fn run_tcptrace(bin: &Path, args: &[String]) -> Result<()> {
    let mut cmd = as_root(bin)?;
    cmd.args(args);
    println!("$ {}", show(&cmd));
    let status = cmd.status().context("cannot start tcptrace")?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

/// fmt, clippy, then every test, with a timing summary.
fn test(extra: &[String]) -> Result<()> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if !is_root() {
        if ci {
            bail!(
                "CI=true but not root: the root-only tests that load the eBPF program cannot \
                 run, and CI does not skip them"
            );
        }
        println!("{}", "!".repeat(78));
        println!(
            "! Not root: the tests that load the eBPF program will be SKIPPED.\n\
             ! Run `sudo -E cargo xtask test` to run them all."
        );
        println!("{}", "!".repeat(78));
    }
    let mut steps: Vec<(&str, f64)> = Vec::new();
    let start = Instant::now();
    println!("\n== setup");
    setup::setup(false).context("FAILED: setup")?;
    steps.push(("setup", start.elapsed().as_secs_f64()));
    let mut step = |name: &'static str, cmd: Result<Command>| -> Result<()> {
        let start = Instant::now();
        println!("\n== {name}");
        let result = cmd.and_then(|mut c| run(&mut c));
        steps.push((name, start.elapsed().as_secs_f64()));
        result.with_context(|| format!("FAILED: {name}"))
    };
    step("fmt", cargo(&["fmt", "--all", "--", "--check"]))?;
    step(
        "clippy",
        cargo(&["clippy", "--all-targets", "--", "-D", "warnings"]),
    )?;
    step("build tests", cargo(&["test", "--no-run"]))?;
    let start = Instant::now();
    println!("\n== package (the package test installs it)");
    let deb = build(false)
        .and_then(|bin| dist::dist(&bin))
        .context("FAILED: package")?;
    steps.push(("package", start.elapsed().as_secs_f64()));
    let start = Instant::now();
    println!("\n== test");
    let result = tests_in_parallel(extra, &deb);
    steps.push(("test", start.elapsed().as_secs_f64()));
    result.context("FAILED: test")?;
    println!("\n{:<12} {:>8}", "step", "seconds");
    for (name, secs) in &steps {
        println!("{name:<12} {secs:>8.1}");
    }
    println!("all steps passed");
    Ok(())
}
