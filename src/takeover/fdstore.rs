//! systemd's fd store: the names the sockets are stored under, and the
//! store at stop.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;

use tracing::warn;

use super::Handed;

/// Before this process stops under systemd with an fd store
/// (`FileDescriptorStoreMax=`): its listening sockets (and metrics
/// listener) go to the store, so that they stay open, clients queuing in
/// their backlogs, until the next nsproxy of the service takes them
/// ([`from_fd_store`](super::from_fd_store)). Returns how many were stored.
pub async fn store(
    sockets: &crate::lifecycle::Handover,
    metrics: Option<(SocketAddr, std::os::fd::BorrowedFd<'_>)>,
    max: usize,
) -> io::Result<usize> {
    let listening = sockets.listening().await;
    let mut named: Vec<(String, std::os::fd::BorrowedFd<'_>)> = listening
        .iter()
        .filter_map(|(h, fd)| Some((fd_name(h)?, fd.as_fd())))
        .collect();
    if let Some((local, fd)) = metrics {
        named.push((fd_name(&Handed::Metrics { local }).expect("named"), fd));
    }
    if named.len() > max {
        warn!(
            "{} listening sockets, and systemd's fd store keeps at most {max} (FileDescriptorStoreMax=): only the first {max} stay open across the restart",
            named.len()
        );
        named.truncate(max);
    }
    crate::systemd::store_fds(&named)
}

/// The fd store's name of a handed socket (`FDNAME=`: at most 255
/// characters, no `:`): `b_PROTOCOL_NSDEV_NSINO_IP_PORT` with the rule's
/// listen address (an IPv6 address's `:` as `-`), or `metrics_IP_PORT`.
/// The control socket is not stored: `RuntimeDirectory=` removes its file
/// when the service stops.
pub fn fd_name(h: &Handed) -> Option<String> {
    let addr = |a: &SocketAddr| format!("{}_{}", a.ip().to_string().replace(':', "-"), a.port());
    match h {
        Handed::Binding {
            protocol,
            ns_dev,
            ns_ino,
            listen,
            ..
        } => Some(format!("b_{protocol}_{ns_dev}_{ns_ino}_{}", addr(listen))),
        Handed::Metrics { local } => Some(format!("metrics_{}", addr(local))),
        Handed::Control { .. } => None,
    }
}

/// The socket an fd store name describes ([`fd_name`]).
pub fn parse_fd_name(name: &str) -> Option<Handed> {
    let parts: Vec<&str> = name.split('_').collect();
    let addr = |ip: &str, port: &str| -> Option<SocketAddr> {
        Some(SocketAddr::new(
            ip.replace('-', ":").parse().ok()?,
            port.parse().ok()?,
        ))
    };
    match parts.as_slice() {
        ["b", protocol, dev, ino, ip, port] => {
            let listen = addr(ip, port)?;
            Some(Handed::Binding {
                rule: String::new(),
                netns: format!("namespace {dev}:{ino}"),
                ns_dev: dev.parse().ok()?,
                ns_ino: ino.parse().ok()?,
                protocol: (*protocol).to_owned(),
                listen,
                local: listen,
            })
        }
        ["metrics", ip, port] => Some(Handed::Metrics {
            local: addr(ip, port)?,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_fd_store_name_reads_back_as_the_socket_it_names() {
        for listen in ["127.0.0.1:80", "[::]:8000", "[fe80::1]:0"] {
            let h = Handed::Binding {
                rule: "web".into(),
                netns: "ns1".into(),
                ns_dev: 4,
                ns_ino: 4026532000,
                protocol: "udp".into(),
                listen: listen.parse().unwrap(),
                local: listen.parse().unwrap(),
            };
            let name = fd_name(&h).unwrap();
            assert!(!name.contains(':') && name.len() <= 255, "{name}");
            let Some(Handed::Binding {
                protocol,
                ns_dev,
                ns_ino,
                listen: back,
                ..
            }) = parse_fd_name(&name)
            else {
                panic!("{name} does not parse");
            };
            assert_eq!((protocol.as_str(), ns_dev, ns_ino), ("udp", 4, 4026532000));
            assert_eq!(back, listen.parse().unwrap());
        }
        let m = Handed::Metrics {
            local: "127.0.0.1:9100".parse().unwrap(),
        };
        assert_eq!(fd_name(&m).unwrap(), "metrics_127.0.0.1_9100");
        assert_eq!(parse_fd_name("metrics_127.0.0.1_9100"), Some(m));
        let c = Handed::Control {
            path: "/run/x".into(),
        };
        assert_eq!(fd_name(&c), None);
        assert_eq!(parse_fd_name("stored"), None);
        assert_eq!(parse_fd_name("b_tcp_1_2_notanip_80"), None);
    }
}
