//! A backend's netlink sockets: requests, batches and the drift watch, each opened on first use.

use rtnetlink::Handle;

use crate::batch::Batch;
use crate::netlink::connect;
use crate::watch::{DriftWatch, Watched};
use crate::Error;

/// A backend's netlink sockets, opened lazily: `Backend::new` may run outside the runtime that
/// must drive them.
#[derive(Default)]
pub struct Conn {
    handle: Option<Handle>,
    batch: Option<Batch>,
    watch: Option<DriftWatch>,
}

impl Conn {
    /// The request socket.
    pub fn handle(&mut self) -> Result<Handle, Error> {
        match &self.handle {
            Some(h) => Ok(h.clone()),
            None => {
                let h = connect()?;
                self.handle = Some(h.clone());
                Ok(h)
            }
        }
    }

    /// The socket for batches of requests.
    pub fn batch(&mut self) -> Result<Batch, Error> {
        match &self.batch {
            Some(b) => Ok(b.clone()),
            None => {
                let b = Batch::open()?;
                self.batch = Some(b.clone());
                Ok(b)
            }
        }
    }

    /// Starts listening for drift, so events between now and the first `drifted` are kept.
    pub fn subscribe(&mut self) -> Result<(), Error> {
        if self.watch.is_none() {
            self.watch = Some(DriftWatch::open()?);
        }
        Ok(())
    }

    /// Resolves when something `owned` was changed behind weft's back.
    pub async fn drifted(&mut self, owned: &Watched) {
        if let Err(e) = self.subscribe() {
            tracing::warn!(error = %e, "cannot watch for drift; relying on periodic reconcile");
        }
        match &mut self.watch {
            Some(w) => w.drifted(owned).await,
            None => std::future::pending().await,
        }
    }

    /// Forgets the changes made so far (the echoes of a reconcile's own changes).
    pub async fn settle(&mut self) {
        if let Some(w) = &mut self.watch {
            w.settle().await;
        }
    }
}
