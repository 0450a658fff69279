//! Synthetic events in, rendered text and JSON out: the stream view without a kernel.

use tcptrace::{
    analysis::reason::ResetNames,
    model::{
        cgroup::{CgroupFilter, Cgroups},
        event::{
            Comm, Details, Direction, Owner, RawEvent, Reset, State, TimerEvent, TimerOp,
            Transition, encode, encode_details, encode_reset, encode_timer, raw_lost,
        },
        filter::Filter,
    },
    output::{Format, Renderer, Style},
    views::{Flow, View, stream::Stream},
};

const SEC: u64 = 1_000_000_000;
/// 2026-11-25T10:00:00Z minus the synthetic monotonic clock's zero.
const WALL: i64 = 1_795_600_800 * SEC as i64;

/// The client's network namespace (a container's) and the host's.
const CLIENT_NS: u32 = 4_026_532_100;
const HOST_NS: u32 = 4_026_531_840;
const CONTAINER: &str = "4f1c1e6a7b2d9c8e0f3a5b6c7d8e9f0a1b2c3d4e5f60718293a4b5c6d7e8f901";

/// The cgroups of the workload: the client in a docker container, the server a systemd
/// service; id 13 (the IPv6 socket's) is not found.
fn names() -> Cgroups {
    Cgroups::from_paths([
        (11, format!("/system.slice/docker-{CONTAINER}.scope")),
        (12, "/system.slice/nginx.service".to_string()),
    ])
}

/// The (netns, cgroup) of each synthetic socket.
fn ns_of(sk: u64) -> (Option<u32>, Option<u64>) {
    match sk {
        0xa => (Some(CLIENT_NS), Some(11)),
        0xb => (Some(HOST_NS), Some(12)),
        _ => (Some(HOST_NS), Some(13)),
    }
}

fn owner(pid: u32, name: &str, from_listener: bool) -> Option<Owner> {
    let mut comm = [0u8; 16];
    comm[..name.len()].copy_from_slice(name.as_bytes());
    Some(Owner {
        pid,
        comm: Comm(comm),
        from_listener,
    })
}

/// A client on 10.0.0.5 that closes first, its server, an IPv6 connection the peer resets
/// (seen mid-life), a refused SYN, a loss notice, and the client's TIME_WAIT expiring.
fn workload() -> Vec<RawEvent> {
    let mut events = client_and_server();
    events.extend(reset_and_refusal());
    events.push(raw_lost(5 * SEC, 17));
    events.extend(client_timewait());
    // In time order, as the kernel delivers them.
    events.sort_by_key(|e| e.ts_ns);
    with_details_at_ends(events)
}

/// The client (socket 0xa, 10.0.0.5) and its server (0xb, nginx on 10.0.0.9:8080), from
/// the connect to the server's last ACK; the client closes first.
fn client_and_server() -> Vec<RawEvent> {
    use State::*;
    let c = "10.0.0.5:41000".parse().unwrap();
    let s = "10.0.0.9:8080".parse().unwrap();
    let curl = owner(4242, "curl", false);
    let nginx = owner(777, "nginx", true);
    let nginx_closing = owner(777, "nginx", false);
    // When, which socket, from, to, the time in `from`, the owner.
    #[rustfmt::skip]
    let steps = [
        (SEC, 0xa, Close, SynSent, None, curl),
        (SEC + 120_000, 0xb, Listen, SynRecv, None, nginx),
        (SEC + 150_000, 0xa, SynSent, Established, Some(150_000), curl),
        (SEC + 160_000, 0xb, SynRecv, Established, Some(40_000), nginx),
        (3 * SEC, 0xa, Established, FinWait1, Some(2 * SEC - 150_000), curl),
        (3 * SEC + 50_000, 0xb, Established, CloseWait, Some(2 * SEC - 110_000), nginx),
        (3 * SEC + 90_000, 0xa, FinWait1, FinWait2, Some(90_000), curl),
        (3 * SEC + 2_000_000, 0xb, CloseWait, LastAck, Some(1_950_000), nginx_closing),
        (3 * SEC + 2_050_000, 0xa, FinWait2, TimeWait, Some(1_960_000), curl),
        (3 * SEC + 2_080_000, 0xb, LastAck, Close, Some(80_000), nginx_closing),
    ];
    steps
        .into_iter()
        .map(|(ts_ns, sk, from, to, in_from_ns, owner)| {
            let (local, remote) = match (sk, from) {
                // The connect's first step, before the kernel picked the client's port.
                (0xa, Close) => ("10.0.0.5:0".parse().unwrap(), s),
                (0xa, _) => (c, s),
                _ => (s, c),
            };
            encode(&Transition {
                ts_ns,
                skaddr: sk,
                local,
                remote,
                from,
                to,
                in_from_ns,
                owner,
                mptcp: false,
                netns: ns_of(sk).0,
                cgroup: ns_of(sk).1,
            })
        })
        .collect()
}

