//! The HTTP side of `tcptrace serve`: `/metrics` in the Prometheus text format (or
//! OpenMetrics, when the scraper asks for it), on a thread of its own so that a scrape never
//! delays the reading of the ring buffer, nor the other way round; over TLS and behind basic
//! authentication when a web config asks for it ([`crate::views::serve::webconfig`]).
//!
//! Slow or hostile clients cannot starve the scrapes: a client gets [`HANDSHAKE_TIMEOUT`] for
//! its TLS handshake and [`HEADER_TIMEOUT`] for each request head, and when
//! [`MAX_CONNECTIONS`] are open, each new one closes the stalest (the one whose last accept
//! or request is oldest), so that a scrape, always the newest, gets through.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{SocketAddr, TcpListener},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{encoding, registry::Registry};
use tokio::sync::oneshot;

use crate::views::serve::webconfig::{Verdict, WebConfig};

/// Connections open at once (fewer when the process may not open as many descriptors);
/// past it, each new one closes the stalest. Memory stays bounded: a request head's buffer
/// (MAX_REQUEST_HEAD_BYTES) and a TLS record (about 18 KiB) each, and a response body only
/// while its client reads it (WRITE_TIMEOUT); a few KiB each in practice.
pub const MAX_CONNECTIONS: usize = 2048;

/// A client that has not finished its TLS handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// A client that has not sent a request's head by then (from the connection's start, or
/// from the previous response on a kept-alive one) is dropped.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(3);

/// The largest request head accepted (hyper's smallest read buffer): a scrape's is a few
/// hundred bytes.
const MAX_REQUEST_HEAD_BYTES: usize = 8 << 10;

/// Threads that check passwords with bcrypt (slow by design), away from the serving thread.
const BCRYPT_THREADS: usize = 1;

/// Password checks queued at once; past them a request is answered 503 at once, so that a
/// flood of bad credentials can neither grow memory nor delay Prometheus's scrape for long.
const BCRYPT_QUEUED: usize = 8;

/// A response a client does not read by then (a write that makes no progress) is dropped:
/// a body is held only as long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Descriptors kept back from the connection cap for everything else the process opens.
const RESERVED_FDS: u64 = 256;

/// Connections the kernel queues until they are accepted (std's 128 overflows in a burst,
/// and a scrape whose SYN is dropped waits a second for its retry); capped by somaxconn.
const LISTEN_BACKLOG: i32 = 4096;

/// How long to wait before accepting again when accept fails.
const ACCEPT_RETRY_MS: u64 = 100;

/// What can go wrong before serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address cannot be bound.
    #[error("cannot listen on {addr}: {source}{}", hint(source))]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The server thread could not start.
    #[error("cannot start the HTTP server: {0}")]
    Start(#[source] std::io::Error),
}

fn hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another exporter, or another tcptrace serve, uses that port: pick another with \
             --listen)"
        }
        std::io::ErrorKind::AddrNotAvailable => {
            " (the address is not one of this host's: use 127.0.0.1, 0.0.0.0 or a local address)"
        }
        _ => "",
    }
}

/// Binds the exporter's address, before anything is loaded into the kernel, so that a taken
/// port is reported at once.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let listen = || -> std::io::Result<TcpListener> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        // As std's bind does: a restart does not wait for the old connections' TIME_WAIT.
        s.set_reuse_address(true)?;
        s.bind(&addr.into())?;
        s.listen(LISTEN_BACKLOG)?;
        s.set_nonblocking(true)?;
        Ok(s.into())
    };
    listen().map_err(|source| ServeError::Bind { addr, source })
}

/// The body and content type of a scrape: OpenMetrics when the scraper accepts it, else the
/// Prometheus text format 0.0.4 (what `curl` gets).
pub fn render(registry: &Registry, openmetrics: bool) -> (String, &'static str) {
    let mut body = String::with_capacity(16 << 10);
    // Writing into a String cannot fail; an error would be an encoder bug, served as is.
    if openmetrics {
        let _ = encoding::text::encode(&mut body, registry);
        (
            body,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        let _ = encoding::prometheus_text::encode(&mut body, registry);
        (body, encoding::prometheus_text::CONTENT_TYPE)
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// Answers one request.
pub fn respond(registry: &Registry, req: &Request<impl Sized>) -> Response<Full<Bytes>> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET and HEAD\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            let openmetrics = req
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            let (body, ct) = render(registry, openmetrics);
            reply(StatusCode::OK, ct, if head { String::new() } else { body })
        }
        "/" => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            "<html><head><title>tcptrace</title></head><body><h1>tcptrace</h1>\
             <p><a href=\"/metrics\">Metrics</a></p></body></html>\n",
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: the metrics are at /metrics\n",
        ),
    }
}

