//! Recordings: the raw event stream in a file, replayable through every view without root.
//!
//! Layout (little-endian): a 32-byte [`Header`] — magic `TCPTRACE`, format version, event
//! size, the wall-clock offset of the recording host's monotonic clock, reserved zero — then
//! fixed-size [`RawEvent`] records exactly as the kernel wrote them (plus the lost-events
//! records userspace adds). Reading validates every record, so a truncated or corrupt file is
//! reported with the byte offset where the problem is, never a panic.

use std::io::{self, BufReader, BufWriter, Read, Write};

use bytemuck::{Pod, Zeroable};
use tcptrace_common::EVENT_SIZE;

use crate::event::{RawEvent, decode};

/// The first 8 bytes of every recording.
pub const MAGIC: [u8; 8] = *b"TCPTRACE";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;

/// The file header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// [`VERSION`].
    pub version: u32,
    /// `size_of::<RawEvent>()` of the writer.
    pub event_size: u32,
    /// CLOCK_REALTIME − CLOCK_MONOTONIC on the recording host, in nanoseconds.
    pub wall_offset_ns: i64,
    /// Bits of [`header_flag`].
    pub flags: u64,
}

/// Bits of [`Header::flags`].
pub mod header_flag {
    /// The timewait sockets' timers were traced: TIME_WAIT exits are in the recording, and an
    /// entry without one means no timewait socket was created.
    pub const TIMERS_TRACED: u64 = 1 << 0;
}

const HEADER_SIZE: usize = std::mem::size_of::<Header>();
const _: () = assert!(HEADER_SIZE == 32);

/// What is wrong with a recording.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("not a tcptrace recording (it does not start with the TCPTRACE header)")]
    NotARecording,
    #[error(
        "the recording is format version {found}, this tcptrace reads version {VERSION}; \
         replay it with the tcptrace that wrote it"
    )]
    Version { found: u32 },
    #[error("the recording's events are {found} bytes, this tcptrace's are {EVENT_SIZE}")]
    EventSize { found: u32 },
    #[error(
        "the recording is truncated: {len} stray bytes at byte {offset} (an interrupted write?)"
    )]
    Truncated { offset: u64, len: usize },
    #[error("the recording is corrupt at byte {offset}: {reason}")]
    Corrupt { offset: u64, reason: String },
}

/// Writes a recording.
pub struct Writer<W: Write> {
    out: BufWriter<W>,
}

impl<W: Write> Writer<W> {
    /// Writes the header.
    pub fn new(out: W, wall_offset_ns: i64, flags: u64) -> io::Result<Self> {
        let mut out = BufWriter::with_capacity(64 << 10, out);
        let header = Header {
            magic: MAGIC,
            version: VERSION,
            event_size: EVENT_SIZE as u32,
            wall_offset_ns,
            flags,
        };
        out.write_all(bytemuck::bytes_of(&header))?;
        Ok(Writer { out })
    }

    /// Appends events.
    pub fn write(&mut self, events: &[RawEvent]) -> io::Result<()> {
        self.out.write_all(bytemuck::cast_slice(events))
    }

    /// Flushes what is buffered.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Reads a recording, validating as it goes.
pub struct Reader<R: Read> {
    input: BufReader<R>,
    header: Header,
    offset: u64,
    buf: Vec<u8>,
}

/// Events read per batch.
const BATCH: usize = 4096;

impl<R: Read> Reader<R> {
    /// Reads and checks the header.
    pub fn new(input: R) -> Result<Self, RecordError> {
        let mut input = BufReader::with_capacity(64 << 10, input);
        let mut raw = [0u8; HEADER_SIZE];
        let n = read_full(&mut input, &mut raw)?;
        if n < MAGIC.len() || raw[..MAGIC.len()] != MAGIC {
            return Err(RecordError::NotARecording);
        }
        if n < HEADER_SIZE {
            return Err(RecordError::Truncated { offset: 0, len: n });
        }
        let header: Header = bytemuck::pod_read_unaligned(&raw);
        if header.version != VERSION {
            return Err(RecordError::Version {
                found: header.version,
            });
        }
        if header.event_size as usize != EVENT_SIZE {
            return Err(RecordError::EventSize {
                found: header.event_size,
            });
        }
        Ok(Reader {
            input,
            header,
            offset: HEADER_SIZE as u64,
            buf: vec![0; BATCH * EVENT_SIZE],
        })
    }

