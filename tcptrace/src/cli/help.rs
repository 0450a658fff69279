//! The text after each command's help (`--help`, the man pages): examples, and what the
//! columns and the numbers mean.

pub(super) const EXAMPLES: &str = "\
Examples:
  sudo tcptrace                              every TCP state transition on the host
  sudo tcptrace --state TIME_WAIT            connections entering TIME_WAIT (who holds it?)
  sudo tcptrace --port 8080 --json           one port, as JSON lines
  sudo tcptrace --lport 443 --state CLOSE_WAIT   peers hung up, app has not closed yet
  sudo tcptrace -4 --raddr 10.0.0.0/8 --duration 30s
  sudo tcptrace --netns /run/netns/blue      one network namespace (or /proc/PID/ns/net)
  sudo tcptrace --cgroup /system.slice/nginx.service --show-ns   one service's sockets
  sudo tcptrace --cgroup 3f2a9c --json       one container (id prefix), with its cgroup
  sudo tcptrace --record trace.tcptrace      also save the raw events for later
  tcptrace --from trace.tcptrace --state SYN_SENT   replay a recording (no root needed)
  sudo tcptrace report --duration 1m         who closes first, per port
  sudo tcptrace top                          the same live, full screen, with TIME_WAIT held
  sudo tcptrace hist --port 443              how long each state lasts";

pub(super) const REPORT_EXAMPLES: &str = "\
Examples:
  sudo tcptrace report                       until Ctrl-C, then one table
  sudo tcptrace report --duration 5m --interval 1m   a table every minute
  sudo tcptrace report --lport 8080 --json   the server side of :8080, as JSON
  sudo tcptrace report --netns /run/netns/blue   one network namespace
  tcptrace report --from trace.tcptrace      from a recording

Columns: connections CLOSED per service port (the listening port when this host accepted
them, DIR in; the remote port when it connected, DIR out); who closed first (LOCAL, REMOTE,
SIMULT, UNKNOWN); how (resets sent and received, REFUSED, TIMEOUT); TIME_WAIT entered on this
host; the processes that owned them. Only the side that closes first holds TIME_WAIT.";

pub(super) const TOP_EXAMPLES: &str = "\
Examples:
  sudo tcptrace top                          every port, redrawn every second
  sudo tcptrace top --lport 8080 -i 2s       the server side of :8080, every 2 s
  sudo tcptrace top --netns /run/netns/blue  one network namespace

Columns (rows as in `tcptrace report`: per service port, DIR in when this host accepted the
connections, out when it made them): CLOSES/s over the last interval; CLOSED since the start;
LOCAL and REMOTE, the shares closed first by this host and by the peer; RESETS, connections
ended by a reset sent or received; TIME_WAIT held now on this host; TREND 1m, TIME_WAIT held
over the last minute, with an arrow for its way over the last 10 s. Below: the TIME_WAIT
sockets held, by age; then the most pressed destinations, as `tcptrace ports` counts them:
local ports held (IN_USE, of them TIME_WAIT) of those AVAIL, USAGE now and its PEAK,
CONN/s, FAILED connects for want of a port, EXHAUSTION at the current rise. The header has
the totals and the events lost.

Keys: c sort by closes/s, t by TIME_WAIT (the default), r by resets, p by port; / or f
filters by port (type it, Enter; empty shows every port; Esc cancels); q or Ctrl-C quits.

top needs a terminal; for a table every second in a pipe or a file use
`tcptrace report --interval 1s`.";

pub(super) const TIMEWAIT_EXAMPLES: &str = "\
Examples:
  sudo tcptrace timewait                     every 2 s until Ctrl-C, then a summary
  sudo tcptrace timewait --lport 8080 -i 10s the server side of :8080
  sudo tcptrace timewait --json --duration 1m

At start-up the TIME_WAIT sockets already present in every network namespace are read from
sock_diag (as `ss` does) and counted as `seeded`, their ages estimated from their timers;
those created later are traced.";

pub(super) const STUCK_EXAMPLES: &str = "\
Examples:
  sudo tcptrace stuck                        every 5 s: sockets stuck for 30 s or more
  sudo tcptrace stuck --state CLOSE_WAIT --older-than 5m --lport 8080
  sudo tcptrace stuck --json -i 1m

A socket's time in its state is known from the transition into it; one found at start
(sock_diag, in every namespace) was there before tracing began, and its age shows as a
lower bound (\"at least\").";

pub(super) const DOCTOR_EXAMPLES: &str = "\
Examples:
  sudo tcptrace doctor                       30 s of traffic, then one verdict per setting
  sudo tcptrace doctor --duration 5m --json  for a longer look, as data
  tcptrace doctor --from trace.tcptrace      judge a recording (settings read from this host)

Each finding: the setting and its value in the namespace, a verdict (problem, warning, ok,
info), the measurement behind it in one line, and what to do. Where the evidence says so,
the advice is to change who closes first (keep-alive, pooling, letting clients close)
rather than a sysctl. Exit status: 0 when nothing is a problem, 1 when something is.";

pub(super) const PORTS_EXAMPLES: &str = "\
Examples:
  sudo tcptrace ports                        every second until Ctrl-C
  sudo tcptrace ports --rport 5432 -i 5s     connections to PostgreSQL servers
  sudo tcptrace ports --json --duration 1m

A local port is held from connect() until the socket is gone, its TIME_WAIT included (the
side that closes first keeps it 60 s). Without bind() before connect(), one port serves many
destinations at once: ports run out per destination (local address, remote address and
port), each choosing from the namespace's ip_local_port_range minus ip_local_reserved_ports.
FAILED counts connects that found no free port (EADDRNOTAVAIL); EXHAUSTION is the time left
at the current rise.";

pub(super) const HIST_EXAMPLES: &str = "\
Examples:
  sudo tcptrace hist --duration 30s          every state, 30 seconds
  sudo tcptrace hist --state SYN_SENT        connect latency only
  sudo tcptrace hist --state CLOSE_WAIT --by port   where applications are slow to close
  sudo tcptrace hist --metric rtt            round-trip times per service port
  sudo tcptrace hist --metric bytes --port 443   how much each connection moved
  tcptrace hist --from trace.tcptrace --json";

pub(super) const SERVE_EXAMPLES: &str = "\
Examples:
  sudo tcptrace serve                        http://127.0.0.1:9977/metrics
  sudo tcptrace serve --listen 0.0.0.0:9977 --web-config web.yml
                                             for a Prometheus on another host, over TLS
  sudo tcptrace serve --label-port 443,5432,6379   also label these outgoing service ports
  sudo tcptrace serve --label-netns          one series per network namespace
  tcptrace serve --from trace.tcptrace       serve a recording's counts (no root)

Ports: a service port gets a `port` label of its own when this host listens on it (it
accepted connections there) or --label-port names it, up to --max-port-labels; every other
port is counted under port=\"other\". Without --label-netns there is no netns label.";
