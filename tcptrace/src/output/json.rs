//! The stream as JSON lines, for pipelines: one object per event, in the schema
//! `docs/json.md` documents. The hot records (transitions, closes) are written by hand
//! into a reused buffer; the serde structs beside them are their oracle in the tests.

use std::{
    borrow::Cow,
    io::{self, Write},
    net::{IpAddr, SocketAddr},
};

use serde::Serialize;

use super::{NsJson, Renderer, WallTime, wall_ns};
use crate::{
    analysis::closes::Close,
    model::{
        cgroup::CgroupName,
        event::{Details, Transition},
    },
    shared::NS_PER_SEC,
};

/// A kernel address, as `0xffff…` in JSON.
#[derive(Clone, Copy, Debug)]
pub(super) struct Hex(pub(super) u64);

impl Serialize for Hex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:#x}", self.0))
    }
}

/// A second's `YYYY-MM-DDTHH:MM:SS.` in UTC, kept while events stay in that second.
#[derive(Default)]
pub(super) struct SecondCache {
    second: Option<i128>,
    text: Vec<u8>,
}

impl SecondCache {
    /// Appends `unix_ns` as [`WallTime`] prints it.
    fn write(&mut self, b: &mut Vec<u8>, unix_ns: i128) {
        let (sec, nanos) = (
            unix_ns.div_euclid(i128::from(NS_PER_SEC)),
            unix_ns.rem_euclid(i128::from(NS_PER_SEC)),
        );
        if self.second != Some(sec) {
            let whole = WallTime(sec * i128::from(NS_PER_SEC)).to_string();
            // Without the nine zeros and the Z: "…:SS."; an invalid time has no such tail.
            let Some(prefix) = whole.strip_suffix("000000000Z") else {
                b.extend_from_slice(WallTime(unix_ns).to_string().as_bytes());
                return;
            };
            self.text.clear();
            self.text.extend_from_slice(prefix.as_bytes());
            self.second = Some(sec);
        }
        b.extend_from_slice(&self.text);
        let mut digits = [b'0'; 9];
        let mut n = nanos as u32;
        for d in digits.iter_mut().rev() {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
        b.extend_from_slice(&digits);
        b.push(b'Z');
    }
}

/// Writes a transition's JSON record (without the newline). It is the stream's hottest line
/// — ten per connection — so it is written by hand from pre-escaped keys; a property test
/// holds it byte for byte to what serde_json makes of [`TransitionJson`].
pub(super) fn transition_json(
    b: &mut Vec<u8>,
    second: &mut SecondCache,
    ns: &mut NsJson,
    wall: i128,
    t: &Transition,
) {
    let mut num = itoa::Buffer::new();
    ends_json(
        b,
        second,
        br#"{"kind":"transition","time":""#,
        wall,
        t.local,
        t.remote,
    );
    b.extend_from_slice(br#","from":""#);
    b.extend_from_slice(t.from.name().as_bytes());
    b.extend_from_slice(br#"","to":""#);
    b.extend_from_slice(t.to.name().as_bytes());
    b.extend_from_slice(br#"","in_from_ns":"#);
    match t.in_from_ns {
        Some(d) => b.extend_from_slice(num.format(d).as_bytes()),
        None => b.extend_from_slice(b"null"),
    }
    match &t.owner {
        Some(o) => {
            b.extend_from_slice(br#","pid":"#);
            b.extend_from_slice(num.format(o.pid).as_bytes());
            b.extend_from_slice(br#","comm":"#);
            // Process names are the user's: serde_json escapes them.
            let _ = serde_json::to_writer(&mut *b, &o.comm.as_str());
            b.extend_from_slice(if o.from_listener {
                br#","pid_from":"listener","skaddr":""#
            } else {
                br#","pid_from":"socket","skaddr":""#
            });
        }
        None => b.extend_from_slice(br#","pid":null,"comm":null,"pid_from":null,"skaddr":""#),
    }
    let _ = write!(b, "{:#x}", t.skaddr);
    b.extend_from_slice(if t.mptcp {
        br#"","mptcp":true,"netns":"#
    } else {
        br#"","mptcp":false,"netns":"#
    });
    match t.netns {
        Some(n) => b.extend_from_slice(num.format(n).as_bytes()),
        None => b.extend_from_slice(b"null"),
    }
    ns.cgroup_into(b, t.cgroup);
    b.push(b'}');
}

/// Writes `start` (`{"kind":"…","time":"`, pre-escaped), then the time and both ends, as
/// serde_json writes a [`Common`] with both ends (up to and including `rport`'s value).
fn ends_json(
    b: &mut Vec<u8>,
    second: &mut SecondCache,
    start: &[u8],
    wall: i128,
    local: SocketAddr,
    remote: SocketAddr,
) {
    let mut num = itoa::Buffer::new();
    b.extend_from_slice(start);
    second.write(b, wall);
    b.extend_from_slice(if local.is_ipv4() {
        br#"","family":4,"laddr":""#
    } else {
        br#"","family":6,"laddr":""#
    });
    ip_into(b, local.ip());
    b.extend_from_slice(br#"","lport":"#);
    b.extend_from_slice(num.format(local.port()).as_bytes());
    b.extend_from_slice(br#","raddr":""#);
    ip_into(b, remote.ip());
    b.extend_from_slice(br#"","rport":"#);
    b.extend_from_slice(num.format(remote.port()).as_bytes());
}

/// Writes a close's JSON record (without the newline): two per connection, so written by
/// hand like [`transition_json`]; a property test holds it to serde_json's [`CloseJson`].
pub(super) fn close_json(
    b: &mut Vec<u8>,
    second: &mut SecondCache,
    ns: &mut NsJson,
    (wall, reason): (i128, &str),
    c: &Close,
) {
    let mut num = itoa::Buffer::new();
    ends_json(
        b,
        second,
        br#"{"kind":"close","time":""#,
        wall,
        c.local,
        c.remote,
    );
    // The names are plain identifiers: nothing to escape.
    b.extend_from_slice(br#","initiator":""#);
    b.extend_from_slice(c.initiator.name().as_bytes());
    b.extend_from_slice(br#"","how":""#);
    b.extend_from_slice(c.how.name().as_bytes());
    b.extend_from_slice(if c.timewait {
        br#"","timewait":true,"role":""#
    } else {
        br#"","timewait":false,"role":""#
    });
    b.extend_from_slice(c.role.name().as_bytes());
    b.extend_from_slice(br#"","lifetime_ns":"#);
    match c.lifetime_ns {
        Some(d) => b.extend_from_slice(num.format(d).as_bytes()),
        None => b.extend_from_slice(b"null"),
    }
    b.extend_from_slice(if c.midlife {
        br#","midlife":true,"pid":"#
    } else {
        br#","midlife":false,"pid":"#
    });
    match &c.owner {
        Some(o) => {
            b.extend_from_slice(num.format(o.pid).as_bytes());
            b.extend_from_slice(br#","comm":"#);
            // Process names are the user's: serde_json escapes them.
            let _ = serde_json::to_writer(&mut *b, &o.comm.as_str());
        }
        None => b.extend_from_slice(br#"null,"comm":null"#),
    }
    b.extend_from_slice(br#","skaddr":""#);
    let _ = write!(b, "{:#x}", c.skaddr);
    b.extend_from_slice(br#"","netns":"#);
    match c.netns {
        Some(n) => b.extend_from_slice(num.format(n).as_bytes()),
        None => b.extend_from_slice(b"null"),
    }
    ns.cgroup_into(b, c.cgroup);
    details_json(b, c.details.as_ref());
    // The reason is a plain identifier: nothing to escape.
    b.extend_from_slice(br#","reason":""#);
    b.extend_from_slice(reason.as_bytes());
    b.extend_from_slice(br#""}"#);
}

/// Appends a close's counters (`null` each when they were not read), as serde_json writes
/// [`DetailsJson`].
fn details_json(b: &mut Vec<u8>, d: Option<&Details>) {
    let mut num = itoa::Buffer::new();
    let mut field = |name: &[u8], v: Option<u64>| {
        b.extend_from_slice(name);
        match v {
            Some(v) => b.extend_from_slice(num.format(v).as_bytes()),
            None => b.extend_from_slice(b"null"),
        }
    };
    let v = DetailsJson::new(d);
    field(br#","bytes_sent":"#, v.bytes_sent);
    field(br#","bytes_received":"#, v.bytes_received);
    field(br#","segs_out":"#, v.segs_out);
    field(br#","segs_in":"#, v.segs_in);
    field(br#","retrans":"#, v.retrans);
    field(br#","srtt_us":"#, v.srtt_us);
    field(br#","rttvar_us":"#, v.rttvar_us);
    field(br#","min_rtt_us":"#, v.min_rtt_us);
}

/// A close's counters in its JSON record.
#[derive(Serialize)]
pub(super) struct DetailsJson {
    bytes_sent: Option<u64>,
    bytes_received: Option<u64>,
    segs_out: Option<u64>,
    segs_in: Option<u64>,
    retrans: Option<u64>,
    srtt_us: Option<u64>,
    rttvar_us: Option<u64>,
    min_rtt_us: Option<u64>,
}

impl DetailsJson {
    pub(super) fn new(d: Option<&Details>) -> Self {
        let srtt = d.and_then(Details::srtt_us);
        DetailsJson {
            bytes_sent: d.map(|d| d.bytes_acked),
            bytes_received: d.map(|d| d.bytes_received),
            segs_out: d.map(|d| d.segs_out.into()),
            segs_in: d.map(|d| d.segs_in.into()),
            retrans: d.map(|d| d.total_retrans.into()),
            srtt_us: srtt.map(u64::from),
            // A deviation without a smoothed time means nothing.
            rttvar_us: d.filter(|_| srtt.is_some()).map(|d| d.rttvar_us.into()),
            min_rtt_us: d.and_then(Details::min_rtt_us).map(u64::from),
        }
    }
}

/// A cgroup in JSON: its path when resolved, else its id.
#[derive(Clone, Copy, Debug)]
enum CgroupValue<'a> {
    Path(&'a str),
    Id(u64),
}

impl Serialize for CgroupValue<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            CgroupValue::Path(p) => s.serialize_str(p),
            CgroupValue::Id(id) => s.serialize_u64(*id),
        }
    }
}

/// The cgroup fields of a record.
#[derive(Serialize)]
struct CgroupFields<'a> {
    cgroup: Option<CgroupValue<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<&'a str>,
}

impl<'a> CgroupFields<'a> {
    pub(super) fn new(id: Option<u64>, name: Option<&'a CgroupName>) -> Self {
        CgroupFields {
            cgroup: id.map(|id| match name {
                Some(n) => CgroupValue::Path(&n.path),
                None => CgroupValue::Id(id),
            }),
            container: name.and_then(|n| n.container.as_ref().map(|c| c.id.as_str())),
            pod: name.and_then(|n| n.pod.as_deref()),
        }
    }
}

/// The namespace and cgroup fields every socket record ends with (docs/json.md).
#[derive(Serialize)]
pub(super) struct NsFields<'a> {
    netns: Option<u32>,
    #[serde(flatten)]
    cgroup: CgroupFields<'a>,
}

impl<'a> NsFields<'a> {
    pub(super) fn new(netns: Option<u32>, id: Option<u64>, name: Option<&'a CgroupName>) -> Self {
        NsFields {
            netns,
            cgroup: CgroupFields::new(id, name),
        }
    }
}

/// An address as serde (and `Display`) writes it; IPv4 without the formatting machinery.
fn ip_into(b: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut num = itoa::Buffer::new();
            for (i, o) in v4.octets().iter().enumerate() {
                if i > 0 {
                    b.push(b'.');
                }
                b.extend_from_slice(num.format(*o).as_bytes());
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(b, "{v6}");
        }
    }
}

/// The transition record's schema, as serde would write it: the oracle of the hand-written
/// [`transition_json`].
#[cfg(test)]
#[derive(Serialize)]
pub(super) struct TransitionJson<'a> {
    #[serde(flatten)]
    pub(super) common: Common,
    pub(super) from: &'static str,
    pub(super) to: &'static str,
    pub(super) in_from_ns: Option<u64>,
    pub(super) pid: Option<u32>,
    pub(super) comm: Option<Cow<'a, str>>,
    pub(super) pid_from: Option<&'static str>,
    pub(super) skaddr: Hex,
    pub(super) mptcp: bool,
    #[serde(flatten)]
    pub(super) ns: NsFields<'a>,
}

#[derive(Serialize)]
pub(super) struct ResetJson<'a> {
    #[serde(flatten)]
    pub(super) common: Common,
    pub(super) direction: &'static str,
    pub(super) state: Option<&'static str>,
    pub(super) reason: Option<u32>,
    pub(super) reason_name: Option<&'a str>,
    pub(super) pid: Option<u32>,
    pub(super) comm: Option<Cow<'a, str>>,
    pub(super) skaddr: Option<Hex>,
    #[serde(flatten)]
    pub(super) ns: NsFields<'a>,
}

/// The close record's schema, as serde would write it: the oracle of the hand-written
/// [`close_json`].
#[cfg(test)]
#[derive(Serialize)]
pub(super) struct CloseJson<'a> {
    #[serde(flatten)]
    pub(super) common: Common,
    pub(super) initiator: &'static str,
    pub(super) how: &'static str,
    pub(super) timewait: bool,
    pub(super) role: &'static str,
    pub(super) lifetime_ns: Option<u64>,
    pub(super) midlife: bool,
    pub(super) pid: Option<u32>,
    pub(super) comm: Option<Cow<'a, str>>,
    pub(super) skaddr: Hex,
    #[serde(flatten)]
    pub(super) ns: NsFields<'a>,
    #[serde(flatten)]
    pub(super) details: DetailsJson,
    pub(super) reason: &'a str,
}

#[derive(Serialize)]
pub(super) struct TimewaitJson<'a> {
    #[serde(flatten)]
    pub(super) common: Common,
    pub(super) end: &'static str,
    pub(super) residency_ns: Option<u64>,
    pub(super) rearms: u32,
    pub(super) substate: &'static str,
    pub(super) pid: Option<u32>,
    pub(super) comm: Option<Cow<'a, str>>,
    pub(super) twaddr: Option<Hex>,
    #[serde(flatten)]
    pub(super) ns: NsFields<'a>,
}

#[derive(Serialize)]
pub(super) struct LostJson {
    #[serde(flatten)]
    pub(super) common: Common,
    pub(super) count: u64,
}

/// The fields every JSON record starts with (docs/json.md).
#[derive(Serialize)]
pub(super) struct Common {
    kind: &'static str,
    time: WallTime,
    family: Option<u8>,
    laddr: Option<IpAddr>,
    lport: Option<u16>,
    raddr: Option<IpAddr>,
    rport: Option<u16>,
}

impl Renderer {
    /// Writes one JSON record and its newline.
    pub(super) fn json_line(
        &mut self,
        out: &mut impl Write,
        rec: &impl Serialize,
    ) -> io::Result<()> {
        self.json.clear();
        serde_json::to_writer(&mut self.json, rec)?;
        self.json.push(b'\n');
        out.write_all(&self.json)
    }

    /// The common fields of a JSON record; `ends` (local, remote) when it has endpoints.
    pub(super) fn common(
        &self,
        kind: &'static str,
        ts_ns: u64,
        ends: Option<(SocketAddr, SocketAddr)>,
    ) -> Common {
        Common {
            kind,
            time: WallTime(wall_ns(ts_ns, self.style.wall_offset_ns)),
            family: ends.map(|(l, _)| if l.is_ipv4() { 4 } else { 6 }),
            laddr: ends.map(|(l, _)| l.ip()),
            lport: ends.map(|(l, _)| l.port()),
            raddr: ends.map(|(_, r)| r.ip()),
            rport: ends.map(|(_, r)| r.port()),
        }
    }
}

/// At most this many cgroups' rendered fields are kept.
const NS_JSON_CAP: usize = 4096;

impl NsJson {
    /// Appends `,"cgroup":…` and, when recognised, `,"container":…` and `,"pod":…`, as
    /// serde_json writes [`NsFields`] after its `netns`.
    fn cgroup_into(&mut self, b: &mut Vec<u8>, cgroup: Option<u64>) {
        let Some(id) = cgroup else {
            b.extend_from_slice(br#","cgroup":null"#);
            return;
        };
        if let Some(f) = self.fields.get(&id) {
            b.extend_from_slice(f);
            return;
        }
        let Some(name) = self.names.resolve(id) else {
            // Not cached: the cgroup may be found by a later walk.
            let mut num = itoa::Buffer::new();
            b.extend_from_slice(br#","cgroup":"#);
            b.extend_from_slice(num.format(id).as_bytes());
            return;
        };
        let mut fields = serde_json::to_vec(&CgroupFields::new(Some(id), Some(&name)))
            .unwrap_or_else(|_| b"{}".to_vec());
        // `{"cgroup":…}` → `,"cgroup":…`
        fields[0] = b',';
        fields.pop();
        b.extend_from_slice(&fields);
        if self.fields.len() >= NS_JSON_CAP {
            self.fields.clear();
        }
        self.fields.insert(id, fields.into_boxed_slice());
    }
}
