//! The HTTP side of `tcptrace serve`: `/metrics` in the Prometheus text format (or
//! OpenMetrics, when the scraper asks for it), on a thread of its own so that a scrape never
//! delays the reading of the ring buffer, nor the other way round.

use std::{
    convert::Infallible,
    net::{SocketAddr, TcpListener},
    sync::Arc,
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

/// Connections served at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 64;

/// A client that has not sent its request headers by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

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
    let l = TcpListener::bind(addr).map_err(|source| ServeError::Bind { addr, source })?;
    l.set_nonblocking(true)
        .map_err(|source| ServeError::Bind { addr, source })?;
    Ok(l)
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

/// Serves `registry` on `listener` from a thread of its own, until the process ends.
pub fn spawn(listener: TcpListener, registry: Arc<Registry>) -> Result<(), ServeError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Start)?;
    std::thread::Builder::new()
        .name("tcptrace-http".into())
        .spawn(move || rt.block_on(accept_loop(listener, registry)))
        .map_err(ServeError::Start)?;
    Ok(())
}

async fn accept_loop(listener: TcpListener, registry: Arc<Registry>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("the metrics server cannot start: {e}");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors and the like: wait rather than spin.
                log::warn!("metrics server: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let r = respond(&registry, &req);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                log::debug!("metrics connection: {e}");
            }
            drop(permit);
        });
    }
}
