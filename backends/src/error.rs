use std::fmt;

/// Errors of the data plane. Each carries the object it was about, so a log line alone says what
/// failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown backend type {0:?} (known: udp, vxlan, host-gw, alloc)")]
    UnknownBackend(String),
    #[error("invalid backend option {option}: {reason}")]
    InvalidOption { option: String, reason: String },
    #[error("no interface matches {0}")]
    NoInterface(String),
    #[error("interface {name} has no IPv4 address")]
    NoAddress { name: String },
    #[error("peer {subnet}: {reason}")]
    BadPeer { subnet: String, reason: String },
    #[error("{context}: {source}")]
    Netlink {
        context: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A route weft wants is not installed because a route weft does not own already routes its
    /// destination (typically the connected route of a local bridge such as docker0). That route
    /// is left alone; every reconcile checks again.
    #[error("route {wanted} not installed: {existing} (not weft's) holds that destination")]
    RouteConflict { wanted: String, existing: String },
    #[error("{context}: {reason}")]
    Firewall { context: String, reason: String },
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// Wraps a netlink error with what was being done.
    pub fn netlink(context: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Self {
        let context = context.into();
        move |source| Self::Netlink { context, source }
    }

    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

/// Several independent failures of one reconcile pass, reported together.
#[derive(Debug, Default)]
pub struct ErrorList(pub Vec<Error>);

impl ErrorList {
    pub fn push(&mut self, e: Error) {
        self.0.push(e);
    }

    pub fn into_result(self) -> Result<(), ErrorList> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for ErrorList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ErrorList {}

impl From<Error> for ErrorList {
    fn from(e: Error) -> Self {
        Self(vec![e])
    }
}
