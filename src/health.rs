//! `/healthz` (200 while running, 503 while the data plane has failed and is being rebuilt) and
//! `/readyz` (200 once the lease is held and the files are written, 503 before, or while a file
//! could not be written, with the reason), as flanneld serves them when -healthz-port is set;
//! and `/metrics`, weft's Prometheus metrics ([`crate::metrics`]), which flanneld lacks.
//!
//! HTTP is hyper's. The limits are what keeps the port from being a way to exhaust weftd's file
//! descriptors (issue 9, defect 6): at most [`MAX_CONNECTIONS`] open at once (a new one closes the
//! oldest, so idle connections cannot lock a prober out), a request head of at most [`MAX_HEAD`]
//! bytes read within [`HEAD_TIMEOUT`], every connection closed after [`CONNECTION_DEADLINE`], and
//! accept errors (EMFILE) backed off instead of retried in a loop. tower's limits are not used:
//! `ConcurrencyLimit` and `Timeout` count requests, and an idle connection never becomes one.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

/// Connections served at once; one more closes the oldest.
pub const MAX_CONNECTIONS: usize = 64;
/// Bytes of request line and headers; hyper's smallest buffer (it answers 431 beyond).
pub const MAX_HEAD: usize = 8192;
/// Time a client has to send its request line and headers.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a connection may stay open at all, whatever it does.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);
/// First and longest pause after a failed accept.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));
/// A repeated log line (same accept error, the cap reached again) waits this long.
const RELOG: Duration = Duration::from_secs(60);

/// Shared readiness and health, flipped by the agent.
#[derive(Clone, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
    /// Set while the data plane has failed (a udp worker died) until it is rebuilt.
    failed: Arc<AtomicBool>,
    /// What the current data plane leaves in the kernel when weftd exits.
    kept: Arc<Mutex<&'static str>>,
    /// Why weftd, although leased, has not done all it should. daemon.json is the one source
    /// today (it cannot be merged): [`crate::daemon_json::publish`] sets and clears it.
    problem: Arc<Mutex<Problem>>,
    /// Why weftd is not following the lease store (its watch cannot make progress).
    stalled: Arc<Mutex<Option<String>>>,
    /// Why no lease can be had yet (a full network; a Node without a podCIDR).
    waiting: Arc<Mutex<Option<String>>>,
}

#[derive(Default)]
struct Problem {
    /// Bumped by every `set_problem`, so a retry of an older problem knows it was superseded.
    generation: u64,
    why: Option<String>,
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn set_failed(&self, failed: bool) {
        self.failed.store(failed, Ordering::Relaxed);
    }

    pub fn healthy(&self) -> bool {
        !self.failed.load(Ordering::Relaxed)
    }

    pub fn set_kept(&self, kept: &'static str) {
        *self.kept.lock().unwrap_or_else(PoisonError::into_inner) = kept;
    }

    /// For weftd's exit line: what stays in the kernel ("" before a backend was built).
    pub fn kept(&self) -> &'static str {
        *self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records why /readyz must say 503 although the lease is held (`None`: nothing wrong).
    /// Returns the problem's generation, for [`Readiness::update_problem`].
    pub fn set_problem(&self, why: Option<String>) -> u64 {
        let mut p = self.problem.lock().unwrap_or_else(PoisonError::into_inner);
        p.generation += 1;
        p.why = why;
        p.generation
    }

    /// Changes the problem of `generation` unless a later `set_problem` replaced it; returns
    /// whether it was still current.
    pub fn update_problem(&self, generation: u64, why: Option<String>) -> bool {
        let mut p = self.problem.lock().unwrap_or_else(PoisonError::into_inner);
        if p.generation != generation {
            return false;
        }
        p.why = why;
        true
    }

    /// The generation of the latest `set_problem`.
    pub fn problem_generation(&self) -> u64 {
        self.problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .generation
    }

    /// Records why weftd cannot follow the lease store (`None`: it does).
    pub fn set_stalled(&self, why: Option<String>) {
        *self.stalled.lock().unwrap_or_else(PoisonError::into_inner) = why;
    }

    /// Records why no lease can be had yet (`None`: one is held, or being taken).
    pub fn set_waiting(&self, why: Option<String>) {
        *self.waiting.lock().unwrap_or_else(PoisonError::into_inner) = why;
    }

