//! The terminal of `tcptrace top`: raw mode and the alternate screen while the view runs,
//! and the terminal as it was on every way out — a normal end, an error (the guard is
//! dropped), a panic (the hook restores before the message is printed). SIGINT and SIGTERM
//! end the run normally (see `app::live`), and Ctrl-C is a key in raw mode.

use std::{
    io::{self, Write as _},
    sync::{
        Once,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crossterm::{
    cursor,
    event::{self, Event},
    execute,
    terminal::{self, EnterAlternateScreen, LeaveAlternateScreen},
};

/// Whether the terminal is in raw mode on the alternate screen now.
static ACTIVE: AtomicBool = AtomicBool::new(false);
static PANIC_HOOK: Once = Once::new();

/// Keeps the terminal in the view's mode while it lives.
#[derive(Debug)]
pub struct Guard(());

/// Enters raw mode and the alternate screen; the terminal is restored when the guard is
/// dropped, or first thing on a panic.
pub fn enter() -> io::Result<Guard> {
    PANIC_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
    terminal::enable_raw_mode()?;
    ACTIVE.store(true, Ordering::SeqCst);
    let guard = Guard(());
    execute!(io::stdout(), EnterAlternateScreen, cursor::Hide)?;
    Ok(guard)
}

impl Drop for Guard {
    fn drop(&mut self) {
        restore();
    }
}

/// Leaves the alternate screen and raw mode, once (later calls do nothing).
fn restore() {
    if !ACTIVE.swap(false, Ordering::SeqCst) {
        return;
    }
    // Best effort: a terminal gone (hung up) cannot be restored anyway.
    let mut out = io::stdout();
    let _ = execute!(out, LeaveAlternateScreen, cursor::Show);
    let _ = out.flush();
    let _ = terminal::disable_raw_mode();
}

/// Where the view's keys and resizes come from.
pub trait Input {
    /// The next pending terminal event, without waiting (None: nothing pending).
    fn next(&mut self) -> io::Result<Option<Event>>;
}

/// The terminal's own events.
#[derive(Debug, Default)]
pub struct TerminalInput;

impl Input for TerminalInput {
    fn next(&mut self) -> io::Result<Option<Event>> {
        if event::poll(Duration::ZERO)? {
            event::read().map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Events given in advance (for tests).
impl Input for std::collections::VecDeque<Event> {
    fn next(&mut self) -> io::Result<Option<Event>> {
        Ok(self.pop_front())
    }
}