    /// The header read.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Appends the next batch of events to `out`; returns how many (0 at the end).
    pub fn next_batch(&mut self, out: &mut Vec<RawEvent>) -> Result<usize, RecordError> {
        let n = read_full(&mut self.input, &mut self.buf)?;
        let whole = n / EVENT_SIZE;
        for (i, chunk) in self.buf[..whole * EVENT_SIZE]
            .chunks_exact(EVENT_SIZE)
            .enumerate()
        {
            let ev: RawEvent = bytemuck::pod_read_unaligned(chunk);
            let offset = self.offset + (i * EVENT_SIZE) as u64;
            if let Err(e) = decode(&ev) {
                return Err(RecordError::Corrupt {
                    offset,
                    reason: e.to_string(),
                });
            }
            if ev._pad != [0; 2] {
                return Err(RecordError::Corrupt {
                    offset,
                    reason: "padding bytes are not zero".into(),
                });
            }
            out.push(ev);
        }
        if n % EVENT_SIZE != 0 {
            return Err(RecordError::Truncated {
                offset: self.offset + (whole * EVENT_SIZE) as u64,
                len: n % EVENT_SIZE,
            });
        }
        self.offset += n as u64;
        Ok(whole)
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::event::{State, Transition, encode, raw_lost};

    fn sample(n: u64) -> Vec<RawEvent> {
        (0..n)
            .map(|i| {
                if i % 5 == 4 {
                    return raw_lost(i, i);
                }
                encode(&Transition {
                    ts_ns: i,
                    skaddr: 0xffff_8000_0000_0000 + i,
                    local: "127.0.0.1:5000".parse().unwrap(),
                    remote: "[::1]:80".parse().unwrap(),
                    from: State::Established,
                    to: State::FinWait1,
                    in_from_ns: Some(i * 10),
                    owner: None,
                    mptcp: false,
                })
            })
            .map(|mut e| {
                e.family = tcptrace_common::AF_INET6;
                e
            })
            .collect()
    }

    fn recording(events: &[RawEvent]) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut w = Writer::new(&mut bytes, 123, 0).unwrap();
        w.write(events).unwrap();
        w.flush().unwrap();
        drop(w);
        bytes
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<RawEvent>, RecordError> {
        let mut r = Reader::new(bytes)?;
        let mut out = Vec::new();
        while r.next_batch(&mut out)? > 0 {}
        Ok(out)
    }

    #[test]
    fn round_trip_across_batches() {
        let events = sample(BATCH as u64 * 2 + 7);
        let bytes = recording(&events);
        assert_eq!(
            Reader::new(&bytes[..]).unwrap().header().wall_offset_ns,
            123
        );
        assert_eq!(read_all(&bytes).unwrap(), events);
    }

    #[test]
    fn errors_name_the_problem_and_the_byte() {
        let events = sample(3);
        let bytes = recording(&events);
        assert!(matches!(
            read_all(b"hello world"),
            Err(RecordError::NotARecording)
        ));
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert!(matches!(
            read_all(&v2),
            Err(RecordError::Version { found: 2 })
        ));
        let cut = &bytes[..bytes.len() - 10];
        let err = read_all(cut).unwrap_err();
        assert!(
            matches!(err, RecordError::Truncated { offset, len } if offset == 32 + 2 * 96 && len == 86),
            "{err}"
        );
        let mut bad = bytes.clone();
        bad[32 + 96 + 91] = 77; // the second event's oldstate
        let err = read_all(&bad).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the recording is corrupt at byte 128: unknown TCP state 77"
        );
    }

    proptest! {
        /// Arbitrary bytes after a valid header: an error or events, never a panic.
        #[test]
        fn arbitrary_input_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut bytes = recording(&[]);
            bytes.extend_from_slice(&tail);
            let _ = read_all(&bytes);
            let _ = read_all(&tail);
        }
    }
}
