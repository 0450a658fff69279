//! tracefs: where tracepoints' format files are (mounting tracefs when nothing has), and
//! the offsets the classic programs read their records at, parsed from those files.

use std::{
    collections::HashMap,
    fmt, fs,
    path::{Path, PathBuf},
};

use tcptrace_common::{
    ABSENT, ReceiveResetOffsets, SendResetOffsets, SetStateOffsets, TimewaitOffsets,
};

use super::probe::ProbeError;

/// Where tracefs may be mounted.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Why a tracepoint's format file could not be read.
#[derive(Debug)]
pub enum FormatUnread {
    /// Not found, or tracefs is closed to this process.
    Missing(ProbeError),
    /// Found, but reading it failed (`path: error`).
    Unreadable(String),
}

impl fmt::Display for FormatUnread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatUnread::Missing(e) => e.fmt(f),
            FormatUnread::Unreadable(s) => f.write_str(s),
        }
    }
}

impl From<FormatUnread> for ProbeError {
    fn from(e: FormatUnread) -> ProbeError {
        match e {
            FormatUnread::Missing(e) => e,
            FormatUnread::Unreadable(s) => ProbeError::NoTracepoint(s),
        }
    }
}

/// The text of the format file of tracepoint `category:name`: the one reader of format files.
pub fn read_format(category: &str, name: &str) -> Result<String, FormatUnread> {
    let path = tracepoint_format(category, name).map_err(FormatUnread::Missing)?;
    fs::read_to_string(&path)
        .map_err(|e| FormatUnread::Unreadable(format!("{}: {e}", path.display())))
}

/// The path of a tracepoint's format file, mounting tracefs if no tracefs is mounted.
fn tracepoint_format(category: &str, name: &str) -> Result<PathBuf, ProbeError> {
    let rel = format!("events/{category}/{name}/format");
    let find = || {
        TRACEFS
            .iter()
            .map(|root| Path::new(root).join(&rel))
            .find(|p| p.is_file())
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    // Without root, tracefs (mode 0700) is unreadable unless CAP_DAC_READ_SEARCH lifts that.
    if let Some(root) = TRACEFS
        .iter()
        .find(|r| fs::read_dir(r).is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied))
    {
        return Err(ProbeError::NoTracefsAccess(root.to_string()));
    }
    let tracefs_mounted = TRACEFS
        .iter()
        .any(|root| Path::new(root).join("events").is_dir());
    // SAFETY: geteuid cannot fail.
    if !tracefs_mounted && unsafe { libc::geteuid() } == 0 {
        let _ = std::process::Command::new("mount")
            .args(["-t", "tracefs", "tracefs", TRACEFS[0]])
            .status();
        if let Some(p) = find() {
            log::info!("mounted tracefs at {}", TRACEFS[0]);
            return Ok(p);
        }
    }
    Err(ProbeError::NoTracepoint(format!(
        "looked for {rel} under {}",
        TRACEFS.join(" and ")
    )))
}

/// The fields of one tracepoint's format file, name → (offset, size), looked up with their
/// sizes checked.
struct Fields<'a> {
    tracepoint: &'static str,
    fields: HashMap<&'a str, (u16, u16)>,
}

impl<'a> Fields<'a> {
    /// Parses `text`, the format file of `tracepoint`: the one parser of format files.
    fn parse(tracepoint: &'static str, text: &'a str) -> Fields<'a> {
        let mut fields = HashMap::new();
        for line in text.lines() {
            let Some(rest) = line.trim().strip_prefix("field:") else {
                continue;
            };
            let mut decl = "";
            let mut offset = None;
            let mut size = None;
            for (i, part) in rest.split(';').enumerate() {
                let part = part.trim();
                if i == 0 {
                    decl = part;
                } else if let Some(v) = part.strip_prefix("offset:") {
                    offset = v.parse().ok();
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = v.parse().ok();
                }
            }
            let name = decl
                .rsplit([' ', '*'])
                .next()
                .unwrap_or("")
                .split('[')
                .next()
                .unwrap_or("");
            if let (Some(o), Some(s)) = (offset, size) {
                fields.insert(name, (o, s));
            }
        }
        Fields { tracepoint, fields }
    }

    fn get(&self, name: &str, size: u16) -> Result<u16, String> {
        match self.fields.get(name) {
            Some(&(o, s)) if s == size => Ok(o),
            Some(&(_, s)) => Err(format!(
                "{}: field {name} has size {s}, expected {size}",
                self.tracepoint
            )),
            None => Err(format!("{}: field {name} is missing", self.tracepoint)),
        }
    }
}

/// Reads the field offsets tcptrace needs from `sock:inet_sock_set_state`'s format file.
pub fn parse_set_state_format(text: &str) -> Result<SetStateOffsets, String> {
    let f = Fields::parse("sock:inet_sock_set_state", text);
    let protocol = f
        .get("protocol", 2)
        .map_err(|e| format!("{e} (the protocol field needs Linux 4.18 or later)"))?;
    let mut o = SetStateOffsets {
        skaddr: f.get("skaddr", 8)?,
        oldstate: f.get("oldstate", 4)?,
        newstate: f.get("newstate", 4)?,
        sport: f.get("sport", 2)?,
        dport: f.get("dport", 2)?,
        family: f.get("family", 2)?,
        protocol,
        saddr_v6: f.get("saddr_v6", 16)?,
        daddr_v6: f.get("daddr_v6", 16)?,
        known_layout: 0,
    };
    o.known_layout = u16::from(o.is_known());
    Ok(o)
}

