//! Port ranges: `listen = "[::]:10000-10099"` with an upstream range of the
//! same length (port to port) or one upstream port (every listen port to
//! it). A range is one rule; the server makes one binding per port
//! ([`Rule::per_port`]), so that each port listens, fails and is reloaded
//! on its own.

use std::fmt;
use std::net::SocketAddr;

use super::Rule;

/// A rule's `listen` written as a range of ports, and how its upstream port
/// follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// The first listen port of the range.
    pub first: u16,
    /// The last listen port, served too.
    pub last: u16,
    /// The upstream port `first` forwards to.
    pub upstream_first: u16,
    /// Every listen port forwards to `upstream_first` (many to one); else
    /// the upstream port steps with the listen port.
    pub to_one: bool,
}

impl PortRange {
    /// How many ports the range has.
    pub fn len(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    /// Never: a range has at least one port (it exists for the lint).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The listen ports, in order.
    pub fn ports(&self) -> std::ops::RangeInclusive<u16> {
        self.first..=self.last
    }

    /// Whether `port` is one of the range's.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// The upstream port that listen `port` (one of the range's) forwards to.
    pub fn upstream_port(&self, port: u16) -> u16 {
        if self.to_one {
            self.upstream_first
        } else {
            self.upstream_first + (port - self.first)
        }
    }

    /// The upstream side as written: `20000-20099`, or the one port.
    pub fn upstream_text(&self) -> String {
        if self.to_one {
            self.upstream_first.to_string()
        } else {
            format!("{}-{}", self.upstream_first, self.upstream_port(self.last))
        }
    }
}

/// The listen side: `10000-10099`.
impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// An address written `IP:PORT` or `IP:FIRST-LAST`: the address with the
/// first port, and the last port of a range.
pub(crate) fn parse_ports(s: &str) -> Result<(SocketAddr, Option<u16>), String> {
    let Some((host, ports)) = s.rsplit_once(':') else {
        return Err(String::new());
    };
    let Some((a, b)) = ports.split_once('-') else {
        return s
            .parse::<SocketAddr>()
            .map(|a| (a, None))
            .map_err(|_| String::new());
    };
    let addr: SocketAddr = format!("{host}:{a}").parse().map_err(|_| String::new())?;
    let port = |p: &str| -> Result<u32, String> {
        let n: u32 = p
            .parse()
            .map_err(|_| format!("\"{p}\" in the port range {ports} is not a port number"))?;
        if n == 0 || n > 65_535 {
            return Err(format!(
                "port {n} in the range {ports} is out of range: ports of a range are 1 to 65535"
            ));
        }
        Ok(n)
    };
    let (first, last) = (port(a)?, port(b)?);
    if last < first {
        return Err(format!(
            "the port range {ports} is reversed: write the lower port first ({last}-{first})"
        ));
    }
    Ok((addr, Some(last as u16)))
}

/// How the upstream port follows a listen range (`None` when neither side
/// is a range): the same length port to port, or one upstream port.
pub(crate) fn check_range(
    listen: (SocketAddr, Option<u16>),
    upstream: (SocketAddr, Option<u16>),
) -> Result<Option<PortRange>, String> {
    let (first, up_first) = (listen.0.port(), upstream.0.port());
    match (listen.1, upstream.1) {
        (None, None) => Ok(None),
        (None, Some(up_last)) => Err(format!(
            "the upstream is the port range {up_first}-{up_last} but `listen` is one port ({first}): a single listen port forwards to a single upstream port"
        )),
        (Some(last), None) => Ok(Some(PortRange {
            first,
            last,
            upstream_first: up_first,
            to_one: true,
        })),
        (Some(last), Some(up_last)) => {
            let (n, m) = (last - first, up_last - up_first);
            if n != m {
                return Err(format!(
                    "the upstream range {up_first}-{up_last} has {} port(s) and the listen range {first}-{last} has {}: give ranges of the same length (port to port) or one upstream port (every listen port to it)",
                    u32::from(m) + 1,
                    u32::from(n) + 1
                ));
            }
            Ok(Some(PortRange {
                first,
                last,
                upstream_first: up_first,
                to_one: false,
            }))
        }
    }
}

impl Rule {
    /// `listen` as written: the address, with its port range if it has one.
    pub fn listen_text(&self) -> String {
        match self.ports {
            Some(r) => with_ports(self.listen, &r.to_string()),
            None => self.listen.to_string(),
        }
    }

