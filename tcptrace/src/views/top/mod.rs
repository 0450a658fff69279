//! `tcptrace top`: a live full-screen view of closes per service port and direction, who
//! closes first, resets, the TIME_WAIT held and its trend, and the TIME_WAIT population by
//! age, and the destinations closest to running out of local ports (as `tcptrace ports`
//! counts them). Events fold into a [`model::Board`] as they come; the screen is drawn from it once
//! an interval (and when a key or a resize asks), never per event.

pub mod draw;
pub mod keys;
pub mod model;
pub mod term;

use std::{collections::VecDeque, io};

use crossterm::event::Event as TermEvent;
use ratatui::{Terminal, backend::Backend};

use crate::{
    analysis::{
        pipeline::Pipeline,
        timewait::{TCP_TIMEWAIT_LEN_NS, Timewaits},
    },
    model::atstart::OpenAtStart,
    model::{
        event::{Event, RawEvent},
        filter::CompiledFilter,
    },
    shared::NS_PER_MS,
    source::diag::DiagTimewait,
    views::{
        Flow, Interval, View,
        ports::{HostRanges, PortsCore, Ranges},
    },
};
use draw::Clock;
use keys::{Action, Keys};
use model::{Board, Held};

/// The view.
pub struct Top<B: Backend> {
    /// Tracks every socket, follows timewait sockets.
    pipe: Pipeline,
    /// Keeps only connections that passed through one of these states (bits `1 << state`;
    /// 0: all).
    state_mask: u32,
    board: Board,
    /// Ports held per destination, as `tcptrace ports` counts them.
    ports: PortsCore,
    keys: Keys,
    input: Box<dyn term::Input>,
    terminal: Terminal<B>,
    /// Enter the terminal's raw mode and alternate screen at start.
    takes_terminal: bool,
    guard: Option<term::Guard>,
    clock: Interval,
    wall: Clock,
    /// TIME_WAIT sockets found at start, until they expire (or are traced).
    seeded: Vec<(Held, u64)>,
    /// Without traced timers: the closes that entered TIME_WAIT in the last minute.
    recent: VecDeque<Held>,
    drawn: bool,
    dirty: bool,
}