/// Reads `tcp:tcp_send_reset`'s offsets (the `reason` field exists from Linux 6.10 on).
pub fn parse_send_reset_format(text: &str) -> Result<SendResetOffsets, String> {
    let f = Fields::parse("tcp:tcp_send_reset", text);
    Ok(SendResetOffsets {
        skaddr: f.get("skaddr", 8)?,
        state: f.get("state", 4)?,
        reason: f.get("reason", 4).unwrap_or(ABSENT),
        saddr: f.get("saddr", 28)?,
        daddr: f.get("daddr", 28)?,
        _pad: 0,
    })
}

/// Reads `tcp:tcp_receive_reset`'s offsets.
pub fn parse_receive_reset_format(text: &str) -> Result<ReceiveResetOffsets, String> {
    let f = Fields::parse("tcp:tcp_receive_reset", text);
    Ok(ReceiveResetOffsets {
        skaddr: f.get("skaddr", 8)?,
        sport: f.get("sport", 2)?,
        dport: f.get("dport", 2)?,
        family: f.get("family", 2)?,
        saddr_v6: f.get("saddr_v6", 16)?,
        daddr_v6: f.get("daddr_v6", 16)?,
    })
}

/// Where the classic timer programs find their fields in the `timer:*` tracepoints' records.
pub fn timer_format_offsets(o: &mut TimewaitOffsets) -> Result<(), String> {
    let format = |name: &str| read_format("timer", name).map_err(|e| e.to_string());
    let (start, expire, cancel) = (
        format("timer_start")?,
        format("timer_expire_entry")?,
        format("timer_cancel")?,
    );
    let start = Fields::parse("timer:timer_start", &start);
    let expire = Fields::parse("timer:timer_expire_entry", &expire);
    let cancel = Fields::parse("timer:timer_cancel", &cancel);
    o.start_timer = start.get("timer", 8)?;
    o.start_function = start.get("function", 8)?;
    o.start_expires = start.get("expires", 8)?;
    o.start_now = start.get("now", 8)?;
    o.expire_timer = expire.get("timer", 8)?;
    o.expire_function = expire.get("function", 8)?;
    o.cancel_timer = cancel.get("timer", 8)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The format file as Linux 6.x prints it (see `/sys/kernel/tracing/events/sock/
    /// inet_sock_set_state/format`).
    const FORMAT: &str = "name: inet_sock_set_state
ID: 1416
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;
";

    #[test]
    fn parses_the_format_file() {
        let o = parse_set_state_format(FORMAT).unwrap();
        assert_eq!(
            (o.skaddr, o.oldstate, o.newstate, o.sport, o.dport),
            (8, 16, 20, 24, 26)
        );
        assert_eq!(
            (o.family, o.protocol, o.saddr_v6, o.daddr_v6),
            (28, 30, 40, 56)
        );
        // This kernel's layout is the one compiled into the program's fast path.
        assert_eq!(o.known_layout, 1);
        // Any other layout is read field by field, at the offsets parsed.
        let moved = parse_set_state_format(&FORMAT.replace("offset:56", "offset:64")).unwrap();
        assert_eq!((moved.daddr_v6, moved.known_layout), (64, 0));
    }

    #[test]
    fn parses_the_reset_formats() {
        let send = "\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:enum sk_rst_reason reason;\toffset:28;\tsize:4;\tsigned:0;
\tfield:__u8 saddr[28];\toffset:32;\tsize:28;\tsigned:0;
\tfield:__u8 daddr[28];\toffset:60;\tsize:28;\tsigned:0;";
        let o = parse_send_reset_format(send).unwrap();
        assert_eq!(
            (o.skaddr, o.state, o.reason, o.saddr, o.daddr),
            (16, 24, 28, 32, 60)
        );
        let old_kernel: String = send
            .lines()
            .filter(|l| !l.contains("reason"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(parse_send_reset_format(&old_kernel).unwrap().reason, ABSENT);
        let recv = FORMAT.replace("sock:", "tcp:");
        let o = parse_receive_reset_format(&recv).unwrap();
        assert_eq!((o.skaddr, o.sport, o.family, o.saddr_v6), (8, 24, 28, 40));
    }

    #[test]
    fn a_missing_or_resized_field_is_an_error() {
        let no_proto: String = FORMAT
            .lines()
            .filter(|l| !l.contains("protocol"))
            .collect::<Vec<_>>()
            .join("\n");
        let err = parse_set_state_format(&no_proto).unwrap_err();
        assert!(err.contains("field protocol is missing"), "{err}");
        let resized = FORMAT.replace(
            "int oldstate;\toffset:16;\tsize:4",
            "int oldstate;\toffset:16;\tsize:8",
        );
        let err = parse_set_state_format(&resized).unwrap_err();
        assert!(err.contains("oldstate has size 8"), "{err}");
    }
}