    /// `upstream` as written.
    pub fn upstream_text(&self) -> String {
        match self.ports {
            Some(r) => with_ports(self.upstream, &r.upstream_text()),
            None => self.upstream.to_string(),
        }
    }

    /// How many listen ports the rule has (1 without a range).
    pub fn port_count(&self) -> usize {
        self.ports.map_or(1, |r| r.len())
    }

    /// The rule as its bindings run it, one rule per listen port: a rule
    /// without a range as it is; a range's rules each with `listen` and
    /// `upstream` at one port of it, keeping the range in
    /// [`Rule::ports`] (for status and metrics, and which a reload does not
    /// compare, so that a port that stays in a widened or narrowed range
    /// keeps its socket).
    pub fn per_port(&self) -> Vec<Rule> {
        let Some(range) = self.ports else {
            return vec![self.clone()];
        };
        range
            .ports()
            .map(|p| {
                let mut r = self.clone();
                r.listen.set_port(p);
                r.upstream.set_port(range.upstream_port(p));
                r
            })
            .collect()
    }

    /// The listen port that tells this binding's rule apart from the other
    /// ports of its range; `None` for a rule without a range.
    pub fn range_port(&self) -> Option<u16> {
        self.ports.map(|_| self.listen.port())
    }
}

/// `addr` with `ports` (`10000-10099`) in place of its port.
fn with_ports(addr: SocketAddr, ports: &str) -> String {
    match addr {
        SocketAddr::V4(a) => format!("{}:{ports}", a.ip()),
        SocketAddr::V6(a) => format!("[{}]:{ports}", a.ip()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(listen: &str, upstream: &str) -> Result<Option<PortRange>, String> {
        check_range(parse_ports(listen)?, parse_ports(upstream)?)
    }

    #[test]
    fn port_to_port_and_many_to_one() {
        let r = range("[::]:10000-10099", "127.0.0.1:20000-20099")
            .unwrap()
            .unwrap();
        assert_eq!((r.len(), r.upstream_port(10005)), (100, 20005));
        assert_eq!(r.upstream_text(), "20000-20099");
        let r = range("0.0.0.0:10-12", "127.0.0.1:9").unwrap().unwrap();
        assert_eq!((r.len(), r.upstream_port(12), r.to_one), (3, 9, true));
        assert_eq!(range("[::]:80", "[::1]:90").unwrap(), None);
        let one = range("[::]:7-7", "[::1]:8-8").unwrap().unwrap();
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn bad_ranges_say_why() {
        let err = |l: &str, u: &str| range(l, u).unwrap_err();
        assert!(err("[::]:200-100", "[::1]:9").contains("reversed"));
        assert!(err("[::]:100-70000", "[::1]:9").contains("1 to 65535"));
        assert!(err("[::]:0-10", "[::1]:9").contains("1 to 65535"));
        assert!(err("[::]:1-10", "[::1]:1-20").contains("same length"));
        assert!(err("[::]:80", "[::1]:1-20").contains("single listen port"));
        assert!(err("[::]:8-x", "[::1]:1").contains("not a port number"));
    }

    #[test]
    fn a_range_expands_to_one_rule_per_port() {
        let c =
            crate::config::parse_forward(&["tcp:[::]:10-12=127.0.0.1:20-22".into()], None).unwrap();
        let rules = c.rules[0].per_port();
        let ports: Vec<(u16, u16)> = rules
            .iter()
            .map(|r| (r.listen.port(), r.upstream.port()))
            .collect();
        assert_eq!(ports, [(10, 20), (11, 21), (12, 22)]);
        assert!(rules.iter().all(|r| r.listen_text() == "[::]:10-12"));
        assert_eq!(rules[1].range_port(), Some(11));
        // A port kept by a widened range is the same binding.
        let wide =
            crate::config::parse_forward(&["tcp:[::]:9-14=127.0.0.1:19-24".into()], None).unwrap();
        assert!(wide.rules[0].per_port()[2].same_identity(&rules[1]));
    }
}