    pub fn waiting(&self) -> Option<String> {
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn stalled(&self) -> Option<String> {
        self.stalled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .why
            .clone()
    }
}

/// The answer for a request path (any method; the query is ignored).
fn respond(path: &str, ready: &Readiness) -> (StatusCode, String) {
    let unavailable = StatusCode::SERVICE_UNAVAILABLE;
    match path {
        "/healthz" if ready.healthy() => (StatusCode::OK, "ok\n".into()),
        "/healthz" => (unavailable, "data plane failed; rebuilding\n".into()),
        "/readyz" if !ready.get() => match ready.waiting() {
            Some(why) => (unavailable, format!("not ready: {why}\n")),
            None => (unavailable, "not ready\n".into()),
        },
        "/readyz" => match ready.stalled().or_else(|| ready.problem()) {
            Some(why) => (unavailable, format!("{why}\n")),
            None => (StatusCode::OK, "ok\n".into()),
        },
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn response(path: &str, ready: &Readiness) -> Response<Full<Bytes>> {
    let (status, body, content_type) = match path {
        "/metrics" => {
            let text = crate::metrics::get().encode();
            (StatusCode::OK, text, crate::metrics::CONTENT_TYPE)
        }
        _ => {
            let (status, body) = respond(path, ready);
            (status, body, "text/plain")
        }
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Binds now (so a bad address fails at start) and serves in the background. Returns the bound
/// address (port 0 picks one).
pub async fn serve(addr: SocketAddr, ready: Readiness) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen for health checks on {addr}"))?;
    let bound = listener
        .local_addr()
        .with_context(|| format!("listen for health checks on {addr}"))?;
    tokio::spawn(accept_loop(listener, ready));
    Ok(bound)
}

async fn accept_loop(listener: TcpListener, ready: Readiness) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false);
    let open = Arc::new(Mutex::new(Open::default()));
    let sockets = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut delay = ACCEPT_BACKOFF.0;
    let mut accept_log = OncePer::default();
    let mut full_log = OncePer::default();
    loop {
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                let msg = e.to_string();
                if accept_log.should_log(&msg) {
                    warn!("health checks: accept: {msg}; backing off");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        delay = ACCEPT_BACKOFF.0;
        let (id, closed, evicted) = lock(&open).admit();
        // One permit per open socket: when the oldest was just told to close, wait until its
        // socket is really gone, so a flood never holds more than MAX_CONNECTIONS (+ this one).
        let Ok(permit) = sockets.clone().acquire_owned().await else {
            return;
        };
        if evicted && full_log.should_log("full") {
            info!(
                "health checks: {MAX_CONNECTIONS} connections open; closing the oldest to make room"
            );
        }
        let ready = ready.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let resp = response(req.uri().path(), &ready);
            async move { Ok::<_, Infallible>(resp) }
        });
        let conn = http.serve_connection(TokioIo::new(sock), service);
        let registered = Registered {
            open: open.clone(),
            id,
        };
        tokio::spawn(async move {
            let _registered = registered;
            tokio::select! {
                r = tokio::time::timeout(CONNECTION_DEADLINE, conn) => match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!("health check connection: {e}"),
                    Err(_) => debug!("health check connection closed after {CONNECTION_DEADLINE:?}"),
                },
                _ = closed => {}
            }
            // The connection, and its socket, were dropped with the select: free the slot.
            drop(permit);
        });
    }
}

fn lock(open: &Mutex<Open>) -> std::sync::MutexGuard<'_, Open> {
    open.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The connections being served, oldest first. Dropping a sender closes its connection.
#[derive(Default)]
struct Open {
    next: u64,
    conns: BTreeMap<u64, oneshot::Sender<()>>,
}

impl Open {
    /// Registers a new connection, closing the oldest when at the cap. Returns its id, what
    /// resolves when it is closed that way, and whether another one was closed for it.
    fn admit(&mut self) -> (u64, oneshot::Receiver<()>, bool) {
        let evicted = self.conns.len() >= MAX_CONNECTIONS && self.conns.pop_first().is_some();
        let (tx, rx) = oneshot::channel();
        let id = self.next;
        self.next += 1;
        self.conns.insert(id, tx);
        (id, rx, evicted)
    }
}

/// Removes a connection from [`Open`] when its task ends, however it ends.
struct Registered {
    open: Arc<Mutex<Open>>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.open).conns.remove(&self.id);
    }
}

/// Says yes to a message unless it is the one said yes to less than [`RELOG`] ago, so a failure
/// that repeats in a loop is logged once, not once per try.
#[derive(Default)]
struct OncePer {
    last: Option<(String, Instant)>,
}

