//! Recordings: the raw event stream in a file, replayable through every view without root.
//!
//! Layout (little-endian), format 4: a 48-byte [`Header`] — magic `TCPTRACE`, format
//! version, event size, the wall-clock offset of the recording host's monotonic clock,
//! flags, the recording host's boot id — then fixed-size 112-byte [`RawEvent`] records
//! exactly as the kernel wrote them (plus the lost-events records userspace adds). A
//! connection record takes two consecutive records (kinds `CONNECTION` and
//! `CONNECTION_TAIL`); the header's [`header_flag::CONNECTIONS`] says they are there. One
//! into TIME_WAIT names its timewait socket in `aux` (0 in recordings made before it did,
//! read the same). A connection's details (kind `DETAILS`: bytes, segments, retransmissions, round-trip
//! times at its end) take one record right before its end transition or connection record;
//! [`header_flag::DETAILS`] says they are there.
//!
//! Format 3 is format 4 without details records, format 2 format 3 without connection
//! records: the same layout, read the same way.
//!
//! Format 1 (tcptrace before network namespaces and cgroups) is still read: a 32-byte
//! header (no boot id) and 96-byte records, the first 96 bytes of today's layout; its events
//! have no namespace or cgroup (0, unknown). Reading validates every record, so a truncated
//! or corrupt file is reported with the byte offset where the problem is, never a panic.

use std::io::{self, BufReader, BufWriter, Read, Write};

use bytemuck::{Pod, Zeroable};
use tcptrace_common::{EVENT_SIZE, EVENT_SIZE_V1};

use crate::model::event::{RawEvent, decode};

/// The first 8 bytes of every recording.
pub const MAGIC: [u8; 8] = *b"TCPTRACE";
/// The format version this build writes (it reads 1 to 4).
pub const VERSION: u32 = 4;
/// The oldest format version this build reads.
pub const OLDEST_VERSION: u32 = 1;

/// The file header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// The format version: [`VERSION`] when written by this build.
    pub version: u32,
    /// `size_of::<RawEvent>()` of the writer.
    pub event_size: u32,
    /// CLOCK_REALTIME − CLOCK_MONOTONIC on the recording host, in nanoseconds.
    pub wall_offset_ns: i64,
    /// Bits of [`header_flag`].
    pub flags: u64,
    /// The recording host's boot id (`/proc/sys/kernel/random/boot_id`), all zero when
    /// unknown (and in format 1). Cgroup ids and namespace inodes mean something only on
    /// the boot that produced them: a replay names cgroups only when this matches.
    pub boot_id: [u8; 16],
}

/// Bits of [`Header::flags`].
pub mod header_flag {
    /// The timewait sockets' timers were traced: TIME_WAIT exits are in the recording, and an
    /// entry without one means no timewait socket was created.
    pub const TIMERS_TRACED: u64 = 1 << 0;
    /// The kernel wrote a connection record at each connection's end (beside the
    /// transitions): views that fold connections read those.
    pub const CONNECTIONS: u64 = 1 << 1;
    /// The kernel wrote each connection's details (kind `DETAILS`) before its end.
    pub const DETAILS: u64 = 1 << 2;
}

const HEADER_SIZE: usize = std::mem::size_of::<Header>();
const _: () = assert!(HEADER_SIZE == 48);
/// The header of format 1: the same fields without the boot id.
const HEADER_SIZE_V1: usize = 32;

/// This host's boot id, all zero if it cannot be read.
pub fn boot_id() -> [u8; 16] {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .and_then(|s| parse_boot_id(&s))
        .unwrap_or([0; 16])
}

