//! Why a connection ended, as exactly as the kernel's own evidence says: the reason the
//! kernel gave for a reset this side sent (its `enum sk_rst_reason`, named as the running
//! kernel names it), the error it set on the socket (`sk_err`) and the timer state it left
//! (retransmissions, probes, `TCP_USER_TIMEOUT`, `SO_KEEPALIVE`), all read at the end.
//!
//! | reason | recognised by |
//! | --- | --- |
//! | `refused` | the SYN was answered with a reset (`how: refused`, or `sk_err` ECONNREFUSED) |
//! | `abort_on_close`, `abort_on_data`, `abort_on_linger`, `abort_on_memory`, `state`, … | a reset this side sent: the kernel's `sk_rst_reason` name without `SK_RST_REASON_` and `TCP_`, lower case |
//! | `syn_timeout` | `sk_err` ETIMEDOUT, the socket never left SYN_SENT |
//! | `user_timeout` | `sk_err` ETIMEDOUT with `TCP_USER_TIMEOUT` set (it decides every timeout then) |
//! | `rto_timeout` | `sk_err` ETIMEDOUT after retransmissions (`icsk_retransmits` > 0) |
//! | `keepalive` | the reset the kernel sends when keepalive probes went unanswered (`TCP_KEEPALIVE_TIMEOUT`, Linux 6.10 on), or before that `sk_err` ETIMEDOUT, `SO_KEEPALIVE` set, unanswered probes and no retransmission |
//! | `probe_timeout` | `sk_err` ETIMEDOUT, unanswered zero-window probes (no keepalive) |
//! | `host_unreachable`, `net_unreachable` | `sk_err` EHOSTUNREACH, ENETUNREACH (an ICMP error, then the timeout) |
//! | `peer_reset` | a reset arrived (`how: rst_received`, or `sk_err` ECONNRESET, EPIPE) |
//! | `fin` | an orderly close (`how: fin`) and no error |
//! | `unknown` | anything else: no guess |

use std::{collections::HashMap, sync::Arc};

use crate::{
    analysis::closes::{Close, How},
    source::btf::Btf,
};

/// The kernel's names of `enum sk_rst_reason`, by value, without the `SK_RST_REASON_`
/// prefix (`NO_SOCKET`, `TCP_ABORT_ON_DATA`, …): read from the running kernel's BTF, since
/// the numbering changes between versions. Each with the `reason` it gives a close, made
/// once. Cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct ResetNames(Arc<HashMap<u32, Named>>);

/// One reset reason: the kernel's name and the close `reason` it stands for.
#[derive(Debug)]
struct Named {
    kernel: String,
    reason: String,
}

impl Named {
    fn new(kernel: &str) -> Named {
        let reason = kernel
            .strip_prefix("TCP_")
            .unwrap_or(kernel)
            .to_ascii_lowercase();
        Named {
            kernel: kernel.to_string(),
            // Kernels that reset a connection whose keepalive probes went unanswered say so
            // with their reset; older ones end it silently: one name for both.
            reason: match reason.as_str() {
                "keepalive_timeout" => "keepalive".into(),
                _ => reason,
            },
        }
    }
}

impl ResetNames {
    /// The names in `btf`; none when it has no such enum (Linux before 6.10).
    pub fn from_btf(btf: &Btf) -> ResetNames {
        let Ok(all) = btf.enumerators("sk_rst_reason") else {
            return ResetNames::default();
        };
        ResetNames::from_pairs(
            all.iter()
                .map(|(name, v)| (*v, name.strip_prefix("SK_RST_REASON_").unwrap_or(name))),
        )
    }

    /// The running kernel's names (none without `/sys/kernel/btf/vmlinux`).
    pub fn from_sys() -> ResetNames {
        Btf::from_sys()
            .map(|b| ResetNames::from_btf(&b))
            .unwrap_or_default()
    }

    /// From `(value, name)` pairs, names without the `SK_RST_REASON_` prefix.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (u32, &'a str)>) -> ResetNames {
        ResetNames(Arc::new(
            pairs.into_iter().map(|(v, n)| (v, Named::new(n))).collect(),
        ))
    }

    /// The kernel's name of reason `n`, when it has one.
    pub fn name(&self, n: u32) -> Option<&str> {
        self.0.get(&n).map(|r| r.kernel.as_str())
    }
}

/// Why `c` ended (see the module's table); `names` names the kernel's reset reasons.
pub fn end_reason<'a>(c: &Close, names: &'a ResetNames) -> &'a str {
    if c.how == How::Refused {
        return "refused";
    }
    if c.how == How::RstSent
        && let Some(r) = c.reset_reason.and_then(|n| names.0.get(&n))
    {
        return &r.reason;
    }
    if let Some(r) = c.details.as_ref().and_then(|d| from_error(c, d)) {
        return r;
    }
    match c.how {
        How::RstReceived => "peer_reset",
        How::Fin => "fin",
        _ => "unknown",
    }
}

/// The reason the socket's error and timer state at its end give, if any.
fn from_error(c: &Close, d: &crate::model::event::Details) -> Option<&'static str> {
    let err = i32::try_from(d.sk_err).ok()?;
    Some(match err {
        libc::ETIMEDOUT => timeout(c, d)?,
        libc::ECONNREFUSED => "refused",
        libc::ECONNRESET | libc::EPIPE => "peer_reset",
        libc::EHOSTUNREACH => "host_unreachable",
        libc::ENETUNREACH => "net_unreachable",
        _ => return None,
    })
}

