//! `cargo xtask bench --soak`: does a long run hold steady?
//!
//! `tcptrace report` traces storms without pause (alternating close orders, each storm in a
//! namespace of its own) for the given minutes. Every 10 s the soak samples the tracer's
//! resident memory and the entries of its kernel maps (with bpftool). Then, under a small
//! `--max-sockets`, a SYN flood to a closed port and a half-open flood (connects to a
//! listener whose accept queue is full, so the SYNs are dropped and the sockets stay in
//! SYN_SENT) must not grow memory past the caps.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::json;

use crate::{
    bench::{Netns, median, mem_mib, never_accepting, number_before},
    demo::Tracer,
};

/// The maps whose entries are watched, with their capacities: the listeners' map (the
/// BTF programs keep each socket's facts in the socket itself, which frees them with it).
const MAPS: [(&str, u64); 1] = [("LISTENERS", tcptrace_common::DEFAULT_LISTENERS as u64)];

/// Makes sure bpftool is there (Debian's bpftool), installing it when it is not.
pub(crate) fn bpftool_ready() -> Result<()> {
    let found = || {
        Command::new("bpftool")
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if found() {
        return Ok(());
    }
    println!("installing bpftool with apt-get (to count the kernel maps' entries)");
    if !crate::bench::apt_install("bpftool") || !found() {
        bail!("bpftool is needed to read the kernel maps: apt-get install bpftool");
    }
    Ok(())
}

/// The ids of the BPF maps a process holds, from its descriptors' fdinfo.
fn map_ids(pid: u32) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(info) = std::fs::read_to_string(fd?.path()) else {
            continue;
        };
        if let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse().ok())
        {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// Entries in each of `pid`'s watched maps.
fn map_entries(pid: u32) -> Result<Vec<u64>> {
    let mut named = Vec::new();
    for id in map_ids(pid)? {
        let show: serde_json::Value =
            serde_json::from_str(&crate::capture(Command::new("bpftool").args([
                "-j",
                "map",
                "show",
                "id",
                &id.to_string(),
            ]))?)?;
        if let Some(name) = show["name"].as_str() {
            named.push((name.to_string(), id));
        }
    }
    let mut counts = Vec::new();
    for (name, _) in MAPS {
        let id = named
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
            .with_context(|| format!("process {pid} holds no map {name}"))?;
        let dump: serde_json::Value =
            serde_json::from_str(&crate::capture(Command::new("bpftool").args([
                "-j",
                "map",
                "dump",
                "id",
                &id.to_string(),
            ]))?)?;
        counts.push(dump.as_array().map_or(0, |a| a.len() as u64));
    }
    Ok(counts)
}

/// One reading of the soak: (seconds since its start, RSS in MiB, entries of each of
/// [`MAPS`]).
type Sample = (f64, f64, Vec<u64>);

/// The soak, then the floods.
pub fn soak(bin: &Path, minutes: f64, dir: &Path) -> Result<()> {
    bpftool_ready()?;
    let port: u16 = 31_000;
    let mut tracer = Tracer::start(
        bin,
        &[
            "report".into(),
            "--port".into(),
            port.to_string(),
            "--interval".into(),
            "1m".into(),
            "--json".into(),
        ],
        &dir.join("soak.out"),
    )?;
    let pid = tracer.pid().context("tracer pid")?;
    let total = Duration::from_secs_f64(minutes * 60.0);
    let stop = Arc::new(AtomicBool::new(false));
    let conns = Arc::new(AtomicU64::new(0));
    let storms = storms_until(port, stop.clone(), conns.clone());
    let samples = sample_every_10s(pid, total, &storms, &conns)?;
    stop.store(true, Ordering::Relaxed);
    storms
        .join()
        .map_err(|_| anyhow::anyhow!("the storm thread panicked"))??;
    tracer.stop()?;
    if samples.len() < 4 {
        bail!("the soak was too short to judge (at least 40 s are needed)");
    }
    // Warm-up: the first fifth (at least one sample).
    let warm = (samples.len() / 5).max(1);
    let (maps_ok, map_json) = judge_maps(&samples, warm);
    let (flat, rss_json) = judge_rss(&samples[warm..]);
    let floods = floods(bin, dir)?;
    let result = json!({
        "minutes": minutes,
        "connections": conns.load(Ordering::Relaxed),
        "samples": samples.iter().map(|(t, r, m)| json!({"t_s": t, "rss_mib": r, "maps": m})).collect::<Vec<_>>(),
        "rss_steady": rss_json,
        "maps": map_json,
        "floods": floods,
    });
    let path = dir.join("soak.json");
    std::fs::write(&path, serde_json::to_string_pretty(&result)? + "\n")?;
    println!("\nwrote {}", path.display());
    let floods_ok = result["floods"]
        .as_array()
        .is_some_and(|f| f.iter().all(|f| f["ok"] == true));
    if !(flat && maps_ok && floods_ok) {
        bail!("the soak found growth (see above)");
    }
    println!("the soak held steady");
    Ok(())
}

/// Storms of 20,000 connections to `port` without pause, alternating close orders, each in a
/// namespace of its own, until `stop`; counts their connections in `conns`.
fn storms_until(
    port: u16,
    stop: Arc<AtomicBool>,
    conns: Arc<AtomicU64>,
) -> thread::JoinHandle<Result<()>> {
    thread::spawn(move || -> Result<()> {
        let mut server_closes = false;
        while !stop.load(Ordering::Relaxed) {
            let ns = Netns::new()?;
            crate::bench::storm_in(&ns, port, 20_000, 4, server_closes)?;
            conns.fetch_add(20_000, Ordering::Relaxed);
            server_closes = !server_closes;
        }
        Ok(())
    })
}

/// Samples the tracer `pid`'s memory and maps every 10 s for `total` (or until the storms
/// end), printing a line each.
fn sample_every_10s(
    pid: u32,
    total: Duration,
    storms: &thread::JoinHandle<Result<()>>,
    conns: &AtomicU64,
) -> Result<Vec<Sample>> {
    let start = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    print!(
        "{:>7} {:>11} {:>9} {:>17}",
        "t (s)", "connections", "RSS MiB", "(anon + mapped)"
    );
    for (name, _) in MAPS {
        print!(" {name:>10}");
    }
    println!();
    while start.elapsed() < total {
        thread::sleep(Duration::from_secs(10).min(total.saturating_sub(start.elapsed())));
        if storms.is_finished() {
            break;
        }
        let t = start.elapsed().as_secs_f64();
        let rss = mem_mib(pid, "VmRSS")?;
        // Heap versus mapped pages (the binary, the ring buffer): tells a leak from pages
        // of the ring buffer being touched.
        let (anon, file) = (mem_mib(pid, "RssAnon")?, mem_mib(pid, "RssFile")?);
        let maps = map_entries(pid)?;
        print!(
            "{t:>7.0} {:>11} {rss:>9.1} {:>17}",
            conns.load(Ordering::Relaxed),
            format!("({anon:.1} + {file:.1})"),
        );
        for n in &maps {
            print!(" {n:>10}");
        }
        println!();
        samples.push((t, rss, maps));
    }
    Ok(samples)
}

/// Judges each watched map after the first `warm` samples, printing a line each: whether
/// none grew, and their JSON.
fn judge_maps(
    samples: &[Sample],
    warm: usize,
) -> (bool, serde_json::Map<String, serde_json::Value>) {
    // Kernel maps follow the live connections and listeners, which swing with each
    // storm: growth is a typical (median) level that rises from the first half of the steady
    // state to the second, or a map that fills up.
    let half = warm + (samples.len() - warm) / 2;
    let mut maps_ok = true;
    let mut map_json = serde_json::Map::new();
    for (i, (name, cap)) in MAPS.iter().enumerate() {
        let level = |r: &[Sample]| median(&r.iter().map(|s| s.2[i] as f64).collect::<Vec<_>>());
        let (first, second) = (level(&samples[warm..half]), level(&samples[half..]));
        let peak = samples.iter().map(|s| s.2[i]).max().unwrap_or(0);
        let ok = second <= first * 1.25 + 256.0 && peak < cap * 9 / 10;
        maps_ok &= ok;
        map_json.insert(
            (*name).into(),
            json!({"first_half_median": first, "second_half_median": second, "peak": peak,
                   "capacity": cap, "ok": ok}),
        );
        println!(
            "{name}: median entries {first:.0} in the first half of the steady state, \
             {second:.0} in the second, peak {peak} (capacity {cap}): {}",
            if ok { "no growth" } else { "GROWING" }
        );
    }
    (maps_ok, map_json)
}

/// Judges the RSS of the `steady` samples (after warm-up), printing a line: whether it stays
/// within ±10 % of its median, and its JSON.
fn judge_rss(steady: &[Sample]) -> (bool, serde_json::Value) {
    let steady: Vec<f64> = steady.iter().map(|s| s.1).collect();
    let (lo, hi) = steady
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    let mid = median(&steady);
    let flat = hi <= mid * 1.10 && lo >= mid * 0.90;
    println!(
        "RSS after warm-up: {lo:.1}–{hi:.1} MiB, median {mid:.1} MiB: {}",
        if flat {
            "flat within ±10 %"
        } else {
            "NOT flat within ±10 %"
        }
    );
    (
        flat,
        json!({"min": lo, "max": hi, "median": mid, "flat": flat}),
    )
}

/// `--max-sockets` under the floods.
const FLOOD_MAX_SOCKETS: u64 = 5_000;
/// Connections of each flood: within the usual 20,000 open files (the flood holds one per
/// socket).
const FLOOD_CONNECTIONS: u64 = 15_000;

/// A SYN flood to a closed port and a half-open flood, each under `tcptrace report
/// --max-sockets` [`FLOOD_MAX_SOCKETS`]: the tracer's memory must stay bounded and the
/// evictions reported.
fn floods(bin: &Path, dir: &Path) -> Result<Vec<serde_json::Value>> {
    let mut results = Vec::new();
    for half_open in [false, true] {
        results.push(flood(bin, dir, half_open)?);
    }
    Ok(results)
}

/// One flood (half-open, or to a closed port) under `tcptrace report --max-sockets`, in a
/// namespace of its own; prints its verdict and returns its JSON.
fn flood(bin: &Path, dir: &Path, half_open: bool) -> Result<serde_json::Value> {
    let ns = Netns::new()?;
    let port: u16 = 32_000;
    let mut tracer = Tracer::start(
        bin,
        &[
            "report".into(),
            "--port".into(),
            port.to_string(),
            "--max-sockets".into(),
            FLOOD_MAX_SOCKETS.to_string(),
        ],
        &dir.join("flood.out"),
    )?;
    let pid = tracer.pid().context("tracer pid")?;
    let base = mem_mib(pid, "VmRSS")?;
    // VmHWM would show start-up (parsing BTF); sample the resident size meanwhile.
    let peak = PeakRss::start(pid, base);
    // A listener whose accept queue (one slot) fills at once and is never drained.
    let listener = if half_open {
        Some(never_accepting(&ns, port, 1)?)
    } else {
        None
    };
    flood_client(&ns, port, half_open)?;
    thread::sleep(Duration::from_millis(500));
    let hwm = peak.stop()?;
    let maps = map_entries(pid)?;
    tracer.stop()?;
    drop(listener);
    drop(ns);
    Ok(flood_verdict(
        half_open,
        &tracer.said().join("\n"),
        (base, hwm),
        maps[0],
    ))
}

/// The flood's connections from 127.0.0.1 to `port` in `ns`: all refused, or (`half_open`)
/// held while SYNs are retransmitted, then let go at once.
fn flood_client(ns: &Netns, port: u16, half_open: bool) -> Result<()> {
    let exe = std::env::current_exe()?;
    let mut client = Command::new(&exe);
    client
        .args(["storm-client", "--netns", &ns.name, "--src", "127.0.0.1"])
        .args([
            "--port",
            &port.to_string(),
            "--count",
            &FLOOD_CONNECTIONS.to_string(),
        ]);
    if half_open {
        client
            .arg("--hold")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
    } else {
        client.arg("--refused");
    }
    let mut child = client.spawn().context("cannot start the flood")?;
    if half_open {
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("client stdout")?).read_line(&mut line)?;
        // Hold them while SYNs are retransmitted, then let them all go at once.
        thread::sleep(Duration::from_secs(3));
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(b"x");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("the flood client failed ({status})");
    }
    Ok(())
}