/// Parses a boot id as the kernel prints it (a UUID).
fn parse_boot_id(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.trim().chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

/// What is wrong with a recording.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("not a tcptrace recording (it does not start with the TCPTRACE header)")]
    NotARecording,
    #[error(
        "the recording is format version {found}, this tcptrace reads versions \
         {OLDEST_VERSION} to {VERSION}; replay it with the tcptrace that wrote it"
    )]
    Version { found: u32 },
    #[error(
        "the recording's events are {found} bytes, format version {version} has {expected}-byte \
         events"
    )]
    EventSize {
        found: u32,
        version: u32,
        expected: usize,
    },
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
    /// Writes the header (with this host's boot id: recordings are made where they are
    /// traced).
    pub fn new(out: W, wall_offset_ns: i64, flags: u64) -> io::Result<Self> {
        let mut out = BufWriter::with_capacity(64 << 10, out);
        let header = Header {
            magic: MAGIC,
            version: VERSION,
            event_size: EVENT_SIZE as u32,
            wall_offset_ns,
            flags,
            boot_id: boot_id(),
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
    /// The size of the file's records (smaller than [`EVENT_SIZE`] in format 1).
    event_size: usize,
    buf: Vec<u8>,
}

/// Events read per batch.
const BATCH: usize = 4096;

impl<R: Read> Reader<R> {
    /// Reads and checks the header.
    pub fn new(input: R) -> Result<Self, RecordError> {
        let mut input = BufReader::with_capacity(64 << 10, input);
        let mut raw = [0u8; HEADER_SIZE];
        let n = read_full(&mut input, &mut raw[..HEADER_SIZE_V1])?;
        if n < MAGIC.len() || raw[..MAGIC.len()] != MAGIC {
            return Err(RecordError::NotARecording);
        }
        if n < HEADER_SIZE_V1 {
            return Err(RecordError::Truncated { offset: 0, len: n });
        }
        let version = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        let (header_size, event_size) = match version {
            1 => (HEADER_SIZE_V1, EVENT_SIZE_V1),
            2 | 3 | VERSION => (HEADER_SIZE, EVENT_SIZE),
            found => return Err(RecordError::Version { found }),
        };
        let more = read_full(&mut input, &mut raw[HEADER_SIZE_V1..header_size])?;
        if more < header_size - HEADER_SIZE_V1 {
            return Err(RecordError::Truncated {
                offset: 0,
                len: n + more,
            });
        }
        // Format 1's header ends before the boot id, which stays zero (unknown).
        let header: Header = bytemuck::pod_read_unaligned(&raw);
        if header.event_size as usize != event_size {
            return Err(RecordError::EventSize {
                found: header.event_size,
                version,
                expected: event_size,
            });
        }
        Ok(Reader {
            input,
            header,
            offset: header_size as u64,
            event_size,
            buf: vec![0; BATCH * event_size],
        })
    }

    /// The header read.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Appends the next batch of events to `out`; returns how many (0 at the end).
    pub fn next_batch(&mut self, out: &mut Vec<RawEvent>) -> Result<usize, RecordError> {
        let size = self.event_size;
        let n = read_full(&mut self.input, &mut self.buf)?;
        let whole = n / size;
        for (i, chunk) in self.buf[..whole * size].chunks_exact(size).enumerate() {
            // A format-1 record is today's first 96 bytes; the rest stays zero (unknown).
            let mut ev: RawEvent = Zeroable::zeroed();
            bytemuck::bytes_of_mut(&mut ev)[..size].copy_from_slice(chunk);
            let offset = self.offset + (i * size) as u64;
            if let Err(e) = decode(&ev) {
                return Err(RecordError::Corrupt {
                    offset,
                    reason: e.to_string(),
                });
            }
            if ev._pad != [0; 2] || ev._pad2 != 0 {
                return Err(RecordError::Corrupt {
                    offset,
                    reason: "padding bytes are not zero".into(),
                });
            }
            out.push(ev);
        }
        if n % size != 0 {
            return Err(RecordError::Truncated {
                offset: self.offset + (whole * size) as u64,
                len: n % size,
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
    use crate::model::event::{State, Transition, encode, raw_lost};

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
                    netns: Some(4_026_531_840),
                    cgroup: Some(1 + i),
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
    fn the_header_carries_this_hosts_boot_id() {
        let bytes = recording(&[]);
        let h = *Reader::new(&bytes[..]).unwrap().header();
        assert_eq!((h.version, h.event_size), (VERSION, 112));
        assert_eq!(h.boot_id, boot_id());
        assert_eq!(
            parse_boot_id("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\n"),
            Some([
                0x0f, 0x1e, 0x2d, 0x3c, 0x4b, 0x5a, 0x69, 0x78, 0x87, 0x96, 0xa5, 0xb4, 0xc3, 0xd2,
                0xe1, 0xf0
            ])
        );
        assert_eq!(parse_boot_id("nope"), None);
        assert_eq!(parse_boot_id("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1fz"), None);
    }

    /// A format-1 recording: a 32-byte header and 96-byte records.
    fn recording_v1(events: &[RawEvent]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&96u32.to_le_bytes());
        bytes.extend_from_slice(&456i64.to_le_bytes());
        bytes.extend_from_slice(&header_flag::TIMERS_TRACED.to_le_bytes());
        for e in events {
            bytes.extend_from_slice(&bytemuck::bytes_of(e)[..96]);
        }
        bytes
    }

    #[test]
    fn format_1_recordings_are_read_without_namespaces_or_cgroups() {
        let events = sample(BATCH as u64 + 3);
        let bytes = recording_v1(&events);
        let r = Reader::new(&bytes[..]).unwrap();
        let h = *r.header();
        assert_eq!((h.version, h.event_size, h.wall_offset_ns), (1, 96, 456));
        assert_eq!(h.flags, header_flag::TIMERS_TRACED);
        assert_eq!(h.boot_id, [0; 16], "format 1 has no boot id");
        let read = read_all(&bytes).unwrap();
        let expected: Vec<RawEvent> = events
            .iter()
            .map(|e| RawEvent {
                netns: 0,
                cgroup: 0,
                ..*e
            })
            .collect();
        assert_eq!(read, expected);
        let Ok(crate::model::event::Event::Transition(t)) = decode(&read[0]) else {
            panic!("a transition")
        };
        assert_eq!((t.netns, t.cgroup), (None, None));
        // Its errors name bytes in its own layout.
        let cut = &bytes[..32 + 2 * 96 + 5];
        let err = read_all(cut).unwrap_err();
        assert!(
            matches!(err, RecordError::Truncated { offset, len } if offset == 32 + 2 * 96 && len == 5),
            "{err}"
        );
        let mut bad = recording_v1(&events[..3]);
        bad[32 + 96 + 91] = 77; // the second event's oldstate
        assert_eq!(
            read_all(&bad).unwrap_err().to_string(),
            "the recording is corrupt at byte 128: unknown TCP state 77"
        );
        let mut wrong_size = recording_v1(&[]);
        wrong_size[12] = 112;
        assert_eq!(
            read_all(&wrong_size).unwrap_err().to_string(),
            "the recording's events are 112 bytes, format version 1 has 96-byte events"
        );
    }

    #[test]
    fn errors_name_the_problem_and_the_byte() {
        let events = sample(3);
        let bytes = recording(&events);
        assert!(matches!(
            read_all(b"hello world"),
            Err(RecordError::NotARecording)
        ));
        let mut v5 = bytes.clone();
        v5[8] = 5;
        let err = read_all(&v5).unwrap_err();
        assert!(matches!(err, RecordError::Version { found: 5 }));
        assert!(err.to_string().contains("reads versions 1 to 4"), "{err}");
        // Formats 2 and 3 are format 4 without details or connection records.
        for older in [2, 3] {
            let mut v = bytes.clone();
            v[8] = older;
            assert_eq!(read_all(&v).unwrap(), events, "format {older}");
        }
        let mut v0 = bytes.clone();
        v0[8] = 0;
        assert!(matches!(
            read_all(&v0),
            Err(RecordError::Version { found: 0 })
        ));
        // A format-2 header cut inside its boot id.
        let err = read_all(&bytes[..40]).unwrap_err();
        assert!(
            matches!(err, RecordError::Truncated { offset: 0, len: 40 }),
            "{err}"
        );
        let mut small = bytes.clone();
        small[12] = 96;
        assert!(matches!(
            read_all(&small),
            Err(RecordError::EventSize {
                found: 96,
                version: VERSION,
                expected: 112
            })
        ));
        let cut = &bytes[..bytes.len() - 10];
        let err = read_all(cut).unwrap_err();
        assert!(
            matches!(err, RecordError::Truncated { offset, len } if offset == 48 + 2 * 112 && len == 102),
            "{err}"
        );
        let mut bad = bytes.clone();
        bad[48 + 112 + 91] = 77; // the second event's oldstate
        let err = read_all(&bad).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the recording is corrupt at byte 160: unknown TCP state 77"
        );
        let mut pad = bytes.clone();
        pad[48 + 100] = 1; // the first event's second padding
        assert_eq!(
            read_all(&pad).unwrap_err().to_string(),
            "the recording is corrupt at byte 48: padding bytes are not zero"
        );
    }

    proptest! {
        /// Arbitrary bytes after a valid header (of either format): an error or events,
        /// never a panic.
        #[test]
        fn arbitrary_input_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..2000)) {
            for mut bytes in [recording(&[]), recording_v1(&[])] {
                bytes.extend_from_slice(&tail);
                let _ = read_all(&bytes);
            }
            let _ = read_all(&tail);
        }
    }
}