/// An IPv6 connection (0xc) that the peer resets, seen only at its end, and a SYN to a port
/// nothing listens on: refused, with no socket.
fn reset_and_refusal() -> Vec<RawEvent> {
    let local = "[2001:db8:ffff:ffff:ffff:ffff:ffff:1]:443".parse().unwrap();
    let remote = "[2001:db8::42]:50000".parse().unwrap();
    vec![
        encode_reset(&Reset {
            ts_ns: 4 * SEC - 1_000,
            skaddr: Some(0xc),
            local,
            remote,
            direction: Direction::Received,
            state: None,
            reason: None,
            owner: None,
            netns: ns_of(0xc).0,
            cgroup: ns_of(0xc).1,
        }),
        encode(&Transition {
            ts_ns: 4 * SEC,
            skaddr: 0xc,
            local,
            remote,
            from: State::Established,
            to: State::Close,
            in_from_ns: Some(61 * SEC),
            owner: None,
            mptcp: false,
            netns: ns_of(0xc).0,
            cgroup: ns_of(0xc).1,
        }),
        encode_reset(&Reset {
            ts_ns: 4 * SEC + 500,
            skaddr: None,
            local: "10.0.0.9:9999".parse().unwrap(),
            remote: "10.0.0.5:41001".parse().unwrap(),
            direction: Direction::Sent,
            state: None,
            reason: Some(1),
            owner: None,
            netns: None,
            cgroup: None,
        }),
    ]
}

/// The client's timewait socket (0xd): armed as it entered TIME_WAIT, expired 2MSL later.
fn client_timewait() -> Vec<RawEvent> {
    let timer = |ts_ns, op| {
        encode_timer(&TimerEvent {
            ts_ns,
            tw: 0xd,
            substate_at_end: None,
            op,
        })
    };
    let armed = TimerOp::Armed {
        substate: State::TimeWait,
        timeout_jiffies: 15000,
        local: "10.0.0.5:41000".parse().unwrap(),
        remote: "10.0.0.9:8080".parse().unwrap(),
        netns: Some(CLIENT_NS),
        rearm: false,
    };
    vec![
        timer(3 * SEC + 2_049_000, armed),
        timer(63 * SEC + 300_000_000, TimerOp::Cancelled),
        timer(63 * SEC + 300_000_100, TimerOp::Expired),
    ]
}

/// `events` with the counters the kernel read at the client's and the server's ends, each
/// right before that end.
fn with_details_at_ends(mut events: Vec<RawEvent>) -> Vec<RawEvent> {
    for (sk, sent, received, srtt_us, retrans) in [
        (0xa, 1_048_578, 1_201, 41, 3),
        (0xb, 1_201, 1_048_577, 37, 0),
    ] {
        let end = events
            .iter()
            .rposition(|e| e.skaddr == sk && e.kind == tcptrace_common::kind::TRANSITION)
            .unwrap();
        let d = Details {
            ts_ns: events[end].ts_ns,
            skaddr: sk,
            bytes_acked: sent,
            bytes_received: received,
            segs_out: 760,
            segs_in: 740,
            total_retrans: retrans,
            srtt_us,
            rttvar_us: 9,
            min_rtt_us: 21,
            ..Details::default()
        };
        events.insert(end, encode_details(&d));
    }
    events
}

fn render(format: Format, filter: Filter) -> String {
    render_ns(format, filter, false)
}

fn render_ns(format: Format, filter: Filter, show_ns: bool) -> String {
    let style = Style {
        wall_offset_ns: WALL,
        utc_offset_secs: 0,
        color: false,
        addr_width: Style::addr_width_for(filter.family),
    };
    let mut view = Stream::new(
        filter.compile().with_cgroups(names()),
        Renderer::new(format, style)
            .with_cgroups(names())
            .reset_names(ResetNames::from_pairs([(1, "NO_SOCKET")]))
            .show_ns(show_ns),
        Vec::new(),
        None,
    )
    .timers(true);
    view.start().unwrap();
    assert_eq!(view.push(&workload()).unwrap(), Flow::More);
    view.finish().unwrap();
    String::from_utf8(view.into_inner()).unwrap()
}

