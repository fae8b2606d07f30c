//! Multi-homing: binding and connecting to several addresses, and reading
//! an association's addresses back, in the kernel's packed
//! `sockaddr_in`/`sockaddr_in6` array format.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;

use crate::sys::sctp as sys;

/// Appends `addr` as a kernel `sockaddr_in`/`sockaddr_in6`, the packed array
/// format of `SCTP_SOCKOPT_BINDX_ADD` and `SCTP_SOCKOPT_CONNECTX`.
fn pack(out: &mut Vec<u8>, addr: &SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            out.extend_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            out.extend_from_slice(&a.port().to_be_bytes());
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&[0; 8]);
        }
        SocketAddr::V6(a) => {
            out.extend_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            out.extend_from_slice(&a.port().to_be_bytes());
            out.extend_from_slice(&a.flowinfo().to_be_bytes());
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.scope_id().to_ne_bytes());
        }
    }
}

fn packed(addrs: &[SocketAddr]) -> Vec<u8> {
    let mut v = Vec::with_capacity(addrs.len() * 28);
    for a in addrs {
        pack(&mut v, a);
    }
    v
}

/// `sctp_bindx(SCTP_BINDX_ADD_ADDR)`: binds the socket to more local
/// addresses (multi-homing). On a bound socket the port must be the bound one
/// or 0. An IPv6 socket takes IPv4 addresses too (unless `IPV6_V6ONLY`).
pub fn bindx(fd: impl AsFd, addrs: &[SocketAddr]) -> io::Result<()> {
    if addrs.is_empty() {
        return Ok(());
    }
    sys::setsockopt_bytes(fd.as_fd(), sys::SCTP_SOCKOPT_BINDX_ADD, &packed(addrs)).map(drop)
}

/// `sctp_connectx`: starts an association to a peer known by several
/// addresses (all with the same port). On a non-blocking socket this returns
/// `EINPROGRESS` as [`io::Error`]: wait until the socket is writable, then
/// check `SO_ERROR`, as with `connect(2)`.
pub fn connectx(fd: impl AsFd, addrs: &[SocketAddr]) -> io::Result<()> {
    sys::setsockopt_bytes(fd.as_fd(), sys::SCTP_SOCKOPT_CONNECTX, &packed(addrs)).map(drop)
}

/// Decodes a packed array of `count` kernel socket addresses (the format of
/// `SCTP_GET_PEER_ADDRS`); stops at anything it does not understand.
fn unpack(mut b: &[u8], count: usize) -> Vec<SocketAddr> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count && b.len() >= 2 {
        let family = i32::from(u16::from_ne_bytes([b[0], b[1]]));
        let (addr, len): (SocketAddr, usize) = if family == libc::AF_INET && b.len() >= 16 {
            let ip = std::net::Ipv4Addr::new(b[4], b[5], b[6], b[7]);
            ((ip, u16::from_be_bytes([b[2], b[3]])).into(), 16)
        } else if family == libc::AF_INET6 && b.len() >= 28 {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&b[8..24]);
            let ip = std::net::Ipv6Addr::from(octets);
            let scope = u32::from_ne_bytes([b[24], b[25], b[26], b[27]]);
            let a = std::net::SocketAddrV6::new(ip, u16::from_be_bytes([b[2], b[3]]), 0, scope);
            (a.into(), 28)
        } else {
            break;
        };
        out.push(addr);
        b = &b[len..];
    }
    out
}

fn addrs(fd: impl AsFd, option: libc::c_int) -> io::Result<Vec<SocketAddr>> {
    // struct sctp_getaddrs { sctp_assoc_t assoc_id; __u32 addr_num; __u8 addrs[]; }
    // with assoc_id 0: the one association of a one-to-one socket.
    let mut buf = vec![0u8; 8 + 64 * 28];
    let n = sys::getsockopt_bytes(fd.as_fd(), option, &mut buf)?;
    let count = u32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    Ok(unpack(&buf[8..n.max(8)], count))
}

/// The peer's addresses in the association (`sctp_getpaddrs`): every address
/// the peer advertised, not only the one connected to. IPv4 peers of an IPv6
/// socket show as IPv4-mapped.
pub fn peer_addrs(fd: impl AsFd) -> io::Result<Vec<SocketAddr>> {
    addrs(fd, sys::SCTP_GET_PEER_ADDRS)
}

/// This end's addresses in the association, or the bound addresses of a
/// socket without one (`sctp_getladdrs`).
pub fn local_addrs(fd: impl AsFd) -> io::Result<Vec<SocketAddr>> {
    addrs(fd, sys::SCTP_GET_LOCAL_ADDRS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_addresses_like_the_kernel() {
        let v = packed(&["10.1.2.3:38412".parse().unwrap()]);
        assert_eq!(v.len(), 16);
        assert_eq!(&v[2..4], &38412u16.to_be_bytes());
        assert_eq!(&v[4..8], &[10, 1, 2, 3]);
        let v = packed(&[
            "[fd00::1]:5".parse().unwrap(),
            "127.0.0.1:5".parse().unwrap(),
        ]);
        assert_eq!(v.len(), 28 + 16);
        assert_eq!(u16::from_ne_bytes([v[0], v[1]]), libc::AF_INET6 as u16);
        assert_eq!(u16::from_ne_bytes([v[28], v[29]]), libc::AF_INET as u16);
        let addrs: Vec<SocketAddr> = vec![
            "[fd00::1]:5".parse().unwrap(),
            "127.0.0.1:5".parse().unwrap(),
        ];
        assert_eq!(unpack(&v, 2), addrs);
        assert_eq!(unpack(&v, 1), addrs[..1]);
        assert_eq!(unpack(&v[..20], 2), addrs[..0]);
    }

    mod props {
        //! Packed address arrays against generated bytes.

        use proptest::collection::vec;
        use proptest::prelude::*;

        use super::*;

        fn addr() -> impl Strategy<Value = SocketAddr> {
            prop_oneof![
                (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| (ip, port).into()),
                (any::<[u8; 16]>(), any::<u16>(), any::<u32>()).prop_map(|(ip, port, scope)| {
                    std::net::SocketAddrV6::new(ip.into(), port, 0, scope).into()
                }),
            ]
        }

        proptest! {
            #[test]
            fn prop_unpack_takes_any_bytes(bytes in vec(any::<u8>(), 0..200), count in 0..10usize) {
                prop_assert!(unpack(&bytes, count).len() <= count);
            }

            #[test]
            fn prop_packed_addresses_unpack_to_themselves(addrs in vec(addr(), 0..8)) {
                let b = packed(&addrs);
                prop_assert_eq!(unpack(&b, addrs.len()), addrs.clone());
                // A count below the number packed reads only that many.
                prop_assert_eq!(unpack(&b, addrs.len() / 2), addrs[..addrs.len() / 2].to_vec());
            }
        }
    }
}
