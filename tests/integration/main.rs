//! weft's integration tests: real etcd, real weftd and weftctl processes. Kernel data planes are
//! tested in the backends crate and in `datapath` (root only).

mod harness;

mod bad_config;
mod cni;
mod config;
mod datapath;
mod docker;
mod doctor;
mod dual_stack;
mod dual_stack_vxlan;
mod dual_stack_wireguard;
mod etcd_security;
mod faults;
mod files;
mod health;
mod hostile_etcd_data;
mod hostile_leases;
mod iface;
mod install;
mod kube;
mod kube_ctl;
mod kubernetes;
mod leases;
mod metrics;
mod netns;
mod systemd;
mod udp;
mod watch;
mod wireguard;