#[test]
fn text_stream() {
    insta::assert_snapshot!(render(Format::Text, Filter::default()));
}

#[test]
fn json_stream() {
    let out = render(Format::Json, Filter::default());
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for key in ["kind", "time", "family", "laddr", "lport", "raddr", "rport"] {
            assert!(v.get(key).is_some(), "{key} missing in {line}");
        }
    }
    insta::assert_snapshot!(out);
}

#[test]
fn text_stream_with_namespaces_and_cgroups() {
    insta::assert_snapshot!(render_ns(Format::Text, Filter::default(), true));
}

/// Every record of a socket carries its namespace and cgroup, and the filters select by
/// them in every kind of record: transitions, resets, closes, timewait exits.
#[test]
fn namespace_and_cgroup_filters_select_whole_sockets() {
    // Loss notices are always shown: they belong to no socket.
    let lines = |f: Filter| -> Vec<serde_json::Value> {
        render(Format::Json, f)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["kind"] != "lost")
            .collect()
    };
    let all = lines(Filter::default());
    for v in &all {
        assert!(v.get("netns").is_some() && v.get("cgroup").is_some(), "{v}");
        if v["laddr"] == "10.0.0.5" {
            assert_eq!(v["netns"], CLIENT_NS, "{v}");
            if v["kind"] != "timewait" {
                assert_eq!(v["container"], CONTAINER, "{v}");
            }
        }
    }
    let kinds = |vs: &[serde_json::Value]| -> Vec<String> {
        vs.iter()
            .map(|v| v["kind"].as_str().unwrap().to_string())
            .collect()
    };
    // The client's namespace: its five transitions, its close and its TIME_WAIT's end.
    let client = lines(Filter {
        netns: vec![CLIENT_NS],
        ..Filter::default()
    });
    assert!(
        client.iter().all(|v| v["laddr"] == "10.0.0.5"),
        "{client:#?}"
    );
    assert_eq!(client.len(), 7, "{client:#?}");
    assert_eq!(
        kinds(&client).iter().filter(|k| *k == "timewait").count(),
        1
    );
    // The server's cgroup: its transitions and close, nothing of the IPv6 socket in the
    // same namespace but an unresolved cgroup.
    let server = lines(Filter {
        cgroups: vec![CgroupFilter::parse("/system.slice/nginx.service", None).unwrap()],
        ..Filter::default()
    });
    assert!(
        server
            .iter()
            .all(|v| v["cgroup"] == "/system.slice/nginx.service"),
        "{server:#?}"
    );
    assert_eq!(server.len(), 6, "{server:#?}");
    // A container by id prefix: the client's sockets (the timewait socket's end carries the
    // cgroup of the close that made it).
    let container = lines(Filter {
        cgroups: vec![CgroupFilter::parse(&CONTAINER[..8], None).unwrap()],
        ..Filter::default()
    });
    assert_eq!(container.len(), 7, "{container:#?}");
    // The host's namespace: the server and the IPv6 socket with its reset; the refused
    // SYN has no socket, hence no namespace.
    let host = lines(Filter {
        netns: vec![HOST_NS],
        ..Filter::default()
    });
    assert!(host.iter().all(|v| v["netns"] == HOST_NS), "{host:#?}");
    assert_eq!(
        host.iter().filter(|v| v["kind"] == "reset").count(),
        1,
        "{host:#?}"
    );
}

#[test]
fn time_wait_filter_on_ipv4_text() {
    let f = Filter {
        states: vec![State::TimeWait],
        family: Some(4),
        ..Filter::default()
    };
    insta::assert_snapshot!(render(Format::Text, f));
}

/// The stream with every filter off, no colour, UTC, IPv4-wide columns, into a buffer.
fn plain_stream(format: Format, limit: Option<u64>) -> Stream<Vec<u8>> {
    let style = Style {
        wall_offset_ns: 0,
        utc_offset_secs: 0,
        color: false,
        addr_width: 21,
    };
    Stream::new(
        Filter::default().compile(),
        Renderer::new(format, style),
        Vec::new(),
        limit,
    )
}

