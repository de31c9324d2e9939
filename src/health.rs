//! `/healthz` (200 while running, 503 while the data plane has failed and is being rebuilt) and
//! `/readyz` (200 once the lease is held and the files are written, 503 before), as flanneld
//! serves them when -healthz-port is set.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::debug;

/// Shared readiness and health, flipped by the agent.
#[derive(Clone, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
    /// Set while the data plane has failed (a udp worker died) until it is rebuilt.
    failed: Arc<AtomicBool>,
    /// What the current data plane leaves in the kernel when weftd exits.
    kept: Arc<std::sync::Mutex<&'static str>>,
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
        if let Ok(mut k) = self.kept.lock() {
            *k = kept;
        }
    }

    /// For weftd's exit line: what stays in the kernel ("" before a backend was built).
    pub fn kept(&self) -> &'static str {
        self.kept.lock().map(|k| *k).unwrap_or("")
    }
}

/// Reads a request up to the end of its headers (small, and within a second), so the response
/// never races a request still arriving: closing with unread input would reset the connection.
async fn read_head(sock: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    let read = async {
        let mut chunk = [0u8; 512];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
            let n = sock.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Some(())
    };
    tokio::time::timeout(std::time::Duration::from_secs(1), read)
        .await
        .ok()??;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// Binds now (so a bad address fails at start) and serves in the background.
pub async fn serve(addr: SocketAddr, ready: Readiness) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen for health checks on {addr}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let ready = ready.clone();
            tokio::spawn(async move {
                let Some(req) = read_head(&mut sock).await else {
                    return;
                };
                let path = req.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = match path {
                    "/healthz" if ready.healthy() => ("200 OK", "ok\n"),
                    "/healthz" => ("503 Service Unavailable", "data plane failed; rebuilding\n"),
                    "/readyz" if ready.get() => ("200 OK", "ok\n"),
                    "/readyz" => ("503 Service Unavailable", "not ready\n"),
                    _ => ("404 Not Found", "not found\n"),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                if let Err(e) = sock.write_all(resp.as_bytes()).await {
                    debug!(error = %e, "health check client went away");
                }
            });
        }
    });
    Ok(())
}