/// Judges a flood from what the tracer `said`, its RSS `(at start, at peak)` in MiB and the
/// watched map's entries after: prints the verdict and returns its JSON.
fn flood_verdict(
    half_open: bool,
    said: &str,
    (base, hwm): (f64, f64),
    entries: u64,
) -> serde_json::Value {
    let transitions = number_before(said, " transitions").unwrap_or(0);
    // The aggregating views get one record per connection from the BTF programs.
    let connections = number_before(said, " connection records").unwrap_or(0);
    let lost = number_before(said, " lost").unwrap_or(0);
    let evicted = number_before(said, " sockets evicted").unwrap_or(0);
    let followed = connections.max(transitions / 2) + lost >= FLOOD_CONNECTIONS;
    // The tracker costs ~46 bytes per socket at its cap, the ring buffer's pages up to
    // 8 MiB once touched: allow 12 MiB over the start. Evictions are shown, not required:
    // the BTF programs keep a live socket's facts in the socket, so the tracker may never
    // reach its cap (only the classic programs send each transition to it).
    let ok = followed && hwm <= base + 12.0 && entries <= MAPS[0].1;
    let what = if half_open {
        "half-open flood (15k SYN_SENT held)"
    } else {
        "SYN flood to a closed port (15k refused)"
    };
    println!(
        "{what}: {connections} connection records and {transitions} transitions read, {lost} \
         lost, {evicted} sockets evicted at --max-sockets \
         {FLOOD_MAX_SOCKETS}; RSS {base:.1} MiB at start, at most {hwm:.1} MiB; {} entries \
         {entries} after: {}",
        MAPS[0].0,
        match (followed, ok) {
            (false, _) => "NOT FOLLOWED (fewer connections read than the flood made)",
            (true, true) => "bounded",
            (true, false) => "NOT BOUNDED",
        }
    );
    json!({
        "flood": what, "transitions": transitions, "evicted": evicted,
        "connection_records": connections, "lost": lost,
        "rss_start_mib": base, "rss_peak_mib": hwm, "socks_entries_after": entries,
        "map_entries_after": entries,
        "ok": ok,
    })
}

/// The peak resident size of a process, sampled every 50 ms until stopped.
struct PeakRss {
    peak: Arc<std::sync::Mutex<f64>>,
    sampling: Arc<AtomicBool>,
    sampler: thread::JoinHandle<()>,
}

impl PeakRss {
    /// Starts sampling `pid`, from `base` MiB.
    fn start(pid: u32, base: f64) -> PeakRss {
        let peak = Arc::new(std::sync::Mutex::new(base));
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = {
            let (peak, sampling) = (peak.clone(), sampling.clone());
            thread::spawn(move || {
                while sampling.load(Ordering::Relaxed) {
                    if let (Ok(r), Ok(mut p)) = (mem_mib(pid, "VmRSS"), peak.lock()) {
                        *p = p.max(r);
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            })
        };
        PeakRss {
            peak,
            sampling,
            sampler,
        }
    }

    /// Stops sampling; the peak in MiB.
    fn stop(self) -> Result<f64> {
        self.sampling.store(false, Ordering::Relaxed);
        let _ = self.sampler.join();
        let hwm = *self
            .peak
            .lock()
            .map_err(|_| anyhow::anyhow!("sampler panicked"))?;
        Ok(hwm)
    }
}