#[test]
fn count_limit_stops_the_view() {
    for format in [Format::Json, Format::Text] {
        let mut view = plain_stream(format, Some(3));
        assert_eq!(view.push(&workload()).unwrap(), Flow::Done);
        // The run's end concludes what waits: none of it goes past the limit.
        view.finish().unwrap();
        assert_eq!(view.shown(), 3, "transitions, resets and closes all count");
        assert_eq!(
            String::from_utf8(view.into_inner())
                .unwrap()
                .lines()
                .count(),
            3,
            "{format:?}"
        );
    }
}

/// An abort (ESTABLISHED → CLOSE with no reset yet) waits for its reset before its close is
/// concluded; another socket's transition comes meanwhile. Text shows the close first, in
/// time order; JSON writes records as they are concluded, each with its time.
fn late_close(format: Format) -> Vec<String> {
    let (a, b): (std::net::SocketAddr, std::net::SocketAddr) = (
        "10.0.0.5:41000".parse().unwrap(),
        "10.0.0.9:8080".parse().unwrap(),
    );
    let t = |ts: u64, sk: u64, from, to| {
        encode(&Transition {
            ts_ns: ts,
            skaddr: sk,
            local: a,
            remote: b,
            from,
            to,
            in_from_ns: None,
            owner: None,
            mptcp: false,
            netns: None,
            cgroup: None,
        })
    };
    let mut view = plain_stream(format, None);
    view.start().unwrap();
    let ms = 1_000_000;
    view.push(&[t(SEC, 0xa, State::Close, State::SynSent)])
        .unwrap();
    view.push(&[t(SEC + ms, 0xa, State::SynSent, State::Established)])
        .unwrap();
    view.push(&[t(SEC + 2 * ms, 0xa, State::Established, State::Close)])
        .unwrap();
    view.push(&[t(SEC + 10 * ms, 0xb, State::Close, State::SynSent)])
        .unwrap();
    // Past the reset's grace: the abort is concluded without one.
    view.tick(SEC + 500 * ms).unwrap();
    let out = String::from_utf8(view.into_inner()).unwrap();
    out.lines()
        .filter(|l| l.contains("closed") || l.contains("\"close\"") || l.contains("SYN_SENT"))
        .map(|l| {
            if l.contains("closed") || l.contains("\"close\"") {
                "close a".to_string()
            } else if l.contains("→ SYN_SENT") || l.contains("\"to\":\"SYN_SENT\"") {
                "connect".to_string()
            } else {
                "other".to_string()
            }
        })
        .collect()
}

#[test]
fn text_lines_come_in_time_order_though_a_close_is_concluded_late() {
    assert_eq!(
        late_close(Format::Text),
        ["connect", "other", "close a", "connect"],
        "the second connect (10 ms) comes after the close (2 ms)"
    );
    assert_eq!(
        late_close(Format::Json),
        ["connect", "other", "connect", "close a"],
        "JSON writes each record when it is concluded"
    );
}

fn report(format: Format) -> String {
    use tcptrace::views::report::Report;
    let mut view = Report::new(
        Filter::default().compile(),
        0,
        Vec::new(),
        format,
        WALL,
        None,
    )
    .timers(true);
    view.start().unwrap();
    view.push(&workload()).unwrap();
    view.finish().unwrap();
    String::from_utf8(view.into_inner()).unwrap()
}

#[test]
fn report_text() {
    insta::assert_snapshot!(report(Format::Text));
}

#[test]
fn report_json() {
    let out = report(Format::Json);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        v["connections"], 3,
        "two sides of one connection and a reset one"
    );
    insta::assert_snapshot!(out);
}

fn hist(format: Format, by: tcptrace::views::hist::By) -> String {
    hist_of(format, by, tcptrace::views::hist::Metric::State)
}

fn hist_of(
    format: Format,
    by: tcptrace::views::hist::By,
    metric: tcptrace::views::hist::Metric,
) -> String {
    use tcptrace::views::hist::Hist;
    let mut view =
        Hist::new(Filter::default().compile(), &[], by, Vec::new(), format).metric(metric);
    view.push(&workload()).unwrap();
    view.finish().unwrap();
    String::from_utf8(view.into_inner()).unwrap()
}

#[test]
fn hist_text() {
    insta::assert_snapshot!(hist(Format::Text, tcptrace::views::hist::By::State));
}

#[test]
fn hist_json_by_port() {
    let out = hist(Format::Json, tcptrace::views::hist::By::Port);
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let total: u64 = v["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["count"].as_u64().unwrap())
            .sum();
        assert_eq!(v["count"], total, "every sample is in a bucket: {line}");
    }
    insta::assert_snapshot!(out);
}

