//! Whether a namespace has the policy routing `upstream_source = "client"`
//! needs, read over rtnetlink (for `nsproxy check`).
//!
//! An upstream socket bound to a client's address gets the upstream's
//! replies only if they are delivered locally in the upstream namespace,
//! where that address is not one of its own: an `ip rule` sending them to a
//! table `T` (`lookup T`) in which a `local` default route (`local
//! 0.0.0.0/0 dev lo table T`, `local ::/0 dev lo table T`) makes every
//! address local. [`Routing::of`] says, per family, whether some rule looks
//! up a table (not `local`, `main` or `default`) with such a route; which
//! packets the rule selects (`from UPSTREAM`, `fwmark 1`, ...) is the
//! operator's to choose, and not judged.
//!
//! The dump is asked on a `NETLINK_ROUTE` socket made in the namespace (a
//! netlink socket answers for the namespace it was made in, whichever
//! thread uses it); the answer is parsed by pure functions, unit-tested on
//! hand-built messages.

use std::io::{self, Read};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::SocketSpec;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWRULE: u16 = 32;
const RTM_GETRULE: u16 = 34;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
/// `FRA_TABLE` and `RTA_TABLE`: the table as a u32 (the header's byte
/// holds only tables below 256).
const ATTR_TABLE: u16 = 15;
const FR_ACT_TO_TBL: u8 = 1;
const RTN_LOCAL: u8 = 2;
/// `default`, `main`, `local`: tables every namespace has, whose `local`
/// routes are its own addresses'.
const BUILTIN_TABLES: [u32; 3] = [253, 254, 255];
const HEADER: usize = 16;
/// `struct fib_rule_hdr` and `struct rtmsg` are both 12 bytes.
const BODY: usize = 12;

/// What a namespace's policy routing has, per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Routing {
    /// IPv4 replies to a foreign address can be delivered locally.
    pub v4: bool,
    /// IPv6, likewise.
    pub v6: bool,
}

/// The kind of socket [`Routing::of`] asks on: `NETLINK_ROUTE`.
pub fn netlink_spec() -> SocketSpec {
    SocketSpec {
        domain: Domain::from(libc::AF_NETLINK),
        ty: Type::RAW,
        protocol: Some(Protocol::from(libc::NETLINK_ROUTE)),
        transparent: false,
    }
}

impl Routing {
    /// Reads the rules and routes of the namespace `socket` (a
    /// [`netlink_spec`] socket) was made in.
    pub fn of(socket: &Socket) -> io::Result<Routing> {
        socket.set_nonblocking(false)?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut routing = Routing::default();
        for (family, v6) in [(libc::AF_INET as u8, false), (libc::AF_INET6 as u8, true)] {
            let rules = dump(socket, RTM_GETRULE, family, 1)?;
            let routes = dump(socket, RTM_GETROUTE, family, 2)?;
            let found = has_local_table(&rules, &routes);
            if v6 {
                routing.v6 = found;
            } else {
                routing.v4 = found;
            }
        }
        Ok(routing)
    }
}

/// A dump request: the header, then a zeroed body of `family`.
fn request(kind: u16, family: u8, seq: u32) -> Vec<u8> {
    let len = (HEADER + BODY) as u32;
    let mut m = Vec::with_capacity(HEADER + BODY);
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(family);
    m.extend_from_slice(&[0; BODY - 1]);
    m
}

/// Sends a dump request and collects the messages of its answer (each a
/// `(type, payload)`), until `NLMSG_DONE`. Bounded: at most 100,000
/// reads, each within the socket's read timeout.
fn dump(socket: &Socket, kind: u16, family: u8, seq: u32) -> io::Result<Vec<(u16, Vec<u8>)>> {
    socket.send(&request(kind, family, seq))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut reader = socket;
    for _ in 0..100_000 {
        let n = reader.read(&mut buf)?;
        match messages(&buf[..n], seq, &mut out)? {
            true => return Ok(out),
            false => continue,
        }
    }
    Err(io::Error::other("the netlink dump did not end"))
}

/// Appends the messages of one datagram answering `seq` to `out`; `true`
/// at `NLMSG_DONE`. A netlink error is returned as the io error it carries.
fn messages(mut data: &[u8], seq: u32, out: &mut Vec<(u16, Vec<u8>)>) -> io::Result<bool> {
    while data.len() >= HEADER {
        let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into().unwrap());
        let their_seq = u32::from_ne_bytes(data[8..12].try_into().unwrap());
        if len < HEADER || len > data.len() {
            return Err(io::Error::other("a malformed netlink message"));
        }
        let payload = &data[HEADER..len];
        if their_seq == seq {
            match kind {
                NLMSG_DONE => return Ok(true),
                NLMSG_ERROR => {
                    let errno = payload
                        .get(0..4)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap()));
                    if errno != 0 {
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                }
                _ => out.push((kind, payload.to_vec())),
            }
        }
        data = &data[align(len).min(data.len())..];
    }
    Ok(false)
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// The table of a rule or route message: its `*_TABLE` attribute, else the
/// header's byte (at offset 4 of both bodies).
fn table(payload: &[u8]) -> Option<u32> {
    let mut table = u32::from(*payload.get(4)?);
    let mut attrs = payload.get(BODY..)?;
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes(attrs[0..2].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(attrs[2..4].try_into().unwrap());
        if len < 4 || len > attrs.len() {
            break;
        }
        if kind == ATTR_TABLE && len >= 8 {
            table = u32::from_ne_bytes(attrs[4..8].try_into().unwrap());
        }
        attrs = &attrs[align(len).min(attrs.len())..];
    }
    Some(table)
}

