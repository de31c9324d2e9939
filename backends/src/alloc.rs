//! `alloc`: a lease and no data path, as in flannel. Useful when something else routes the subnets.

use serde_json::Value;

use crate::{Error, ErrorList, Lease, Network};

pub struct Alloc {
    net: Network,
}

impl Alloc {
    pub fn new(net: Network) -> Self {
        Self { net }
    }

    pub async fn prepare(&mut self, _previous: Option<&Lease>) -> Result<Option<Value>, Error> {
        Ok(None)
    }

    pub fn mtu(&self) -> u32 {
        self.net.external.mtu
    }

    pub async fn configure(&mut self, _own: &Lease) -> Result<(), Error> {
        Ok(())
    }

    pub async fn reconcile<P>(
        &mut self,
        _peers: impl IntoIterator<Item = P>,
    ) -> Result<(), ErrorList> {
        Ok(())
    }
}