/// Each connection's counters and lifetime, per service port: what the kernel read at the
/// ends (rtt, bytes both ways) and what the tracker measured (lifetime).
#[test]
fn hist_of_connections() {
    use tcptrace::views::hist::{By, Metric};
    let mut out = String::new();
    for metric in [Metric::Rtt, Metric::Bytes, Metric::Lifetime] {
        out.push_str(&hist_of(Format::Text, By::State, metric));
        let json = hist_of(Format::Json, By::State, metric);
        for line in json.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["port"], 8080, "per service port: {line}");
            assert_eq!(v["count"], 1, "one connection per role: {line}");
        }
        out.push_str(&json);
    }
    insta::assert_snapshot!(out);
}

fn population(format: Format) -> String {
    use tcptrace::views::timewait::Population;
    let mut view = Population::new(
        Filter::default().compile(),
        Vec::new(),
        format,
        WALL,
        30 * SEC,
        true,
    );
    view.push(&workload()).unwrap();
    view.finish().unwrap();
    String::from_utf8(view.into_inner()).unwrap()
}

#[test]
fn timewait_view_text() {
    insta::assert_snapshot!(population(Format::Text));
}

#[test]
fn timewait_view_json() {
    let out = population(Format::Json);
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(
        (last["kind"].as_str(), last["expired"].as_u64()),
        (Some("timewait_summary"), Some(1))
    );
    insta::assert_snapshot!(out);
}

/// The exposition, with the process's own (varying) metrics left out and each family's
/// series in a fixed order (the families keep them in hash maps).
fn exposition(labels: tcptrace::views::serve::metrics::LabelConfig) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    let mut view = tcptrace::views::serve::metrics::Metrics::new(
        Filter::default().compile(),
        labels,
        &mut registry,
    )
    .timers(true);
    view.start().unwrap();
    assert_eq!(view.push(&workload()).unwrap(), Flow::More);
    view.finish().unwrap();
    let (text, _) = tcptrace::views::serve::http::render(&registry, false);
    sorted_series(&text)
}

/// Sorts each run of sample lines by series (labels without `le`), then bucket bound.
fn sorted_series(text: &str) -> String {
    let key = |line: &str| {
        let (name, rest) = line.split_once('{').unwrap_or((line, ""));
        let labels = rest.split_once('}').map_or("", |(l, _)| l);
        let (others, le): (Vec<&str>, Vec<&str>) =
            labels.split(',').partition(|l| !l.starts_with("le="));
        let le = le.first().map_or(f64::INFINITY, |l| {
            l.trim_start_matches("le=\"")
                .trim_end_matches('"')
                .parse()
                .unwrap_or(f64::INFINITY)
        });
        (others.join(","), name.to_string(), le)
    };
    let mut out = Vec::new();
    let mut run: Vec<&str> = Vec::new();
    let flush = |run: &mut Vec<&str>, out: &mut Vec<String>| {
        run.sort_by(|a, b| key(a).partial_cmp(&key(b)).unwrap());
        out.extend(run.drain(..).map(String::from));
    };
    for line in text.lines().filter(|l| !l.contains("process_")) {
        if line.starts_with('#') {
            flush(&mut run, &mut out);
            out.push(line.to_string());
        } else {
            run.push(line);
        }
    }
    flush(&mut run, &mut out);
    out.join("\n") + "\n"
}

