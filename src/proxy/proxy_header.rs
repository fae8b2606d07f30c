//! The PROXY protocol header an upstream connection starts with, when the
//! rule asks for one (`proxy_protocol`): it tells the upstream who the client
//! is, which the upstream cannot see otherwise (its peer is nsproxy's socket
//! in the upstream namespace). Format: HAProxy's specification,
//! <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::net::{IpAddr, SocketAddr};

use crate::config::ProxyProtocol;

/// Version 2's fixed first 12 bytes.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY (the addresses are the client's connection).
const V2_PROXY: u8 = 0x21;
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;
/// The TLV that names the network namespace the connection was accepted in.
const PP2_TYPE_NETNS: u8 = 0x30;

/// The header for a connection from `client` to `local` (the address it
/// reached), accepted in namespace `netns` (v2 carries it; v1 cannot). Both
/// ends of a connection are of one family; an IPv4 client of a dual-stack
/// listener (`::ffff:a.b.c.d` at both ends) is told as IPv4.
pub(crate) fn header(
    version: ProxyProtocol,
    client: SocketAddr,
    local: SocketAddr,
    netns: &str,
) -> Vec<u8> {
    let canonical = |x: SocketAddr| SocketAddr::new(x.ip().to_canonical(), x.port());
    let (src, dst) = (canonical(client), canonical(local));
    match version {
        ProxyProtocol::V1 => {
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port()
            )
            .into_bytes()
        }
        ProxyProtocol::V2 => {
            let mut body = Vec::with_capacity(36 + 3 + netns.len());
            let family = match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    body.extend_from_slice(&s.octets());
                    body.extend_from_slice(&d.octets());
                    V2_TCP4
                }
                (s, d) => {
                    body.extend_from_slice(&v6(s).octets());
                    body.extend_from_slice(&v6(d).octets());
                    V2_TCP6
                }
            };
            body.extend_from_slice(&src.port().to_be_bytes());
            body.extend_from_slice(&dst.port().to_be_bytes());
            // A namespace that could be opened has a name or path shorter
            // than PATH_MAX (4 KiB): its length fits the TLV's 16 bits.
            body.push(PP2_TYPE_NETNS);
            body.extend_from_slice(&(netns.len() as u16).to_be_bytes());
            body.extend_from_slice(netns.as_bytes());
            let mut h = Vec::with_capacity(16 + body.len());
            h.extend_from_slice(&V2_SIGNATURE);
            h.push(V2_PROXY);
            h.push(family);
            h.extend_from_slice(&(body.len() as u16).to_be_bytes());
            h.extend_from_slice(&body);
            h
        }
    }
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_is_one_text_line() {
        let h = header(
            ProxyProtocol::V1,
            addr("10.1.2.3:40000"),
            addr("127.0.0.1:7000"),
            "ns1",
        );
        assert_eq!(h, b"PROXY TCP4 10.1.2.3 127.0.0.1 40000 7000\r\n");
        let h = header(
            ProxyProtocol::V1,
            addr("[fd00::1]:40000"),
            addr("[::1]:7000"),
            "ns1",
        );
        assert_eq!(h, b"PROXY TCP6 fd00::1 ::1 40000 7000\r\n");
        // An IPv4 client of a dual-stack listener.
        let h = header(
            ProxyProtocol::V1,
            addr("[::ffff:10.0.0.9]:5"),
            addr("[::ffff:10.0.0.1]:80"),
            "host",
        );
        assert_eq!(h, b"PROXY TCP4 10.0.0.9 10.0.0.1 5 80\r\n");
    }

    #[test]
    fn v2_is_binary_with_the_namespace() {
        let h = header(
            ProxyProtocol::V2,
            addr("10.1.2.3:40000"),
            addr("127.0.0.1:7000"),
            "ns1",
        );
        let mut want = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x12".to_vec();
        want.extend_from_slice(&[10, 1, 2, 3, 127, 0, 0, 1]);
        want.extend_from_slice(&40000u16.to_be_bytes());
        want.extend_from_slice(&7000u16.to_be_bytes());
        want.extend_from_slice(b"\x30\x00\x03ns1");
        assert_eq!(h, want);

        let h = header(
            ProxyProtocol::V2,
            addr("[fd00::1]:1"),
            addr("[::1]:2"),
            "/proc/1/ns/net",
        );
        assert_eq!(h[13], 0x21);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]) as usize, h.len() - 16);
        assert_eq!(h.len(), 16 + 36 + 3 + "/proc/1/ns/net".len());
        assert_eq!(
            &h[16..32],
            &"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(&h[h.len() - 14..], b"/proc/1/ns/net");
    }
}