/// Whether some rule (`RTM_NEWRULE`, action `FR_ACT_TO_TBL`) looks up a
/// table other than the built-in ones that has a `local` default route
/// (`RTM_NEWROUTE`, type `RTN_LOCAL`, destination length 0).
fn has_local_table(rules: &[(u16, Vec<u8>)], routes: &[(u16, Vec<u8>)]) -> bool {
    let local_default: Vec<u32> = routes
        .iter()
        .filter(|(k, p)| *k == RTM_NEWROUTE && p.len() >= BODY && p[1] == 0 && p[7] == RTN_LOCAL)
        .filter_map(|(_, p)| table(p))
        .collect();
    rules
        .iter()
        .filter(|(k, p)| *k == RTM_NEWRULE && p.len() >= BODY && p[7] == FR_ACT_TO_TBL)
        .filter_map(|(_, p)| table(p))
        .any(|t| !BUILTIN_TABLES.contains(&t) && local_default.contains(&t))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rule or route body: family, dst_len, table byte, type/action byte
    /// at 7, and a `*_TABLE` attribute when `attr` is given.
    fn body(dst_len: u8, table_byte: u8, byte7: u8, attr: Option<u32>) -> Vec<u8> {
        let mut b = vec![libc::AF_INET as u8, dst_len, 0, 0, table_byte, 0, 0, byte7];
        b.extend_from_slice(&0u32.to_ne_bytes());
        if let Some(t) = attr {
            b.extend_from_slice(&8u16.to_ne_bytes());
            b.extend_from_slice(&ATTR_TABLE.to_ne_bytes());
            b.extend_from_slice(&t.to_ne_bytes());
        }
        b
    }

    fn message(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = (HEADER + payload.len()) as u32;
        let mut m = Vec::new();
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    #[test]
    fn a_rule_to_a_table_with_a_local_default_route_is_found() {
        let rule = |t| (RTM_NEWRULE, body(0, 0, FR_ACT_TO_TBL, Some(t)));
        let local_default = |t| (RTM_NEWROUTE, body(0, t as u8, RTN_LOCAL, Some(t)));
        // `ip rule add from X lookup 100`, `ip route add local 0.0.0.0/0 dev lo table 100`.
        assert!(has_local_table(&[rule(100)], &[local_default(100)]));
        // The rule alone, the route alone, or in another table: not enough.
        assert!(!has_local_table(&[rule(100)], &[local_default(101)]));
        assert!(!has_local_table(&[], &[local_default(100)]));
        assert!(!has_local_table(&[rule(100)], &[]));
        // The `local` table's own routes are the namespace's addresses.
        assert!(!has_local_table(&[rule(255)], &[local_default(255)]));
        // A local route to one prefix is not a default one.
        let prefix = (RTM_NEWROUTE, body(24, 100, RTN_LOCAL, Some(100)));
        assert!(!has_local_table(&[rule(100)], &[prefix]));
        // A table above 255 is in the attribute only.
        assert!(has_local_table(&[rule(1000)], &[local_default(1000)]));
    }

    #[test]
    fn a_dump_is_read_to_its_end_and_errors_are_io_errors() {
        let mut out = Vec::new();
        let mut data = message(RTM_NEWRULE, 7, &body(0, 100, 1, None));
        data.extend(message(RTM_NEWRULE, 9, &body(0, 5, 1, None)));
        assert!(!messages(&data, 7, &mut out).unwrap());
        assert_eq!(out.len(), 1, "only the answer to our request");
        assert_eq!(table(&out[0].1), Some(100));
        assert!(messages(&message(NLMSG_DONE, 7, &[0; 4]), 7, &mut out).unwrap());
        let eperm = (-libc::EPERM).to_ne_bytes();
        let e = messages(&message(NLMSG_ERROR, 7, &eperm), 7, &mut out).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        assert!(messages(&data[..20], 7, &mut out).is_err(), "cut short");
    }

    #[test]
    fn the_request_is_a_dump_of_the_family() {
        let r = request(RTM_GETRULE, libc::AF_INET6 as u8, 3);
        assert_eq!(r.len(), 28);
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), RTM_GETRULE);
        assert_eq!(u16::from_ne_bytes([r[6], r[7]]), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(r[16], libc::AF_INET6 as u8);
    }
}