/// Which timer gave up on the socket.
fn timeout(c: &Close, d: &crate::model::event::Details) -> Option<&'static str> {
    use crate::model::event::State;
    let bit = |s: State| c.states & (1 << s as u16) != 0;
    if bit(State::SynSent) && !bit(State::Established) {
        return Some("syn_timeout");
    }
    if d.user_timeout_ms != 0 {
        return Some("user_timeout");
    }
    if d.retransmits > 0 {
        return Some("rto_timeout");
    }
    if d.probes_out > 0 {
        return Some(if d.keepalive() {
            "keepalive"
        } else {
            "probe_timeout"
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        analysis::closes::{Initiator, Role},
        model::event::{Details, State},
    };
    use tcptrace_common::details::details_flag;

    fn close(how: How, states: &[State], details: Option<Details>, rst: Option<u32>) -> Close {
        Close {
            ts_ns: 1,
            skaddr: 1,
            local: "10.0.0.1:40000".parse().unwrap(),
            remote: "10.0.0.2:80".parse().unwrap(),
            initiator: Initiator::Unknown,
            how,
            timewait: false,
            role: Role::Client,
            lifetime_ns: None,
            owner: None,
            midlife: false,
            states: states.iter().map(|s| 1u16 << *s as u16).sum(),
            netns: None,
            cgroup: None,
            details,
            reset_reason: rst,
        }
    }

    fn err(sk_err: i32, f: impl FnOnce(&mut Details)) -> Option<Details> {
        let mut d = Details {
            sk_err: sk_err as u32,
            ..Details::default()
        };
        f(&mut d);
        Some(d)
    }

    #[test]
    fn each_reason_from_its_evidence() {
        use State::*;
        let names = ResetNames::from_pairs([
            (8, "TCP_ABORT_ON_DATA"),
            (11, "TCP_ABORT_ON_CLOSE"),
            (15, "TCP_KEEPALIVE_TIMEOUT"),
            (1, "NO_SOCKET"),
        ]);
        let live = [SynSent, Established, Close];
        let cases = [
            (
                close(How::Refused, &[SynSent, Close], None, None),
                "refused",
            ),
            (close(How::RstSent, &live, None, Some(11)), "abort_on_close"),
            (close(How::RstSent, &live, None, Some(8)), "abort_on_data"),
            (close(How::RstSent, &live, None, Some(15)), "keepalive"),
            // A number this kernel does not name: no guess.
            (close(How::RstSent, &live, None, Some(99)), "unknown"),
            (
                close(
                    How::Timeout,
                    &[SynSent, Close],
                    err(libc::ETIMEDOUT, |d| d.retransmits = 1),
                    None,
                ),
                "syn_timeout",
            ),
            (
                close(
                    How::Timeout,
                    &live,
                    err(libc::ETIMEDOUT, |d| d.user_timeout_ms = 1000),
                    None,
                ),
                "user_timeout",
            ),
            (
                close(
                    How::Timeout,
                    &live,
                    err(libc::ETIMEDOUT, |d| d.retransmits = 6),
                    None,
                ),
                "rto_timeout",
            ),
            (
                close(
                    How::Timeout,
                    &live,
                    err(libc::ETIMEDOUT, |d| {
                        d.probes_out = 2;
                        d.flags = details_flag::KEEPALIVE;
                    }),
                    None,
                ),
                "keepalive",
            ),
            (
                close(
                    How::Timeout,
                    &live,
                    err(libc::ETIMEDOUT, |d| d.probes_out = 2),
                    None,
                ),
                "probe_timeout",
            ),
            // A timeout whose timer the evidence does not show: no guess.
            (
                close(How::Timeout, &live, err(libc::ETIMEDOUT, |_| ()), None),
                "unknown",
            ),
            (close(How::Timeout, &live, None, None), "unknown"),
            (
                close(
                    How::Timeout,
                    &[SynSent, Close],
                    err(libc::EHOSTUNREACH, |_| ()),
                    None,
                ),
                "host_unreachable",
            ),
            (
                close(How::RstReceived, &live, err(libc::ECONNRESET, |_| ()), None),
                "peer_reset",
            ),
            (close(How::RstReceived, &live, None, None), "peer_reset"),
            (close(How::Fin, &live, err(0, |_| ()), None), "fin"),
            (close(How::Unknown, &live, None, None), "unknown"),
        ];
        for (c, want) in cases {
            assert_eq!(end_reason(&c, &names), want, "{c:?}");
        }
    }

    #[test]
    fn the_running_kernels_reset_reasons_are_named() {
        let names = ResetNames::from_sys();
        let Ok(btf) = Btf::from_sys() else {
            eprintln!("SKIPPED: no kernel BTF");
            return;
        };
        // Linux 6.10 on: every value the kernel defines has its name, prefix removed.
        if let Ok(all) = btf.enumerators("sk_rst_reason") {
            assert!(!all.is_empty());
            for (name, v) in all {
                let short = names.name(v).unwrap();
                assert_eq!(format!("SK_RST_REASON_{short}"), name);
            }
        }
    }
}