/// Serves `registry` on `listener` from a thread of its own, until the process ends, as
/// `web` says (plain HTTP without authentication: `WebConfig::default()`).
pub fn spawn(
    listener: TcpListener,
    registry: Arc<Registry>,
    web: WebConfig,
) -> Result<(), ServeError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("tcptrace-http")
        .max_blocking_threads(BCRYPT_THREADS)
        .build()
        .map_err(ServeError::Start)?;
    let site = Arc::new(Site {
        registry,
        tls: web.tls.map(tokio_rustls::TlsAcceptor::from),
        web_users: web.users,
        bcrypt_slots: Arc::new(tokio::sync::Semaphore::new(BCRYPT_QUEUED)),
    });
    std::thread::Builder::new()
        .name("tcptrace-http".into())
        .spawn(move || rt.block_on(accept_loop(listener, site)))
        .map_err(ServeError::Start)?;
    Ok(())
}

/// What is served, and how.
struct Site {
    registry: Arc<Registry>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    web_users: crate::views::serve::webconfig::Users,
    /// Room in the queue of password checks.
    bcrypt_slots: Arc<tokio::sync::Semaphore>,
}

async fn accept_loop(listener: TcpListener, site: Arc<Site>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("the metrics server cannot start: {e}");
            return;
        }
    };
    let open = Arc::new(Connections::new(connection_cap()));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let (ticket, shed) = open.admit();
                tokio::spawn(connection(stream, site.clone(), ticket, shed));
            }
            // Out of descriptors: the stalest connection makes room.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                log::warn!("metrics server: accept failed: {e}");
                open.shed_stalest();
                tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_MS)).await;
            }
            // A connection reset before it was accepted, and the like: the next one.
            Err(e) => log::debug!("metrics server: accept failed: {e}"),
        }
    }
}

/// How many connections may be open at once: [`MAX_CONNECTIONS`], within the descriptors
/// the process may open (its soft limit raised to the hard one first).
fn connection_cap() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a valid struct of ours.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    let room = lim.rlim_cur.saturating_sub(RESERVED_FDS).max(1);
    MAX_CONNECTIONS.min(usize::try_from(room).unwrap_or(MAX_CONNECTIONS))
}

/// One connection, until it ends or is shed.
async fn connection(
    stream: tokio::net::TcpStream,
    site: Arc<Site>,
    ticket: Ticket,
    shed: oneshot::Receiver<()>,
) {
    let ticket = Arc::new(ticket);
    tokio::select! {
        _ = shed => log::debug!("metrics connection shed: the stalest of {MAX_CONNECTIONS}"),
        () = site.clone().handshake(stream, ticket) => {}
    }
}

impl Site {
    async fn handshake(self: Arc<Self>, stream: tokio::net::TcpStream, ticket: Arc<Ticket>) {
        let Some(acceptor) = &self.tls else {
            return self.http(stream, ticket).await;
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => self.http(tls, ticket).await,
            Ok(Err(e)) => log::debug!("metrics connection: TLS handshake failed: {e}"),
            Err(_) => {
                log::debug!("metrics connection: no TLS handshake within {HANDSHAKE_TIMEOUT:?}")
            }
        }
    }

    async fn http<IO>(self: Arc<Self>, io: IO, ticket: Arc<Ticket>)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let site = self.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            ticket.touch();
            let site = site.clone();
            async move { Ok::<_, Infallible>(site.answer(req).await) }
        });
        let mut io = tokio_io_timeout::TimeoutStream::new(io);
        io.set_write_timeout(Some(WRITE_TIMEOUT));
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(MAX_REQUEST_HEAD_BYTES)
            .serve_connection(TokioIo::new(Box::pin(io)), service);
        if let Err(e) = conn.await {
            log::debug!("metrics connection: {e}");
        }
    }

    /// Answers a request, once its credentials (if any are asked for) are checked.
    async fn answer(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes().to_vec());
        let allowed = match self.web_users.check(auth.as_deref()) {
            Verdict::Allowed => true,
            Verdict::Denied => false,
            Verdict::NeedsBcrypt => {
                let Ok(slot) = self.bcrypt_slots.clone().try_acquire_owned() else {
                    return busy();
                };
                let site = self.clone();
                let auth = auth.unwrap_or_default();
                tokio::task::spawn_blocking(move || {
                    let _slot = slot;
                    site.web_users.verify(&auth)
                })
                .await
                .unwrap_or(false)
            }
        };
        if allowed {
            respond(&self.registry, &req)
        } else {
            unauthorized()
        }
    }
}

