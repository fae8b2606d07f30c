//! `upstream_source = "client"`: upstream sockets that come from the
//! client's address and port.
//!
//! The socket is made with `IP_TRANSPARENT` (`IPV6_TRANSPARENT`), where the
//! privilege is (the namespace thread, or split, the socket broker; see
//! [`SocketSpec::transparent`]), then bound here to the client's address
//! before it connects. Which address that is, and why it cannot be, are
//! decided by [`source_for`], a pure function; a failure ends that one
//! connection or session, with a [`SourceError`] saying why.

use std::io;
use std::net::SocketAddr;

use socket2::Socket;

use crate::config::{Protocol, Rule};
use crate::netns::SocketSpec;

/// The kind of socket a TCP or UDP rule's upstream legs are made of: of the
/// upstream's family, transparent for `upstream_source = "client"`. (SCTP
/// picks its family from all of its addresses; see [`crate::sctp`].)
pub(crate) fn upstream_spec(rule: &Rule) -> SocketSpec {
    let spec = match rule.protocol {
        Protocol::Udp => SocketSpec::udp(&rule.upstream),
        Protocol::Tcp | Protocol::Sctp => SocketSpec::tcp(&rule.upstream),
    };
    spec.transparent(rule.upstream_source.is_client())
}

/// Why an upstream socket could not come from the client's address.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SourceError {
    /// The client's family is not the upstream's: an IPv6 client of an IPv4
    /// upstream, or an IPv4 one of an IPv6 upstream.
    #[error(
        "the client's address {client} is {}, the upstream {upstream} is {}: an upstream connection cannot come from it (upstream_source = \"client\" needs clients of the upstream's address family)",
        family(client),
        family(upstream)
    )]
    Family {
        client: SocketAddr,
        upstream: SocketAddr,
    },
    /// Another socket of the upstream namespace already has the address and
    /// port (for TCP: to the same upstream), such as the connection of a
    /// client with the same address and port in another listen namespace.
    #[error(
        "the client's address and port {client} are in use in the upstream namespace already (another client with the same address and port, in another listen namespace, is connected to the upstream {upstream}) ({source})"
    )]
    InUse {
        client: SocketAddr,
        upstream: SocketAddr,
        source: io::Error,
    },
    /// Any other bind failure (a client port below 1024 that this process
    /// may not bind, say).
    #[error("cannot bind the upstream socket to the client's address {client}: {source}{}", bind_hint(source, *client))]
    Bind {
        client: SocketAddr,
        source: io::Error,
    },
}

fn family(a: &SocketAddr) -> &'static str {
    if a.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn bind_hint(e: &io::Error, client: SocketAddr) -> &'static str {
    if e.raw_os_error() == Some(libc::EACCES) && client.port() < 1024 {
        " (the client's port is below 1024, which a relay without CAP_NET_BIND_SERVICE may not bind)"
    } else {
        ""
    }
}

/// The address an upstream socket to `upstream` binds for the client at
/// `client`: the client's, an IPv4 client of a `[::]` listener (a
/// v4-mapped `::ffff:a.b.c.d`) as IPv4.
pub(crate) fn source_for(
    client: SocketAddr,
    upstream: SocketAddr,
) -> Result<SocketAddr, SourceError> {
    let source = super::relay::canonical(client);
    if source.is_ipv4() != upstream.is_ipv4() {
        return Err(SourceError::Family {
            client: source,
            upstream,
        });
    }
    Ok(source)
}

/// Binds `socket` (made transparent) to `client`'s address for a leg to
/// `upstream`. A TCP socket takes `SO_REUSEADDR`, so that only the same
/// 4-tuple clashes (at connect, see [`in_use_at_connect`]) and not one client
/// port to two upstreams; a UDP one does not, as two UDP sockets could then
/// share one 4-tuple and the replies go to either.
pub(crate) fn bind(
    socket: &Socket,
    client: SocketAddr,
    upstream: SocketAddr,
    protocol: Protocol,
) -> Result<(), SourceError> {
    let source = source_for(client, upstream)?;
    if protocol == Protocol::Tcp {
        socket
            .set_reuse_address(true)
            .map_err(|source_err| SourceError::Bind {
                client: source,
                source: source_err,
            })?;
    }
    socket.bind(&source.into()).map_err(|e| {
        if e.raw_os_error() == Some(libc::EADDRINUSE) {
            SourceError::InUse {
                client: source,
                upstream,
                source: e,
            }
        } else {
            SourceError::Bind {
                client: source,
                source: e,
            }
        }
    })
}

/// A TCP connect of a socket bound to the client's address failed because
/// that 4-tuple is taken in the upstream namespace (`EADDRNOTAVAIL`):
/// said as a [`SourceError`].
pub(crate) fn in_use_at_connect(
    e: &io::Error,
    client: SocketAddr,
    upstream: SocketAddr,
) -> Option<SourceError> {
    (e.raw_os_error() == Some(libc::EADDRNOTAVAIL)).then(|| SourceError::InUse {
        client: super::relay::canonical(client),
        upstream,
        source: io::Error::from_raw_os_error(libc::EADDRNOTAVAIL),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_source_is_the_client_a_mapped_one_as_ipv4() {
        let up4 = a("10.0.0.1:80");
        let up6 = a("[fd00::1]:80");
        assert_eq!(
            source_for(a("10.9.0.2:4000"), up4).unwrap(),
            a("10.9.0.2:4000")
        );
        assert_eq!(
            source_for(a("[::ffff:10.9.0.2]:4000"), up4).unwrap(),
            a("10.9.0.2:4000")
        );
        assert_eq!(
            source_for(a("[fd99::2]:4000"), up6).unwrap(),
            a("[fd99::2]:4000")
        );
    }

    #[test]
    fn a_family_mismatch_says_both_families() {
        let e = source_for(a("[fd99::2]:4000"), a("10.0.0.1:80")).unwrap_err();
        assert!(matches!(e, SourceError::Family { .. }));
        assert_eq!(
            e.to_string(),
            "the client's address [fd99::2]:4000 is IPv6, the upstream 10.0.0.1:80 is IPv4: an upstream connection cannot come from it (upstream_source = \"client\" needs clients of the upstream's address family)"
        );
        let e = source_for(a("[::ffff:10.9.0.2]:4000"), a("[fd00::1]:80")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("the client's address 10.9.0.2:4000 is IPv4")
        );
    }

    #[test]
    fn only_eaddrnotavail_at_connect_is_a_clash() {
        let (c, u) = (a("10.9.0.2:4000"), a("10.0.0.1:80"));
        let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert!(in_use_at_connect(&refused, c, u).is_none());
        let taken = io::Error::from_raw_os_error(libc::EADDRNOTAVAIL);
        let e = in_use_at_connect(&taken, c, u).unwrap();
        assert!(e.to_string().starts_with(
            "the client's address and port 10.9.0.2:4000 are in use in the upstream namespace already"
        ));
    }
}
