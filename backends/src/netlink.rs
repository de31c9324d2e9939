//! One place that opens rtnetlink connections.

use rtnetlink::Handle;

use crate::Error;

/// Opens a route-netlink socket in the current network namespace and drives it on the runtime.
pub fn connect() -> Result<Handle, Error> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(Error::io("open netlink socket"))?;
    tokio::spawn(conn);
    Ok(handle)
}
