//! `alloc`: a lease and no data path, as in flannel. Useful when something else routes the subnets.

use crate::{BackendConfig, DataPlane, Error, Network};

pub struct Alloc {
    net: Network,
}

/// Everything but the MTU and PEERS is [`DataPlane`]'s default: nothing to prepare, program or
/// watch.
impl DataPlane for Alloc {
    const TYPE: &'static str = "alloc";
    const SURVIVES_RESTART: &'static str = "nothing (alloc has no data path)";
    const PEERS: bool = false;
    const DUAL_STACK: bool = true;

    fn new(_config: &BackendConfig, net: Network) -> Result<Self, Error> {
        Ok(Self { net })
    }

    fn mtu(&self) -> u32 {
        self.net.external.mtu
    }
}
