use std::fmt;

/// Errors of the data plane. Each carries the object it was about, so a log line alone says what
/// failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown backend type {0:?} (known: {known})", known = known_types())]
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

/// The backend types weft knows, for messages: "udp, vxlan, host-gw, alloc".
fn known_types() -> String {
    let names: Vec<&str> = crate::KINDS.iter().map(|k| k.name).collect();
    names.join(", ")
}

impl Error {
    pub fn unknown_backend(name: &str) -> Self {
        Self::UnknownBackend(name.to_string())
    }

    /// Wraps a netlink error with what was being done.
    pub fn netlink(context: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Self {
        let context = context.into();
        move |source| Self::Netlink { context, source }
    }

    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }

    /// Whether trying again soon may work: the kernel was busy or short of memory, a call timed
    /// out or was interrupted, an object raced with us. Not so for a bad config, a missing
    /// interface, a refused peer, a standing route conflict, or a permission the process lacks:
    /// those wait for something to change (the config, the host, the operator), so retries of
    /// them back off to the longest pause at once.
    pub fn is_transient(&self) -> bool {
        const TRANSIENT: [i32; 8] = [
            libc::EAGAIN,
            libc::EBUSY,
            libc::EINTR,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::ETIMEDOUT,
            libc::EEXIST,
            libc::ENOENT,
        ];
        match self {
            Self::Netlink { source, .. } => match errno(source) {
                Some(errno) => TRANSIENT.contains(&errno),
                // Not a kernel answer: the socket itself failed (closed, I/O).
                None => true,
            },
            Self::Io { source, .. } => {
                matches!(
                    source.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::OutOfMemory
                ) || source
                    .raw_os_error()
                    .is_some_and(|e| TRANSIENT.contains(&e))
            }
            // iptables-restore fails transiently on the xtables lock, which it waits for itself.
            Self::Firewall { .. } => true,
            Self::UnknownBackend(_)
            | Self::InvalidOption { .. }
            | Self::NoInterface(_)
            | Self::NoAddress { .. }
            | Self::BadPeer { .. }
            | Self::RouteConflict { .. }
            | Self::Other(_) => false,
        }
    }
}

/// The errno of a kernel rejection (positive, as in libc), if that is what `e` is.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// True when the kernel said the object is already gone (deleting it again is success).
pub fn is_gone(e: &rtnetlink::Error) -> bool {
    matches!(errno(e), Some(libc::ESRCH | libc::ENOENT | libc::ENODEV))
}

/// Several independent failures of one reconcile pass, reported together.
#[derive(Debug, Default)]
pub struct ErrorList(pub Vec<Error>);

impl ErrorList {
    pub fn push(&mut self, e: Error) {
        self.0.push(e);
    }

    /// Whether every failure in the list may go away by trying again soon.
    pub fn is_transient(&self) -> bool {
        self.0.iter().all(Error::is_transient)
    }

    /// The first failure alone, for a step whose caller takes one error.
    pub fn into_first(self) -> Result<(), Error> {
        self.0.into_iter().next().map_or(Ok(()), Err)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn io(errno: i32) -> Error {
        Error::io("x")(std::io::Error::from_raw_os_error(errno))
    }

    #[test]
    fn only_what_can_pass_by_itself_is_transient() {
        assert!(io(libc::EAGAIN).is_transient());
        assert!(io(libc::ENOBUFS).is_transient());
        assert!(
            !io(libc::EPERM).is_transient(),
            "no capability: waits for the operator"
        );
        assert!(!io(libc::EROFS).is_transient());
        assert!(!Error::UnknownBackend("warp".into()).is_transient());
        assert!(!Error::InvalidOption {
            option: "VNI".into(),
            reason: "too big".into()
        }
        .is_transient());
        assert!(!Error::RouteConflict {
            wanted: "a".into(),
            existing: "b".into()
        }
        .is_transient());
        let mut list = ErrorList::from(io(libc::EBUSY));
        assert!(list.is_transient());
        list.push(Error::NoInterface("eth9".into()));
        assert!(
            !list.is_transient(),
            "one lasting failure makes the pass lasting"
        );
    }
}
