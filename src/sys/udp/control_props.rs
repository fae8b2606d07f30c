//! The control-message parser against generated buffers: any bytes are
//! safe, and well-formed messages (laid out as the kernel's put_cmsg
//! lays them) parse to what they say, also when the buffer is cut short.

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;

/// One control message as the kernel could send it.
#[derive(Debug, Clone)]
enum Msg {
    V4 {
        ifindex: i32,
        dst: Ipv4Addr,
        addr: Ipv4Addr,
    },
    V6 {
        addr: Ipv6Addr,
        ifindex: u32,
    },
    Drops(u32),
    /// A known kind whose payload is too short to be read.
    Short {
        level: c_int,
        kind: c_int,
        len: usize,
    },
    Other {
        level: c_int,
        kind: c_int,
        payload: Vec<u8>,
    },
}

const KNOWN: [(c_int, c_int, usize); 3] = [
    (
        libc::IPPROTO_IP,
        libc::IP_PKTINFO,
        size_of::<libc::in_pktinfo>(),
    ),
    (
        libc::IPPROTO_IPV6,
        libc::IPV6_PKTINFO,
        size_of::<libc::in6_pktinfo>(),
    ),
    (libc::SOL_SOCKET, SO_RXQ_OVFL, 4),
];

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        (any::<i32>(), any::<u32>(), any::<u32>()).prop_map(|(ifindex, d, a)| Msg::V4 {
            ifindex,
            dst: d.into(),
            addr: a.into(),
        }),
        (any::<[u8; 16]>(), any::<u32>()).prop_map(|(a, ifindex)| Msg::V6 {
            addr: a.into(),
            ifindex,
        }),
        // Mapped and plain IPv4 destinations of a dual-stack socket.
        (any::<u32>(), any::<u32>()).prop_map(|(a, ifindex)| Msg::V6 {
            addr: Ipv4Addr::from(a).to_ipv6_mapped(),
            ifindex,
        }),
        any::<u32>().prop_map(Msg::Drops),
        (0..KNOWN.len(), any::<usize>()).prop_map(|(k, n)| {
            let (level, kind, size) = KNOWN[k];
            Msg::Short {
                level,
                kind,
                len: n % size,
            }
        }),
        (any::<c_int>(), any::<c_int>(), vec(any::<u8>(), 0..48))
            .prop_filter("not a kind the parser reads", |(l, k, _)| {
                !KNOWN.iter().any(|(kl, kk, _)| kl == l && kk == k)
            })
            .prop_map(|(level, kind, payload)| Msg::Other {
                level,
                kind,
                payload
            }),
    ]
}

impl Msg {
    fn encode(&self) -> (c_int, c_int, Vec<u8>) {
        match self {
            Msg::V4 { ifindex, dst, addr } => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: *ifindex,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(*dst).to_be(),
                    },
                    ipi_addr: libc::in_addr {
                        s_addr: u32::from(*addr).to_be(),
                    },
                };
                let p = Pktinfo::of(libc::IPPROTO_IP, libc::IP_PKTINFO, &info);
                (p.level, p.kind, p.as_slice().to_vec())
            }
            Msg::V6 { addr, ifindex } => {
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: addr.octets(),
                    },
                    ipi6_ifindex: *ifindex,
                };
                let p = Pktinfo::of(libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &info);
                (p.level, p.kind, p.as_slice().to_vec())
            }
            Msg::Drops(n) => (libc::SOL_SOCKET, SO_RXQ_OVFL, n.to_ne_bytes().to_vec()),
            Msg::Short { level, kind, len } => (*level, *kind, vec![0xa5; *len]),
            Msg::Other {
                level,
                kind,
                payload,
            } => (*level, *kind, payload.clone()),
        }
    }
}

