//! `backends!`: from the one list of data planes, the `Backend` enum that dispatches to them and
//! the list of their [`crate::Kind`]s. An enum rather than a trait object: the set is closed, and
//! [`crate::DataPlane`]'s methods are async and generic.

macro_rules! backends {
    ($($variant:ident($ty:ty)),+ $(,)?) => {
        /// One data plane, of the types listed in `backends!`.
        pub enum Backend {
            $($variant($ty)),+
        }

        pub const KINDS: &[$crate::Kind] = &[$($crate::Kind::of::<$ty>()),+];

        impl Backend {
            fn build(name: &str, config: &BackendConfig, net: Network) -> Result<Self, Error> {
                $(
                    if name == <$ty as $crate::DataPlane>::TYPE {
                        return <$ty as $crate::DataPlane>::new(config, net).map(Self::$variant);
                    }
                )+
                Err(Error::unknown_backend(name))
            }

            /// The `BackendType` this backend writes into leases and accepts from peers.
            pub fn type_name(&self) -> &'static str {
                match self {
                    $(Self::$variant(_) => <$ty as $crate::DataPlane>::TYPE),+
                }
            }

            /// What stays in the kernel when weftd exits, for its exit log line.
            pub fn survives_restart(&self) -> &'static str {
                match self {
                    $(Self::$variant(_) => <$ty as $crate::DataPlane>::SURVIVES_RESTART),+
                }
            }

            /// See [`crate::DataPlane::PEERS`].
            pub fn follows_peers(&self) -> bool {
                match self {
                    $(Self::$variant(_) => <$ty as $crate::DataPlane>::PEERS),+
                }
            }

            /// See [`crate::DataPlane::prepare`].
            pub async fn prepare(
                &mut self,
                previous: Option<&Lease>,
            ) -> Result<Option<serde_json::Value>, Error> {
                match self {
                    $(Self::$variant(b) => $crate::DataPlane::prepare(b, previous).await),+
                }
            }

            /// See [`crate::DataPlane::backend_v6_data`].
            pub fn backend_v6_data(&self) -> Option<serde_json::Value> {
                match self {
                    $(Self::$variant(b) => $crate::DataPlane::backend_v6_data(b)),+
                }
            }

            /// The MTU containers must use (FLANNEL_MTU).
            pub fn mtu(&self) -> u32 {
                match self {
                    $(Self::$variant(b) => $crate::DataPlane::mtu(b)),+
                }
            }

            /// See [`crate::DataPlane::configure`].
            pub async fn configure(&mut self, own: &Lease) -> Result<(), Error> {
                match self {
                    $(Self::$variant(b) => $crate::DataPlane::configure(b, own).await),+
                }
            }

            /// See [`crate::DataPlane::reconcile`].
            pub async fn reconcile<P: std::borrow::Borrow<Lease>>(
                &mut self,
                peers: impl IntoIterator<Item = P>,
            ) -> Result<(), ErrorList> {
                match self {
                    $(Self::$variant(b) => $crate::DataPlane::reconcile(b, peers).await),+
                }
            }

            /// Applies a change of the desired peer set to the kernel with one targeted netlink
            /// request per object (route, neighbour, FDB entry) of the peers concerned, without
            /// reading the kernel's tables: what [`Backend::reconcile`] would do for these
            /// peers, given that the kernel still holds what the last `reconcile` and `apply`
            /// calls left. Its cost follows the change, not the peer set. With no change, it
            /// tries again what earlier passes could not put in place (a route whose
            /// destination another route held).
            ///
            /// When that premise may not hold ([`Backend::needs_reconcile`]: nothing reconciled
            /// yet, drift seen, a failed request) the caller must `reconcile` the whole set
            /// instead. Errors are reported as `reconcile` reports them.
            pub async fn apply(&mut self, changes: &PeerChanges) -> Result<(), ErrorList> {
                match self {
                    $(Self::$variant(b) => $crate::DataPlane::apply(b, changes).await),+
                }
            }

            /// Whether only a full [`Backend::reconcile`] can bring the kernel in line: never
            /// reconciled, owned state changed behind weft's back (seen by [`Backend::event`]),
            /// or a request failed in a way that leaves the kernel's state unknown.
            pub fn needs_reconcile(&self) -> bool {
                match self {
                    $(Self::$variant(b) => $crate::DataPlane::needs_reconcile(b)),+
                }
            }

            /// Resolves at the next thing the agent must act on: drift of the kernel state this
            /// backend owns (reconcile), or a data plane that failed (rebuild the backend).
            /// Never resolves for backends with nothing to watch. Cancel-safe: the agent polls
            /// it in a `select!` loop.
            pub async fn event(&mut self) -> Event {
                match self {
                    $(Self::$variant(b) => $crate::DataPlane::event(b).await),+
                }
            }

            /// Stops what runs in weftd itself (udp: its workers, joined) before weftd exits or
            /// the backend is rebuilt. Kernel state stays: see `survives_restart`.
            pub async fn shutdown(self) {
                match self {
                    $(Self::$variant(b) => $crate::DataPlane::shutdown(b).await),+
                }
            }

            /// What the last reconcile put or kept in the kernel.
            pub fn programmed(&self) -> Programmed {
                match self {
                    $(Self::$variant(b) => $crate::DataPlane::programmed(b)),+
                }
            }

            /// A handle reading a userspace data path's counters from another thread; None
            /// for the backends the kernel forwards for.
            pub fn stats(&self) -> Option<$crate::StatsSource> {
                match self {
                    $(Self::$variant(b) => $crate::DataPlane::stats(b)),+
                }
            }

            /// The devices it runs on (`flannel.<VNI>` and `flannel-v6.<VNI>`, `flannel0`).
            fn device_names(&self) -> Vec<String> {
                match self {
                    $(Self::$variant(b) => $crate::DataPlane::device_names(b)),+
                }
            }
        }
    };
}
