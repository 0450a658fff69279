//! Lines written in the order of their times rather than of when they were concluded: a
//! close can be concluded hundreds of milliseconds after the socket ended (waiting for a
//! reset, or for its timewait socket's fate), after lines dated later.

use std::{
    cmp::{Ordering, Reverse},
    collections::BinaryHeap,
    io::{self, Write},
};

/// Lines held until nothing dated before them can still come.
#[derive(Debug, Default)]
pub struct TimeOrder {
    held: BinaryHeap<Reverse<Held>>,
    /// Buffers of lines written, for the next lines.
    spare: Vec<Vec<u8>>,
    /// Lines held so far: ties in time keep the order they came in.
    count: u64,
}

#[derive(Debug)]
struct Held {
    ts_ns: u64,
    n: u64,
    /// Counts towards a limit of records shown.
    counts: bool,
    bytes: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Held {}

impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Held {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.ts_ns, self.n).cmp(&(other.ts_ns, other.n))
    }
}

impl TimeOrder {
    /// An empty buffer to write the next line into.
    pub fn buffer(&mut self) -> Vec<u8> {
        self.spare.pop().unwrap_or_default()
    }

    /// Holds the line `bytes`, dated `ts_ns`.
    pub fn hold(&mut self, ts_ns: u64, counts: bool, bytes: Vec<u8>) {
        self.count += 1;
        self.held.push(Reverse(Held {
            ts_ns,
            n: self.count,
            counts,
            bytes,
        }));
    }

    /// Writes the lines dated before `until` (every line, without it) in time order to
    /// `out`, calling `counted` for each that counts; stops, true, once `counted` says the
    /// limit is reached.
    pub fn release(
        &mut self,
        until: Option<u64>,
        out: &mut impl Write,
        mut counted: impl FnMut() -> bool,
    ) -> io::Result<bool> {
        while let Some(Reverse(first)) = self.held.peek() {
            if until.is_some_and(|u| first.ts_ns >= u) {
                break;
            }
            let Some(Reverse(mut line)) = self.held.pop() else {
                break;
            };
            out.write_all(&line.bytes)?;
            let done = line.counts && counted();
            line.bytes.clear();
            self.spare.push(line.bytes);
            if done {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether no line is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// Where a line is rendered: straight out, or into a buffer to be held.
pub enum Sink<'a, W: Write> {
    Out(&'a mut W),
    Held(&'a mut Vec<u8>),
}

impl<W: Write> Write for Sink<'_, W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Out(w) => w.write(b),
            Sink::Held(v) => v.write(b),
        }
    }

    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            Sink::Out(w) => w.write_all(b),
            Sink::Held(v) => v.write_all(b),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Out(w) => w.flush(),
            Sink::Held(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(o: &mut TimeOrder, ts: u64, text: &str) {
        let mut b = o.buffer();
        b.extend_from_slice(text.as_bytes());
        o.hold(ts, true, b);
    }

    #[test]
    fn lines_go_out_in_time_order_up_to_the_bound() {
        let mut o = TimeOrder::default();
        hold(&mut o, 30, "c\n");
        hold(&mut o, 10, "a\n");
        hold(&mut o, 20, "b1\n");
        hold(&mut o, 20, "b2\n");
        let mut out = Vec::new();
        assert!(!o.release(Some(30), &mut out, || false).unwrap());
        assert_eq!(out, b"a\nb1\nb2\n", "ties keep their order; 30 waits");
        assert!(!o.is_empty());
        o.release(None, &mut out, || false).unwrap();
        assert_eq!(out, b"a\nb1\nb2\nc\n");
        assert!(o.is_empty());
    }

    #[test]
    fn the_limit_stops_the_release() {
        let mut o = TimeOrder::default();
        for ts in 1..=5 {
            hold(&mut o, ts, "x\n");
        }
        let (mut out, mut shown) = (Vec::new(), 0);
        let done = o
            .release(None, &mut out, || {
                shown += 1;
                shown >= 2
            })
            .unwrap();
        assert!(done);
        assert_eq!(out, b"x\nx\n");
    }
}