impl<B: Backend> Top<B>
where
    B::Error: std::error::Error + Send + Sync + 'static,
{
    /// A view of what `filter` keeps (`state_mask` as `tcptrace report` takes it), drawn on
    /// `terminal` every `interval_ns`, keys from `input`.
    pub fn new(
        filter: CompiledFilter,
        state_mask: u32,
        terminal: Terminal<B>,
        input: Box<dyn term::Input>,
        interval_ns: u64,
        wall: Clock,
    ) -> Self {
        Top {
            pipe: Pipeline::new(filter).tracking().timewaits(false),
            state_mask,
            board: Board::new(),
            ports: PortsCore::new(Box::new(HostRanges::default()), wall.wall_offset_ns),
            keys: Keys::default(),
            input,
            terminal,
            takes_terminal: false,
            guard: None,
            clock: Interval::new(interval_ns),
            wall,
            seeded: Vec::new(),
            recent: VecDeque::new(),
            drawn: false,
            dirty: true,
        }
    }

    /// Takes the real terminal at start (raw mode, alternate screen) and gives it back at
    /// the end.
    pub fn on_terminal(mut self) -> Self {
        self.takes_terminal = true;
        self
    }

    /// Whether timewait timers are traced (else a close that enters TIME_WAIT is counted
    /// held for 60 s).
    pub fn timers(mut self, traced: bool) -> Self {
        self.pipe = self.pipe.timewaits(traced);
        self
    }

    /// Whether the source carries connection records.
    pub fn records(mut self, yes: bool) -> Self {
        self.pipe = self.pipe.from_records(yes);
        self.ports.set_records(yes);
        self
    }

    /// Each namespace's local port range from `ranges` (the host's unless told).
    pub fn port_ranges(mut self, ranges: Box<dyn Ranges>) -> Self {
        self.ports = PortsCore::new(ranges, self.wall.wall_offset_ns);
        self.ports.set_records(self.pipe.uses_records());
        self
    }

    /// What held local ports at start (`now_ns`), for the pressed destinations: the
    /// connections this host made that are open, and the TIME_WAIT sockets.
    pub fn seed_ports(mut self, open: &OpenAtStart, found: &[DiagTimewait], now_ns: u64) -> Self {
        self.ports.seed(open, found, now_ns, self.pipe.filter());
        self
    }

    /// Connections open when tracing began: their closes get the role found then.
    pub fn known_at_start(mut self, found: crate::model::atstart::OpenAtStart) -> Self {
        self.pipe = self.pipe.known_at_start(found);
        self
    }

    /// Follows at most `n` sockets, and `n` timewait sockets, at once.
    pub fn max_sockets(mut self, n: usize) -> Self {
        self.pipe = self.pipe.max_sockets(n);
        self
    }

    /// The TIME_WAIT sockets that existed at start (`now_ns`), those the filter keeps.
    pub fn seed(mut self, found: &[DiagTimewait], now_ns: u64) -> Self {
        let filter = self.pipe.filter();
        self.seeded = found
            .iter()
            .filter(|d| filter.keeps_socket(d.local, d.remote, d.netns))
            .map(|d| {
                let expires = now_ns + u64::from(d.expires_ms) * NS_PER_MS;
                let since_ns = expires.saturating_sub(TCP_TIMEWAIT_LEN_NS);
                let held = Held {
                    local: d.local,
                    remote: d.remote,
                    since_ns,
                };
                (held, expires)
            })
            .collect();
        self
    }

    /// The board (for tests).
    pub fn board(&self) -> &Board {
        &self.board
    }

    /// The terminal (for tests).
    pub fn terminal(&self) -> &Terminal<B> {
        &self.terminal
    }

    /// Counts the closes the pipeline concluded; timewait ends only drain.
    fn take_closes(&mut self) {
        let mut closes = std::mem::take(&mut self.pipe.closes);
        for c in closes.drain(..) {
            let states_kept = self.state_mask == 0 || u32::from(c.states) & self.state_mask != 0;
            if !self.pipe.filter().keeps_close(&c) || !states_kept {
                continue;
            }
            if c.timewait && !self.pipe.timewaits_traced() {
                self.recent.push_back(Held {
                    local: c.local,
                    remote: c.remote,
                    since_ns: c.ts_ns,
                });
            }
            self.board.close(&c);
        }
        self.pipe.closes = closes;
        self.count_expiries();
    }

    /// Hands the timewait ends the filter keeps to the ports count (it rates expiries).
    fn count_expiries(&mut self) {
        let mut exits = std::mem::take(&mut self.pipe.exits);
        for x in exits.drain(..) {
            if self.pipe.filter().keeps_exit(&x) {
                self.ports.exit(&x);
            }
        }
        self.pipe.exits = exits;
    }

    /// The refresh at `now_ns`: the board's rows and ages, and the pressed destinations.
    fn refresh(&mut self, now_ns: u64) {
        let held = self.held(now_ns);
        self.board.refresh(now_ns, &held);
        let population = crate::views::ports::timewait_tuples(&self.pipe);
        let rows = self.ports.snapshot(&population, now_ns);
        self.board.press(rows, self.ports.peaks());
    }

    /// The TIME_WAIT sockets held at `now_ns`: those traced (or, untraced, the closes of
    /// the last minute), and those found at start that have neither expired nor been
    /// traced since.
    fn held(&mut self, now_ns: u64) -> Vec<Held> {
        let filter = self.pipe.filter();
        let mut held: Vec<Held> = self
            .pipe
            .timewait_sockets()
            .into_iter()
            .flat_map(Timewaits::population)
            .filter(|l| filter.keeps_life(l))
            .map(|l| Held {
                local: l.local,
                remote: l.remote,
                since_ns: l.since_ns,
            })
            .collect();
        while self
            .recent
            .front()
            .is_some_and(|h| h.since_ns + TCP_TIMEWAIT_LEN_NS <= now_ns)
        {
            self.recent.pop_front();
        }
        held.extend(self.recent.iter().copied());
        let traced: std::collections::HashSet<_> =
            held.iter().map(|h| (h.local, h.remote)).collect();
        self.seeded
            .retain(|(h, expires)| *expires > now_ns && !traced.contains(&(h.local, h.remote)));
        held.extend(self.seeded.iter().map(|(h, _)| *h));
        held
    }

    /// Acts on the pending keys and resizes; whether one asked to quit.
    fn read_input(&mut self) -> io::Result<bool> {
        while let Some(ev) = self.input.next()? {
            match ev {
                TermEvent::Key(k) => match self.keys.press(k, &mut self.board) {
                    Action::Quit => return Ok(true),
                    Action::Redraw => self.dirty = true,
                    Action::None => {}
                },
                TermEvent::Resize(..) => self.dirty = true,
                _ => {}
            }
        }
        Ok(false)
    }

    fn redraw(&mut self) -> io::Result<()> {
        if !self.drawn && self.takes_terminal {
            // What was printed after the screen was taken (the tracer's start message).
            self.terminal.clear().map_err(io::Error::other)?;
        }
        let (board, keys, wall) = (&self.board, &self.keys, self.wall);
        self.terminal
            .draw(|f| draw::draw(f, board, keys, wall))
            .map_err(io::Error::other)?;
        self.drawn = true;
        self.dirty = false;
        Ok(())
    }
}

impl<B: Backend> View for Top<B>
where
    B::Error: std::error::Error + Send + Sync + 'static,
{
    fn start(&mut self) -> io::Result<()> {
        if self.takes_terminal {
            self.guard = Some(term::enter()?);
        }
        Ok(())
    }

    fn push(&mut self, batch: &[RawEvent]) -> io::Result<Flow> {
        for raw in batch {
            let Some(ev) = self.pipe.decode(raw) else {
                continue;
            };
            match &ev {
                Event::Lost { count, .. } => self.board.lost(*count),
                Event::Transition(t) => self.ports.transition(t, self.pipe.filter().keeps(t)),
                Event::Connection(c) => self.ports.connection(c),
                _ => {}
            }
            self.pipe.fold(&ev);
            self.take_closes();
        }
        Ok(Flow::More)
    }

    fn tick(&mut self, now_ns: u64) -> io::Result<Flow> {
        self.pipe.tick(now_ns);
        self.take_closes();
        if self.read_input()? {
            return Ok(Flow::Done);
        }
        if self.clock.advance(now_ns) || !self.drawn {
            self.clock.restart();
            self.refresh(now_ns);
            self.dirty = true;
        }
        if self.dirty {
            self.redraw()?;
        }
        Ok(Flow::More)
    }

    fn evicted(&self) -> u64 {
        self.pipe.evicted()
    }

    fn pipeline_mut(&mut self) -> Option<&mut Pipeline> {
        Some(&mut self.pipe)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.guard = None;
        Ok(())
    }
}
