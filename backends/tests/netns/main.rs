//! Backends against the real kernel, in network namespaces. Needs root; see `harness::root_or_skip`.

mod apply;
mod batch;
mod drift;
mod firewall;
mod harness;
mod host_gw;
mod nexthops;
mod routes_ownership;
mod routes_v6;
mod udp;
mod vxlan;
mod vxlan_v6;
mod wireguard;
mod wireguard_v6;