/// The kernel's layout: each header at a CMSG_SPACE step, `cmsg_len`
/// counting header and payload, padding zeroed. Returns the buffer and
/// where each message ends (unpadded).
fn encode(msgs: &[Msg]) -> (Vec<u8>, Vec<usize>) {
    let (mut out, mut ends) = (Vec::new(), Vec::new());
    for m in msgs {
        let (level, kind, payload) = m.encode();
        let start = out.len();
        let mut hdr = [0u8; size_of::<libc::cmsghdr>()];
        let len = cmsg_len(payload.len());
        let at = mem::offset_of!(libc::cmsghdr, cmsg_len);
        hdr[at..at + size_of::<usize>()].copy_from_slice(&len.to_ne_bytes());
        let at = mem::offset_of!(libc::cmsghdr, cmsg_level);
        hdr[at..at + 4].copy_from_slice(&level.to_ne_bytes());
        let at = mem::offset_of!(libc::cmsghdr, cmsg_type);
        hdr[at..at + 4].copy_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&hdr);
        out.extend_from_slice(&payload);
        ends.push(start + len);
        out.resize(start + cmsg_space(payload.len()), 0);
    }
    (out, ends)
}

/// What the messages say: the last of each kind wins.
fn model(msgs: &[Msg]) -> (Option<ReplyFrom>, Option<u32>) {
    let (mut v4, mut v6, mut drops) = (None, None, None);
    for m in msgs {
        match *m {
            Msg::V4 { ifindex, dst, .. } => {
                v4 = Some(ReplyFrom {
                    ip: dst.into(),
                    ifindex: ifindex as u32,
                })
            }
            Msg::V6 { addr, ifindex } => {
                v6 = Some(ReplyFrom {
                    ip: addr.to_canonical(),
                    ifindex,
                })
            }
            Msg::Drops(n) => drops = Some(n),
            Msg::Short { .. } | Msg::Other { .. } => {}
        }
    }
    (v4.or(v6).filter(|r| can_be_source(r.ip)), drops)
}

proptest! {
    #[test]
    fn prop_control_parser_takes_any_bytes(bytes in vec(any::<u8>(), 0..600)) {
        let c = parse_control(&bytes);
        if let Some(r) = c.reply_from {
            prop_assert!(can_be_source(r.ip));
        }
        // Every step of the walk moves past a whole header.
        let n = crate::sys::cmsg::control_messages(&bytes).count();
        prop_assert!(n <= bytes.len() / size_of::<libc::cmsghdr>());
    }

    #[test]
    fn prop_headers_with_any_lengths_are_safe(
        parts in vec((0..KNOWN.len(), any::<u64>(), vec(any::<u8>(), 0..40)), 0..8),
    ) {
        // Known kinds with lengths that lie: 0, short, huge, past the end.
        let mut bytes = Vec::new();
        for (k, len, payload) in &parts {
            let (level, kind, _) = KNOWN[*k];
            let len = match len % 4 {
                0 => *len as usize,
                1 => (*len % 16) as usize,
                _ => (*len % 80) as usize,
            };
            bytes.extend_from_slice(&len.to_ne_bytes());
            bytes.extend_from_slice(&level.to_ne_bytes());
            bytes.extend_from_slice(&kind.to_ne_bytes());
            bytes.extend_from_slice(payload);
        }
        for c in crate::sys::cmsg::control_messages(&bytes) {
            let inside = bytes.as_ptr_range();
            prop_assert!(inside.start <= c.data.as_ptr() && c.data.as_ptr_range().end <= inside.end);
        }
        let _ = parse_control(&bytes);
    }

    #[test]
    fn prop_well_formed_control_messages_parse_to_their_values(msgs in vec(msg(), 0..8)) {
        let (bytes, _) = encode(&msgs);
        let c = parse_control(&bytes);
        prop_assert_eq!((c.reply_from, c.kernel_drops), model(&msgs));
    }

    #[test]
    fn prop_a_cut_buffer_yields_the_messages_before_the_cut(
        msgs in vec(msg(), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let (bytes, ends) = encode(&msgs);
        let cut = cut.index(bytes.len() + 1);
        let whole = ends.iter().take_while(|e| **e <= cut).count();
        let c = parse_control(&bytes[..cut]);
        prop_assert_eq!((c.reply_from, c.kernel_drops), model(&msgs[..whole]));
    }
}