/// 401, asking for basic authentication.
fn unauthorized() -> Response<Full<Bytes>> {
    let mut r = reply(StatusCode::UNAUTHORIZED, "text/plain", "Unauthorized\n");
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Basic"),
    );
    r
}

/// Too many password checks are queued: try again (a flood of bad credentials, most likely).
fn busy() -> Response<Full<Bytes>> {
    let mut r = reply(
        StatusCode::SERVICE_UNAVAILABLE,
        "text/plain",
        "Too many password checks at once\n",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    r
}

/// The open connections, each with the stamp of its last accept or request: when there are
/// too many, the stalest is shed.
struct Connections {
    open: Mutex<HashMap<u64, Open>>,
    /// Stamps and ids, in the order things happen.
    clock: AtomicU64,
    cap: usize,
    warned: AtomicBool,
}

struct Open {
    stamp: Arc<AtomicU64>,
    /// Dropped to shed the connection.
    _shed: oneshot::Sender<()>,
}

/// A connection's place among the open ones, given up when dropped.
struct Ticket {
    open: Arc<Connections>,
    id: u64,
    stamp: Arc<AtomicU64>,
}

impl Connections {
    fn new(cap: usize) -> Connections {
        Connections {
            open: Mutex::default(),
            clock: AtomicU64::new(0),
            cap,
            warned: AtomicBool::new(false),
        }
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a new connection, shedding the stalest if there are too many.
    fn admit(self: &Arc<Self>) -> (Ticket, oneshot::Receiver<()>) {
        let id = self.tick();
        let stamp = Arc::new(AtomicU64::new(id));
        let (tx, rx) = oneshot::channel();
        let full = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            open.insert(
                id,
                Open {
                    stamp: stamp.clone(),
                    _shed: tx,
                },
            );
            open.len() > self.cap
        };
        if full {
            if !self.warned.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "metrics server: {} connections open (idle or slow clients): the stalest \
                     are closed to let new ones in",
                    self.cap
                );
            }
            self.shed_stalest();
        }
        let ticket = Ticket {
            open: self.clone(),
            id,
            stamp,
        };
        (ticket, rx)
    }

    /// Closes the connection whose last accept or request is the oldest.
    fn shed_stalest(&self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let stalest = open
            .iter()
            .min_by_key(|(_, o)| o.stamp.load(Ordering::Relaxed))
            .map(|(&id, _)| id);
        if let Some(id) = stalest {
            open.remove(&id);
        }
    }

    /// How many are open.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.open.lock().map_or(0, |o| o.len())
    }
}

impl Ticket {
    /// A request began: the connection is fresh again.
    fn touch(&self) {
        self.stamp.store(self.open.tick(), Ordering::Relaxed);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Ok(mut open) = self.open.open.lock() {
            open.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stalest_connection_is_shed_at_the_cap() {
        let open = Arc::new(Connections::new(3));
        let (a, mut a_shed) = open.admit();
        let (b, mut b_shed) = open.admit();
        let (c, mut c_shed) = open.admit();
        assert_eq!(open.len(), 3);
        // `a` is the oldest, but a request on it makes it fresh: `b` goes.
        a.touch();
        let (_d, mut d_shed) = open.admit();
        assert_eq!(open.len(), 3);
        assert!(
            b_shed
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Closed)
        );
        for rx in [&mut a_shed, &mut c_shed, &mut d_shed] {
            assert_eq!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        }
        // A connection that ends gives its place back; a shed one's ticket changes nothing.
        drop(b);
        drop(c);
        assert_eq!(open.len(), 2);
        drop(a);
        assert_eq!(open.len(), 1);
    }
}
