//! Facts of the host the probe needs: its clocks, this process's capabilities, and kernel
//! symbols' addresses (`/proc/kallsyms`).

use std::fs;

use crate::shared::NS_PER_SEC;

/// The address of a kernel symbol; restricted `kallsyms` (zeros) is an error.
pub fn kallsyms_address(symbol: &str) -> Result<u64, String> {
    let text = fs::read_to_string("/proc/kallsyms").map_err(|e| format!("/proc/kallsyms: {e}"))?;
    find_symbol(&text, symbol)
}

/// Looks a symbol up in the text of `/proc/kallsyms`.
fn find_symbol(kallsyms: &str, symbol: &str) -> Result<u64, String> {
    let addr = kallsyms
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (a, _ty, name) = (f.next()?, f.next()?, f.next()?);
            (name == symbol).then(|| u64::from_str_radix(a, 16).ok())?
        })
        .next()
        .ok_or_else(|| format!("{symbol} is not in /proc/kallsyms"))?;
    if addr == 0 {
        return Err(format!(
            "/proc/kallsyms hides addresses (kernel.kptr_restrict, or no CAP_SYSLOG); {symbol} \
             cannot be located"
        ));
    }
    Ok(addr)
}

/// Nanoseconds of CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC) as u64
}

/// CLOCK_REALTIME minus CLOCK_MONOTONIC: add it to an event's timestamp for wall time.
pub fn wall_offset_ns() -> i64 {
    let mono = clock_ns(libc::CLOCK_MONOTONIC);
    let real = clock_ns(libc::CLOCK_REALTIME);
    (real - mono) as i64
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * i128::from(NS_PER_SEC) + i128::from(ts.tv_nsec)
}

/// The effective capabilities that matter to tcptrace.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    /// Running as root.
    pub root: bool,
    eff: u64,
}

impl Caps {
    fn has(&self, cap: u64) -> bool {
        self.root || self.eff & cap != 0
    }

    /// The first capability the core stream lacks, if any: loading and attaching tracing
    /// programs.
    pub fn missing(&self) -> Option<&'static str> {
        if self.root {
            return None;
        }
        [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
            .into_iter()
            .find(|(c, _)| !self.has(*c) && !self.has(CAP_SYS_ADMIN))
            .map(|(_, n)| n)
    }

    /// A line for `tcptrace check`.
    pub fn verdict(&self) -> Result<String, String> {
        if let Some(cap) = self.missing() {
            return Err(format!(
                "missing {cap}: run as root (`sudo tcptrace …`), or grant CAP_BPF, CAP_PERFMON, \
                 CAP_SYSLOG (and CAP_DAC_READ_SEARCH for kernels without BTF)"
            ));
        }
        if self.root {
            return Ok("root".into());
        }
        let mut line = String::from("CAP_BPF, CAP_PERFMON");
        for (cap, name, without) in [
            (CAP_SYSLOG, "CAP_SYSLOG", "no TIME_WAIT exits"),
            (
                CAP_DAC_READ_SEARCH,
                "CAP_DAC_READ_SEARCH",
                "kernels without BTF cannot be traced (tracefs)",
            ),
        ] {
            if self.has(cap) {
                line += &format!(", {name}");
            } else {
                line += &format!(" (no {name}: {without})");
            }
        }
        Ok(line)
    }
}

const CAP_DAC_READ_SEARCH: u64 = 1 << 2;
const CAP_SYS_ADMIN: u64 = 1 << 21;
const CAP_SYSLOG: u64 = 1 << 34;
const CAP_PERFMON: u64 = 1 << 38;
const CAP_BPF: u64 = 1 << 39;

/// This process's capabilities.
pub fn capabilities() -> Caps {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    Caps {
        // SAFETY: geteuid cannot fail.
        root: unsafe { libc::geteuid() } == 0,
        eff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kallsyms_lookup_and_restriction() {
        let text =
            "ffffffff820089e0 t __pfx_tw_timer_handler\nffffffff820089f0 t tw_timer_handler\n";
        assert_eq!(
            find_symbol(text, "tw_timer_handler"),
            Ok(0xffffffff820089f0)
        );
        let hidden = "0000000000000000 t tw_timer_handler\n";
        assert!(
            find_symbol(hidden, "tw_timer_handler")
                .unwrap_err()
                .contains("kptr_restrict")
        );
        assert!(
            find_symbol("", "tw_timer_handler")
                .unwrap_err()
                .contains("not in")
        );
    }
}
