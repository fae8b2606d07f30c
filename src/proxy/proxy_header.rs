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
        ProxyProtocol::V1 => match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                format!("PROXY TCP4 {s} {d} {} {}\r\n", src.port(), dst.port()).into_bytes()
            }
            // Both of one family, as the line allows only one: IPv6, with
            // an IPv4 end (should one ever come) IPv4-mapped.
            (s, d) => format!(
                "PROXY TCP6 {} {} {} {}\r\n",
                v6(s),
                v6(d),
                src.port(),
                dst.port()
            )
            .into_bytes(),
        },
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

    /// A decoder written from the specification (proxy-protocol.txt,
    /// sections 2.1 and 2.2), not from the writer: what a receiver that
    /// follows it strictly would read.
    mod spec {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

        #[derive(Debug, PartialEq, Eq)]
        pub struct Decoded {
            pub src: SocketAddr,
            pub dst: SocketAddr,
            /// v2's PP2_TYPE_NETNS, if present.
            pub netns: Option<Vec<u8>>,
            /// How many bytes the header took.
            pub len: usize,
        }

        /// 2.1: "PROXY" SP proto SP src SP dst SP sport SP dport CRLF, at
        /// most 107 bytes with the CRLF.
        pub fn v1(b: &[u8]) -> Result<Decoded, String> {
            let end = b.windows(2).position(|w| w == b"\r\n").ok_or("no CRLF")?;
            let len = end + 2;
            if len > 107 {
                return Err(format!("line of {len} bytes, more than 107"));
            }
            let line = std::str::from_utf8(&b[..end]).map_err(|e| e.to_string())?;
            if !line.is_ascii() || line.contains(['\r', '\n']) {
                return Err("not one US-ASCII line".into());
            }
            let f: Vec<&str> = line.split(' ').collect();
            let [proxy, proto, src, dst, sport, dport] = f[..] else {
                return Err(format!("{} fields, not 6 single-space separated", f.len()));
            };
            if proxy != "PROXY" {
                return Err("no PROXY".into());
            }
            let ip = |s: &str| -> Result<IpAddr, String> {
                match proto {
                    "TCP4" => s.parse::<Ipv4Addr>().map(IpAddr::V4),
                    "TCP6" => s.parse::<Ipv6Addr>().map(IpAddr::V6),
                    p => return Err(format!("protocol {p}")),
                }
                .map_err(|e| format!("{s}: {e}"))
            };
            // Decimal 0..=65535 without leading zeros.
            let port = |s: &str| -> Result<u16, String> {
                if s.is_empty()
                    || !s.bytes().all(|c| c.is_ascii_digit())
                    || (s.len() > 1 && s.starts_with('0'))
                {
                    return Err(format!("port {s:?}"));
                }
                s.parse().map_err(|e| format!("port {s}: {e}"))
            };
            Ok(Decoded {
                src: SocketAddr::new(ip(src)?, port(sport)?),
                dst: SocketAddr::new(ip(dst)?, port(dport)?),
                netns: None,
                len,
            })
        }

        /// 2.2: the 12-byte signature, version 2 and command PROXY, family
        /// and transport, a big-endian length, the addresses, then TLVs
        /// (type, 16-bit big-endian length, value) filling the rest.
        pub fn v2(b: &[u8]) -> Result<Decoded, String> {
            const SIG: &[u8; 12] = b"\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A";
            if b.len() < 16 || &b[..12] != SIG {
                return Err("no signature".into());
            }
            if b[12] >> 4 != 2 || b[12] & 0xf != 1 {
                return Err(format!("version/command {:#x}", b[12]));
            }
            let len = u16::from_be_bytes([b[14], b[15]]) as usize;
            let body = b.get(16..16 + len).ok_or("shorter than its length")?;
            let (src, dst, rest) = match b[13] {
                // AF_INET, STREAM
                0x11 => {
                    let a = body.get(..12).ok_or("short IPv4 block")?;
                    let ip = |o: usize| IpAddr::from(<[u8; 4]>::try_from(&a[o..o + 4]).unwrap());
                    let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
                    (
                        SocketAddr::new(ip(0), port(8)),
                        SocketAddr::new(ip(4), port(10)),
                        &body[12..],
                    )
                }
                // AF_INET6, STREAM
                0x21 => {
                    let a = body.get(..36).ok_or("short IPv6 block")?;
                    let ip = |o: usize| IpAddr::from(<[u8; 16]>::try_from(&a[o..o + 16]).unwrap());
                    let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
                    (
                        SocketAddr::new(ip(0), port(32)),
                        SocketAddr::new(ip(16), port(34)),
                        &body[36..],
                    )
                }
                f => return Err(format!("family/transport {f:#x}")),
            };
            let mut netns = None;
            let mut tlvs = rest;
            while !tlvs.is_empty() {
                let [t, hi, lo, ..] = tlvs[..] else {
                    return Err("truncated TLV header".into());
                };
                let n = u16::from_be_bytes([hi, lo]) as usize;
                let value = tlvs.get(3..3 + n).ok_or("TLV longer than the header")?;
                if t == 0x30 {
                    if netns.is_some() {
                        return Err("two PP2_TYPE_NETNS".into());
                    }
                    netns = Some(value.to_vec());
                }
                tlvs = &tlvs[3 + n..];
            }
            Ok(Decoded {
                src,
                dst,
                netns,
                len: 16 + len,
            })
        }
    }

    fn any_addr() -> impl proptest::strategy::Strategy<Value = SocketAddr> {
        use proptest::prelude::*;
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
            // IPv4 clients of a dual-stack listener.
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(
                IpAddr::V6(std::net::Ipv4Addr::from(ip).to_ipv6_mapped()),
                p
            )),
        ]
    }

    /// What a receiver should read for addresses `a` and `b`: both IPv4 if
    /// both are (mapped ones told as IPv4), else both IPv6.
    fn expected(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
        let c = |x: SocketAddr| SocketAddr::new(x.ip().to_canonical(), x.port());
        let (a, b) = (c(a), c(b));
        if a.is_ipv4() && b.is_ipv4() {
            (a, b)
        } else {
            let m = |x: SocketAddr| SocketAddr::new(IpAddr::V6(v6(x.ip())), x.port());
            (m(a), m(b))
        }
    }

    proptest::proptest! {
        #[test]
        fn prop_v1_round_trips_through_a_spec_decoder(
            client in any_addr(),
            local in any_addr(),
            netns in ".{0,64}",
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..32),
        ) {
            let mut h = header(ProxyProtocol::V1, client, local, &netns);
            let len = h.len();
            // The client's first bytes follow; the header must end on its own.
            h.extend_from_slice(&tail);
            let d = spec::v1(&h).map_err(proptest::test_runner::TestCaseError::fail)?;
            let (src, dst) = expected(client, local);
            proptest::prop_assert_eq!(d, spec::Decoded { src, dst, netns: None, len });
        }

        #[test]
        fn prop_v2_round_trips_through_a_spec_decoder(
            client in any_addr(),
            local in any_addr(),
            netns in "(host|pid:[0-9]{1,7}|/[ -~]{0,300}|\\PC{0,100})",
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..32),
        ) {
            let mut h = header(ProxyProtocol::V2, client, local, &netns);
            let len = h.len();
            h.extend_from_slice(&tail);
            let d = spec::v2(&h).map_err(proptest::test_runner::TestCaseError::fail)?;
            let (src, dst) = expected(client, local);
            proptest::prop_assert_eq!(
                d,
                spec::Decoded { src, dst, netns: Some(netns.into_bytes()), len }
            );
        }
    }
}