/// The value of the series `name{labels}` (labels as written, in order), if served.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_exposition() {
    let text = exposition(tcptrace::views::serve::metrics::LabelConfig::default());
    // The client closed first and holds the TIME_WAIT; its server saw the peer close first.
    // 8080 has a listener here, so both ends get their own label; the refused SYN to 9999
    // and the IPv6 connection first seen mid-life (port 443, nothing seen listening) are
    // `other`.
    let closes = |labels: &str| sample(&text, &format!("tcptrace_closes_total{{{labels}}}"));
    assert_eq!(
        closes(r#"port="8080",role="client",initiator="local",how="fin""#),
        Some(1.0)
    );
    assert_eq!(
        closes(r#"port="8080",role="server",initiator="remote",how="fin""#),
        Some(1.0)
    );
    assert_eq!(
        closes(r#"port="other",role="server",initiator="local",how="refused""#),
        Some(1.0)
    );
    assert_eq!(
        closes(r#"port="other",role="unknown",initiator="remote",how="rst_received""#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"tcptrace_timewait_entries_total{port="8080"}"#),
        Some(1.0)
    );
    // Entered, then expired: none left.
    assert_eq!(
        sample(&text, r#"tcptrace_timewait_sockets{port="8080"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"tcptrace_timewait_exits_total{port="8080",end="expired"}"#
        ),
        Some(1.0)
    );
    // 60.3 s in TIME_WAIT (armed at 3.002 s, expired at 63.3 s): in the (60, 60.5] bucket.
    let residency = |le: &str| {
        sample(
            &text,
            &format!(
                r#"tcptrace_timewait_residency_seconds_bucket{{substate="TIME_WAIT",le="{le}"}}"#
            ),
        )
    };
    assert_eq!((residency("60"), residency("60.5")), (Some(0.0), Some(1.0)));
    assert_eq!(sample(&text, "tcptrace_lost_events_total"), Some(17.0));
    assert_eq!(
        sample(
            &text,
            r#"tcptrace_transitions_total{from="SYN_SENT",to="ESTABLISHED"}"#
        ),
        Some(1.0)
    );
    // SYN_SENT lasted 150 µs: connect latency in the (100 µs, 250 µs] bucket.
    assert_eq!(
        sample(
            &text,
            r#"tcptrace_state_duration_seconds_bucket{state="SYN_SENT",le="0.0001"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"tcptrace_state_duration_seconds_bucket{state="SYN_SENT",le="0.00025"}"#
        ),
        Some(1.0)
    );
    insta::assert_snapshot!(text);
}

#[test]
fn metrics_port_labels_are_bounded_and_allow_listed() {
    use tcptrace::views::serve::metrics::{LabelConfig, PortPolicy};
    // One label allowed, and it goes to the listener seen first: 8080. The allow-list
    // names 443, but the cap is reached.
    let text = exposition(LabelConfig {
        ports: PortPolicy {
            allow: vec![443..=443, 9000..=9999],
            max: 1,
        },
        ..LabelConfig::default()
    });
    assert!(text.contains(r#"port="8080""#));
    assert!(!text.contains(r#"port="443""#), "{text}");
    assert!(!text.contains(r#"port="9999""#), "{text}");
    // Room for more: the allow-listed ports get theirs, with or without a listener.
    let text = exposition(LabelConfig {
        ports: PortPolicy {
            allow: vec![443..=443, 9000..=9999],
            max: 10,
        },
        ..LabelConfig::default()
    });
    assert!(text.contains(r#"port="443",role="unknown""#), "{text}");
    assert!(text.contains(r#"port="9999",role="server""#), "{text}");
    assert!(!text.contains(r#"port="other""#), "{text}");
}

/// The kernel's default port range in every namespace, whatever the host's.
struct DefaultRanges;

impl tcptrace::views::ports::Ranges for DefaultRanges {
    fn range(&mut self, _: Option<u32>) -> tcptrace::views::ports::PortRange {
        tcptrace::views::ports::PortRange::DEFAULT
    }
}

/// `tcptrace top` on a test terminal: the workload's first five seconds, then a refresh every
/// second until 20 s, keys pressed before the first.
fn top_screen(keys: &str) -> String {
    use tcptrace::views::top::{Top, draw::Clock};
    let keys: std::collections::VecDeque<_> = keys
        .chars()
        .map(|c| crossterm::event::Event::Key(crossterm::event::KeyCode::Char(c).into()))
        .collect();
    let terminal = ratatui::Terminal::new(ratatui::backend::TestBackend::new(110, 24)).unwrap();
    let clock = Clock {
        wall_offset_ns: WALL,
        utc_offset_secs: 0,
    };
    let mut view = Top::new(
        Filter::default().compile(),
        0,
        terminal,
        Box::new(keys),
        SEC,
        clock,
    )
    .timers(true)
    .port_ranges(Box::new(DefaultRanges));
    let early: Vec<RawEvent> = workload()
        .into_iter()
        .filter(|e| e.ts_ns <= 5 * SEC)
        .collect();
    view.start().unwrap();
    view.push(&early).unwrap();
    for s in 5..=20 {
        assert_eq!(view.tick(s * SEC).unwrap(), Flow::More);
    }
    view.finish().unwrap();
    view.terminal().backend().to_string()
}

#[test]
fn top_screen_rows_trend_ages_and_totals() {
    insta::assert_snapshot!(top_screen(""));
}

#[test]
fn top_screen_sorted_by_port_with_the_filter_prompt_open() {
    insta::assert_snapshot!(top_screen("p/44"));
}
