//! Connection hygiene: a cap on open connections, and time limits that close a connection whose
//! request trickles in (slow headers or body) or that sits idle between requests.

use axum::serve::Listener;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Limits on connections; every one is a flag of `needle serve`.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// Connections open at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Connections one client address may hold at once (0 = no limit); more are closed as soon
    /// as they are accepted, so one client cannot take every slot. Leave it at 0 behind a proxy,
    /// where every request comes from the proxy's address.
    pub max_per_client: usize,
    /// From the first byte of a request until its response starts.
    pub request_read_timeout: Duration,
    /// Between requests on a kept-alive connection (and before the first).
    pub idle_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 1024,
            max_per_client: 0,
            request_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Connections held per client address.
type ClientCounts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// A TCP listener that accepts only while fewer than `max_connections` are open.
pub struct GuardedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    limits: ConnLimits,
    per_client: ClientCounts,
}

impl GuardedListener {
    pub fn new(inner: TcpListener, limits: ConnLimits) -> (GuardedListener, Arc<Semaphore>) {
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        (GuardedListener { inner, slots: slots.clone(), limits, per_client: Arc::default() }, slots)
    }
}

impl Listener for GuardedListener {
    type Io = GuardedConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (GuardedConn, SocketAddr) {
        loop {
            // The semaphore is never closed, so the wait ends with a slot.
            let slot = match self.slots.clone().acquire_owned().await {
                Ok(p) => p,
                Err(_) => std::future::pending().await,
            };
            let (stream, addr) = Listener::accept(&mut self.inner).await;
            let client = (self.limits.max_per_client > 0).then(|| addr.ip());
            if let Some(ip) = client {
                let mut held = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
                let n = held.entry(ip).or_insert(0);
                if *n >= self.limits.max_per_client {
                    // Closed at once: the slot goes back with it.
                    continue;
                }
                *n += 1;
            }
            let _ = stream.set_nodelay(true);
            let deadline = Box::pin(tokio::time::sleep(self.limits.idle_timeout));
            let held = client.map(|ip| (ip, self.per_client.clone()));
            return (
                GuardedConn { stream, _slot: slot, limits: self.limits, in_request: false, deadline, client: held },
                addr,
            );
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// One accepted connection: holds its slot until dropped, and fails its reads once its current
/// time limit has passed, which makes the server close it.
pub struct GuardedConn {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    limits: ConnLimits,
    /// Bytes of a request have arrived and its response has not started.
    in_request: bool,
    deadline: Pin<Box<Sleep>>,
    /// The client's entry in the per-client counts, given back on drop.
    client: Option<(IpAddr, ClientCounts)>,
}

impl Drop for GuardedConn {
    fn drop(&mut self) {
        if let Some((ip, counts)) = &self.client {
            let mut held = counts.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = held.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    held.remove(ip);
                }
            }
        }
    }
}

impl GuardedConn {
    fn arm(&mut self, after: Duration) {
        self.deadline.as_mut().reset(Instant::now() + after);
    }

    /// After a write: once a response has started, the request was read in time, and the
    /// connection is idle until the next one begins.
    fn wrote(&mut self, res: &Poll<io::Result<usize>>) {
        if matches!(res, Poll::Ready(Ok(n)) if *n > 0) && self.in_request {
            self.in_request = false;
            let t = self.limits.idle_timeout;
            self.arm(t);
        }
    }
}

impl AsyncRead for GuardedConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Polled first, so the task also wakes when the limit passes with nothing to read.
        if this.deadline.as_mut().poll(cx).is_ready() {
            let what = if this.in_request { "request not read in time" } else { "connection idle too long" };
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            if buf.filled().len() > before && !this.in_request {
                this.in_request = true;
                let t = this.limits.request_read_timeout;
                this.arm(t);
            }
        }
        res
    }
}

impl AsyncWrite for GuardedConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.stream).poll_write(cx, data);
        this.wrote(&res);
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.wrote(&res);
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
