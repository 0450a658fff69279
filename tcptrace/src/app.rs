//! Wires a source (the live probe or a recording) to a view.

use std::{
    fs::File,
    io::{self, IsTerminal as _},
    os::fd::{AsRawFd, RawFd},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{
    cli::Cli,
    event::RawEvent,
    output::{Renderer, Style, local_utc_offset_secs},
    probe::{Probe, ProbeConfig, wall_offset_ns},
    record::{Reader, Writer},
    view::{Flow, Stream, View},
};

/// How often the reader drains the ring buffer when the kernel has not woken it.
const TICK: Duration = Duration::from_millis(20);

/// Runs the command line. Errors carry context for the user; a closed stdout (`| head`)
/// ends the run quietly.
pub fn run(cli: Cli) -> Result<()> {
    let filter = cli.filter.filter();
    let stdout = io::stdout();
    let color = stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let out = io::BufWriter::with_capacity(64 << 10, stdout.lock());
    let style = |wall_offset_ns| Style {
        wall_offset_ns,
        utc_offset_secs: local_utc_offset_secs(),
        color,
        addr_width: Style::addr_width_for(filter.family),
    };
    let result = if let Some(path) = &cli.source.from {
        let mut reader = open_recording(path)?;
        let renderer = Renderer::new(cli.output.format(), style(reader.header().wall_offset_ns));
        let mut view = Stream::new(filter.compile(), renderer, out, cli.source.count);
        replay(&mut reader, &mut view).with_context(|| format!("replaying {}", path.display()))
    } else {
        let (kernel, ports) = filter.kernel();
        let probe = Probe::start(&ProbeConfig {
            kernel: tcptrace_common::Config {
                wakeup_bytes: crate::probe::DEFAULT_WAKEUP_BYTES,
                ..kernel
            },
            ports,
            ring_bytes: cli.source.ring_buffer_size,
        })?;
        let wall = wall_offset_ns();
        let recorder = match &cli.source.record {
            Some(path) => Some(
                File::create(path)
                    .and_then(|f| Writer::new(f, wall))
                    .with_context(|| format!("cannot write the recording {}", path.display()))?,
            ),
            None => None,
        };
        let renderer = Renderer::new(cli.output.format(), style(wall));
        let mut view = Stream::new(filter.compile(), renderer, out, cli.source.count);
        eprintln!("Tracing TCP state transitions. Hit Ctrl-C to end.");
        live(probe, recorder, &mut view, cli.source.duration)
    };
    match result {
        Err(e) if is_broken_pipe(&e) => Ok(()),
        other => other,
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Opens a recording, naming the file in every error.
pub fn open_recording(path: &Path) -> Result<Reader<File>> {
    let file = File::open(path)
        .map_err(crate::record::RecordError::Io)
        .with_context(|| format!("cannot open the recording {}", path.display()))?;
    Reader::new(file).with_context(|| format!("cannot read the recording {}", path.display()))
}

/// Feeds a whole recording to a view.
pub fn replay<R: io::Read>(reader: &mut Reader<R>, view: &mut dyn View) -> Result<()> {
    view.start()?;
    let mut batch = Vec::with_capacity(4096);
    loop {
        batch.clear();
        if reader.next_batch(&mut batch)? == 0 {
            break;
        }
        if view.push(&batch)? == Flow::Done {
            break;
        }
    }
    view.finish()?;
    Ok(())
}

/// The ring buffer's descriptor, for readiness.
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Traces until the view is done, the duration ends, or SIGINT/SIGTERM arrives. The probe
/// is dropped (detached) on every path out.
pub fn live(
    mut probe: Probe,
    mut recorder: Option<Writer<File>>,
    view: &mut dyn View,
    duration: Option<Duration>,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the event loop")?;
    let mut batch: Vec<RawEvent> = Vec::with_capacity(16 << 10);
    let mut feed = |probe: &mut Probe, view: &mut dyn View| -> Result<Flow> {
        batch.clear();
        if probe.drain(&mut batch) == 0 {
            return Ok(Flow::More);
        }
        if let Some(rec) = &mut recorder {
            rec.write(&batch).context("writing the recording")?;
        }
        Ok(view.push(&batch)?)
    };
    view.start()?;
    rt.block_on(async {
        // SAFETY: the descriptor belongs to the probe, which outlives `ready` (it is only
        // dropped after this block ends).
        let ready = unsafe {
            AsyncFd::register_with_interest(RingFd(probe.ring_fd().as_raw_fd()), Interest::READABLE)
        }
        .map_err(|e| anyhow::anyhow!("watching the ring buffer: {e}"))?;
        let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(end);
        loop {
            tokio::select! {
                r = ready.readable() => {
                    r.context("waiting for the ring buffer")?.clear_ready();
                }
                _ = tick.tick() => {
                    if view.tick(crate::probe::monotonic_ns())? == Flow::Done {
                        return Ok(());
                    }
                }
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = &mut end => break,
            }
            if feed(&mut probe, view)? == Flow::Done {
                return Ok(());
            }
        }
        // What arrived before the stop still belongs to the run.
        feed(&mut probe, view)?;
        Ok::<(), anyhow::Error>(())
    })?;
    drop(probe);
    if let Some(rec) = &mut recorder {
        rec.flush().context("writing the recording")?;
    }
    view.finish()?;
    Ok(())
}
