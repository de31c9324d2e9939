//! A device's offload features as `ethtool -k` shows and `ethtool -K` sets them, and its driver
//! (`ethtool -i`), through the `SIOCETHTOOL` ioctl in the caller's network namespace.
//!
//! Features are looked up by the kernel's own names (the `ETH_SS_FEATURES` string set), so no
//! feature bit number is hard-coded. Why the ioctl and not ethtool's generic-netlink API: the
//! rust-netlink `ethtool` crate reads features but cannot set them, and it builds on an older
//! netlink stack than rtnetlink's; the ioctl is a handful of fixed-layout structs.
//!
//! Used by the vxlan backend for its `TxChecksumOffload` option and by `weftctl doctor`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The feature of flannel #1279: with it on, some kernels (before 5.7's "netfilter: nat: never
/// update the UDP checksum when it's 0"), VMware's vmxnet3 and NAT in front of the PublicIP
/// send VXLAN datagrams whose checksum the receiver drops.
pub const TX_CHECKSUM_IP_GENERIC: &str = "tx-checksum-ip-generic";

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x03;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETHTOOL_GFEATURES: u32 = 0x3a;
const ETHTOOL_SFEATURES: u32 = 0x3b;
const ETH_SS_FEATURES: u32 = 4;
const ETH_GSTRING_LEN: usize = 32;
/// `ETHTOOL_F_UNSUPPORTED`: a requested feature cannot be changed at all.
const ETHTOOL_F_UNSUPPORTED: i32 = 1;
/// `struct ethtool_drvinfo`: cmd, then driver[32] at offset 4; 196 bytes in all.
const DRVINFO_LEN: usize = 196;

/// The driver behind interface `ifname` (`veth`, `vxlan`, `vmxnet3`, …).
pub fn driver(ifname: &str) -> io::Result<String> {
    let mut buf = Buf::new(DRVINFO_LEN);
    buf.put(0, ETHTOOL_GDRVINFO);
    ioctl(ifname, &mut buf)?;
    Ok(buf.string(4, 32))
}

/// Whether feature `name` is active on `ifname`; `None` when the device has no such feature.
pub fn feature(ifname: &str, name: &str) -> io::Result<Option<bool>> {
    let Some((bit, words)) = feature_bit(ifname, name)? else {
        return Ok(None);
    };
    // struct ethtool_gfeatures: cmd, size, then {available, requested, active, never_changed}.
    let mut buf = Buf::new(8 + words * 16);
    buf.put(0, ETHTOOL_GFEATURES);
    buf.put(4, words as u32);
    ioctl(ifname, &mut buf)?;
    let active = buf.get(8 + (bit / 32) * 16 + 8);
    Ok(Some(active & (1 << (bit % 32)) != 0))
}

/// Turns feature `name` of `ifname` on or off, as `ethtool -K ifname name on|off` does, and
/// checks that the kernel did it (a fixed feature stays as it is: that is an error).
pub fn set_feature(ifname: &str, name: &str, on: bool) -> io::Result<()> {
    let (bit, words) = feature_bit(ifname, name)?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{ifname} has no feature {name}"),
        )
    })?;
    // struct ethtool_sfeatures: cmd, size, then {valid, requested} per 32 features.
    let mut buf = Buf::new(8 + words * 8);
    buf.put(0, ETHTOOL_SFEATURES);
    buf.put(4, words as u32);
    let at = 8 + (bit / 32) * 8;
    let mask = 1u32 << (bit % 32);
    buf.put(at, mask);
    buf.put(at + 4, if on { mask } else { 0 });
    let flags = ioctl(ifname, &mut buf)?;
    if flags & ETHTOOL_F_UNSUPPORTED != 0 || feature(ifname, name)? != Some(on) {
        return Err(io::Error::other(format!(
            "{ifname} keeps {name} {}: the kernel does not let it change",
            if on { "off" } else { "on" }
        )));
    }
    Ok(())
}

/// The bit of feature `name` in the kernel's feature words, from the `ETH_SS_FEATURES` strings,
/// and how many 32-bit words the features fill (ETHTOOL_SFEATURES takes exactly that many).
fn feature_bit(ifname: &str, name: &str) -> io::Result<Option<(usize, usize)>> {
    // struct ethtool_sset_info: cmd, reserved, sset_mask (u64), then one u32 count per set.
    let mut info = Buf::new(16 + 4);
    info.put(0, ETHTOOL_GSSET_INFO);
    info.put_u64(8, 1 << ETH_SS_FEATURES);
    ioctl(ifname, &mut info)?;
    if info.get_u64(8) & (1 << ETH_SS_FEATURES) == 0 {
        return Ok(None);
    }
    // Bounded so a confused answer cannot make us allocate without limit: the kernel has ~70.
    let count = (info.get(16) as usize).min(4096);
    // struct ethtool_gstrings: cmd, string_set, len, then len names of 32 bytes.
    let mut strings = Buf::new(12 + count * ETH_GSTRING_LEN);
    strings.put(0, ETHTOOL_GSTRINGS);
    strings.put(4, ETH_SS_FEATURES);
    strings.put(8, count as u32);
    ioctl(ifname, &mut strings)?;
    let returned = (strings.get(8) as usize).min(count);
    let bit =
        (0..returned).find(|i| strings.string(12 + i * ETH_GSTRING_LEN, ETH_GSTRING_LEN) == name);
    Ok(bit.map(|b| (b, count.div_ceil(32))))
}

/// A byte buffer for one ethtool command struct (native-endian fields at byte offsets).
struct Buf(Vec<u8>);

impl Buf {
    fn new(len: usize) -> Self {
        Self(vec![0; len])
    }

    fn put(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }

    fn put_u64(&mut self, at: usize, v: u64) {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }

    fn get(&self, at: usize) -> u32 {
        let mut b = [0; 4];
        b.copy_from_slice(&self.0[at..at + 4]);
        u32::from_ne_bytes(b)
    }

    fn get_u64(&self, at: usize) -> u64 {
        let mut b = [0; 8];
        b.copy_from_slice(&self.0[at..at + 8]);
        u64::from_ne_bytes(b)
    }

    /// A NUL-padded C string field.
    fn string(&self, at: usize, len: usize) -> String {
        let field = &self.0[at..at + len];
        let end = field.iter().position(|b| *b == 0).unwrap_or(len);
        String::from_utf8_lossy(&field[..end]).into_owned()
    }
}

/// `SIOCETHTOOL` on `ifname` with `buf` as the command; the ioctl's (non-negative) result.
fn ioctl(ifname: &str, buf: &mut Buf) -> io::Result<i32> {
    let name = ifname.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{ifname:?} is not an interface name"),
        ));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = buf.0.as_mut_ptr().cast();
    // SAFETY: plain socket call; the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket() and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: req names the interface and points at `buf`, which is as long as the command
    // struct it holds says (the kernel reads and writes only within it) and outlives the call.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_interface_names_are_refused_before_any_ioctl() {
        for bad in ["", "a\0b", "sixteen-chars-xx"] {
            let e = feature(bad, TX_CHECKSUM_IP_GENERIC).expect_err(bad);
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    fn loopback_has_named_features_and_no_unknown_ones() {
        // Loopback exists in every namespace and any user may read its features.
        assert!(feature("lo", "tx-checksum-ip-generic").is_ok());
        assert_eq!(feature("lo", "no-such-feature").expect("read"), None);
    }
}