impl OncePer {
    fn should_log(&mut self, msg: &str) -> bool {
        if matches!(&self.last, Some((m, at)) if m == msg && at.elapsed() < RELOG) {
            return false;
        }
        self.last = Some((msg.to_string(), Instant::now()));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// The status line and body of one request written as `raw`.
    async fn ask(addr: SocketAddr, raw: &[u8]) -> (String, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("answer within 5 s")
            .unwrap();
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text.lines().next().unwrap_or("").to_string();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (status, body)
    }

    async fn get(addr: SocketAddr, path: &str) -> (String, String) {
        ask(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await
    }

    async fn start(ready: &Readiness) -> SocketAddr {
        serve(([127, 0, 0, 1], 0).into(), ready.clone())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn endpoints_answer_as_flanneld_does() {
        let ready = Readiness::default();
        let addr = start(&ready).await;
        assert_eq!(
            get(addr, "/healthz").await,
            ("HTTP/1.1 200 OK".into(), "ok\n".into())
        );
        assert_eq!(
            get(addr, "/readyz").await,
            (
                "HTTP/1.1 503 Service Unavailable".into(),
                "not ready\n".into()
            )
        );
        ready.set(true);
        assert_eq!(get(addr, "/readyz").await.0, "HTTP/1.1 200 OK");
        assert_eq!(get(addr, "/readyz?verbose").await.0, "HTTP/1.1 200 OK");
        assert_eq!(get(addr, "/nope").await.0, "HTTP/1.1 404 Not Found");
        ready.set_failed(true);
        assert_eq!(
            get(addr, "/healthz").await,
            (
                "HTTP/1.1 503 Service Unavailable".into(),
                "data plane failed; rebuilding\n".into()
            )
        );
    }

    #[tokio::test]
    async fn readyz_names_the_problem_of_a_leased_host_until_it_is_cleared() {
        let ready = Readiness::default();
        let addr = start(&ready).await;
        ready.set(true);
        let generation = ready.set_problem(Some("daemon.json cannot be parsed".into()));
        assert_eq!(
            get(addr, "/readyz").await,
            (
                "HTTP/1.1 503 Service Unavailable".into(),
                "daemon.json cannot be parsed\n".into()
            )
        );
        // A superseded retry cannot clear a newer problem.
        let newer = ready.set_problem(Some("still broken".into()));
        assert!(!ready.update_problem(generation, None));
        assert_eq!(ready.problem().as_deref(), Some("still broken"));
        assert!(ready.update_problem(newer, None));
        assert_eq!(get(addr, "/readyz").await.0, "HTTP/1.1 200 OK");
    }

    #[test]
    fn readyz_says_why_weftd_cannot_follow_the_lease_store_before_any_other_problem() {
        let ready = Readiness::default();
        ready.set(true);
        ready.set_problem(Some("daemon.json cannot be parsed".into()));
        ready.set_stalled(Some("the etcd watch cannot get past revision 7".into()));
        assert_eq!(
            respond("/readyz", &ready),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the etcd watch cannot get past revision 7\n".into()
            )
        );
        assert_eq!(
            respond("/healthz", &ready).0,
            StatusCode::OK,
            "alive all the same"
        );
        ready.set_stalled(None);
        assert_eq!(
            respond("/readyz", &ready).1,
            "daemon.json cannot be parsed\n"
        );
    }

    #[tokio::test]
    async fn metrics_are_served_in_the_openmetrics_text_format() {
        let addr = start(&Readiness::default()).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("answer within 5 s")
            .unwrap();
        let text = String::from_utf8_lossy(&out);
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text; version=1.0.0"),
            "{head}"
        );
        assert!(body.contains("# TYPE weft_lease_held gauge"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
    }

    #[tokio::test]
    async fn an_oversized_request_head_is_refused() {
        let addr = start(&Readiness::default()).await;
        let big = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: {}\r\n\r\n",
            "a".repeat(2 * MAX_HEAD)
        );
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The server may close before all of it is written: a reset is as good as a 431.
        let _ = s.write_all(big.as_bytes()).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("closed within 5 s");
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains("200 OK"), "{text}");
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_head_is_dropped() {
        let addr = start(&Readiness::default()).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost:")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(CONNECTION_DEADLINE * 2, s.read_to_end(&mut out))
            .await
            .expect("closed by the server");
        assert!(started.elapsed() < CONNECTION_DEADLINE + Duration::from_secs(1));
        assert!(!String::from_utf8_lossy(&out).contains("200 OK"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_beyond_the_cap_cannot_lock_a_prober_out() {
        let addr = start(&Readiness::default()).await;
        let mut idle = Vec::new();
        for _ in 0..4 * MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // All of them still open on this side: the prober gets in at once, not after timeouts.
        let started = std::time::Instant::now();
        assert_eq!(get(addr, "/healthz").await.0, "HTTP/1.1 200 OK");
        assert!(started.elapsed() < HEAD_TIMEOUT, "{:?}", started.elapsed());
        // The oldest were closed by the server to make room.
        let mut buf = [0u8; 1];
        let first = tokio::time::timeout(Duration::from_secs(1), idle[0].read(&mut buf))
            .await
            .expect("the oldest connection was closed");
        assert!(matches!(first, Ok(0) | Err(_)));
    }

    #[test]
    fn admitting_past_the_cap_closes_the_oldest() {
        let mut open = Open::default();
        let mut rxs = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let (_, rx, evicted) = open.admit();
            assert!(!evicted);
            rxs.push(rx);
        }
        let (id, _rx, evicted) = open.admit();
        assert!(evicted);
        assert_eq!(id, MAX_CONNECTIONS as u64);
        assert_eq!(open.conns.len(), MAX_CONNECTIONS);
        // The oldest one's receiver sees its sender dropped (its task ends); the others wait.
        use oneshot::error::TryRecvError;
        assert_eq!(rxs[0].try_recv(), Err(TryRecvError::Closed));
        assert_eq!(rxs[1].try_recv(), Err(TryRecvError::Empty));
        assert!(!open.conns.contains_key(&0));
    }

    #[test]
    fn a_message_repeated_in_a_loop_is_logged_once() {
        let mut once = OncePer::default();
        assert!(once.should_log("Too many open files (os error 24)"));
        assert!(!once.should_log("Too many open files (os error 24)"));
        assert!(once.should_log("Connection aborted"));
        assert!(once.should_log("Too many open files (os error 24)"));
    }
}
