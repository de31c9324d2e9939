//! weft's one test lab, shared by the control-plane and the data-plane test suites.
//!
//! A lab is a "switch" network namespace with a bridge (and, when asked, etcd on it), simulated
//! hosts plugged into the bridge by veth pairs, each with a "container" namespace behind a `cni0`
//! bridge, and outsiders (machines on the switch that are not in the cluster). Names that the
//! machine sees (namespaces, temp dirs) carry a unique per-lab prefix; interface names live inside
//! private namespaces, so fixed names (eth0, cni0) are safe. The underlay is dual-stack: each IPv4
//! underlay address has an IPv6 one beside it (`topology`'s doc). Everything a lab made is removed
//! in `Drop`, also when a test panics; processes are ended by the PID the lab started them with.
//! Every external command runs under a time limit. A test that fails prints the end of every log
//! its lab's hosts and etcd wrote as it unwinds (`logs`), so CI's output alone tells what happened.
//!
//! A real kube-apiserver for the Kubernetes mode (`kube`): on the switch at [`SWITCH_IP`], with
//! RBAC and one token per identity; see the module's doc.
//!
//! A WireGuard node built by hand as flanneld builds one, on Debian's wireguard-go
//! (`wireguard_go`).
//!
//! The shell side (demo, benchmarks) has its own library: `deploy/lib/topology.sh`.

pub mod cmd;
pub mod dockerd;
pub mod etcd;
pub mod flannel;
pub mod json;
pub mod kube;
pub mod logs;
pub mod netns;
pub mod probe;
pub mod skip;
pub mod topology;
pub mod wait;
pub mod wireguard_go;

pub use cmd::{must, sh};
pub use etcd::Etcd;
pub use kube::{require_kube, KubeApi};
pub use netns::Netns;
pub use skip::{require_ipv6, require_root, require_tools};
pub use topology::{Host, Lab, SWITCH_IP, SWITCH_IP6};
pub use wait::wait_for;
pub use wireguard_go::WireguardGo;

/// Lets a suite's own host or lab type (the lab's plus the suite's state: an agent thread, a
/// weftd process) be used as the lab's: `weft_lab::extends!(Host => lab: weft_lab::Host);`.
#[macro_export]
macro_rules! extends {
    ($outer:ty => $field:ident: $inner:ty) => {
        impl ::std::ops::Deref for $outer {
            type Target = $inner;
            fn deref(&self) -> &$inner {
                &self.$field
            }
        }
        impl ::std::ops::DerefMut for $outer {
            fn deref_mut(&mut self) -> &mut $inner {
                &mut self.$field
            }
        }
    };
}
