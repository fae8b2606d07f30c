//! Property-test strategies both config front ends' tests and the
//! settings' tests draw from.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use proptest::prelude::*;

use super::{
    ConnSettings, Keepalive, MAX_CONNECTIONS, MAX_UDP_SESSIONS, OnDelete, Protocol, ProxyProtocol,
    Rule, SctpSettings, Settings, TcpSettings, UdpSettings, UpstreamSource,
    check_sctp_listen_addrs,
};
use crate::netns::NsRef;
use crate::sctp::Streams;

/// A namespace reference of every form; with `glob`, patterns too.
pub(super) fn ns_ref(glob: bool) -> BoxedStrategy<NsRef> {
    let name = "[a-z0-9._-]{1,10}".prop_filter("not a reserved form", |n| {
        n != "host" && n != "." && n != ".."
    });
    let exact = prop_oneof![
        Just(NsRef::Host),
        name.prop_map(NsRef::Named),
        "(/[a-z0-9._-]{1,6}){1,3}".prop_map(|p| NsRef::Path(p.into())),
        (1u32..).prop_map(NsRef::Pid),
    ];
    if glob {
        prop_oneof![
            4 => exact,
            1 => "[a-z-]{0,4}\\*[a-z-]{0,4}".prop_map(NsRef::Glob),
            1 => "(/[a-z0-9*._-]{1,6}){0,2}/[a-z-]{0,3}\\*[a-z-]{0,3}".prop_map(NsRef::Glob),
        ]
        .boxed()
    } else {
        exact.boxed()
    }
}

/// Any IPv4 or IPv6 address.
pub(super) fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<std::net::Ipv4Addr>().prop_map(IpAddr::V4),
        any::<std::net::Ipv6Addr>().prop_map(IpAddr::V6),
    ]
}

/// A whole number of seconds from 1 s to a day: what every duration key
/// takes, written back exactly as `"Ns"`.
pub(super) fn seconds() -> impl Strategy<Value = Duration> {
    (1u64..=86_400).prop_map(Duration::from_secs)
}

/// One unicast address, as the SCTP address lists take.
pub(super) fn unicast() -> impl Strategy<Value = IpAddr> {
    ip().prop_filter("one unicast address", |a| {
        !a.is_unspecified() && !a.is_multicast()
    })
}

pub(super) fn protocol() -> impl Strategy<Value = Protocol> {
    prop::sample::select(Protocol::ALL.to_vec())
}

fn conn() -> impl Strategy<Value = ConnSettings> {
    (
        seconds(),
        1u32..=65_535,
        prop::option::of(1usize..=MAX_CONNECTIONS),
        prop::option::of(seconds()),
    )
        .prop_map(
            |(connect_timeout, backlog, max_connections, idle_timeout)| ConnSettings {
                connect_timeout,
                backlog,
                max_connections,
                idle_timeout,
            },
        )
}

fn tcp() -> impl Strategy<Value = TcpSettings> {
    // The kernel's limits for the keepalive times and count.
    let keepalive =
        (1u64..=32_767, 1u64..=32_767, 1u32..=127).prop_map(|(i, n, count)| Keepalive {
            idle: Duration::from_secs(i),
            interval: Duration::from_secs(n),
            count,
        });
    (
        prop::option::of(prop_oneof![
            Just(ProxyProtocol::V1),
            Just(ProxyProtocol::V2)
        ]),
        prop::option::of(seconds()),
        prop::option::of(keepalive),
        source(),
    )
        .prop_map(
            |(proxy_protocol, half_close_timeout, tcp_keepalive, upstream_source)| TcpSettings {
                proxy_protocol,
                half_close_timeout,
                tcp_keepalive,
                upstream_source,
            },
        )
}

fn udp() -> impl Strategy<Value = UdpSettings> {
    (seconds(), 1usize..=MAX_UDP_SESSIONS, source()).prop_map(
        |(udp_idle_timeout, udp_max_sessions, upstream_source)| UdpSettings {
            udp_idle_timeout,
            udp_max_sessions,
            upstream_source,
        },
    )
}

fn source() -> impl Strategy<Value = UpstreamSource> {
    prop_oneof![Just(UpstreamSource::Proxy), Just(UpstreamSource::Client)]
}

fn sctp() -> impl Strategy<Value = SctpSettings> {
    let addrs =
        || prop::collection::btree_set(unicast(), 0..3).prop_map(|s| s.into_iter().collect());
    ((1u16.., 1u16..), addrs(), addrs(), addrs()).prop_map(|((i, o), l, u, s)| SctpSettings {
        sctp_streams: Streams {
            outbound: o,
            max_inbound: i,
        },
        sctp_listen_addrs: l,
        sctp_upstream_addrs: u,
        sctp_source_addrs: s,
    })
}

/// Any valid settings of `protocol`.
pub(super) fn settings(protocol: Protocol) -> BoxedStrategy<Settings> {
    match protocol {
        Protocol::Tcp => (conn(), tcp())
            .prop_map(|(conn, tcp)| Settings::Tcp { conn, tcp })
            .boxed(),
        Protocol::Udp => udp().prop_map(Settings::Udp).boxed(),
        Protocol::Sctp => (conn(), sctp())
            .prop_map(|(conn, sctp)| Settings::Sctp { conn, sctp })
            .boxed(),
    }
}

/// Any rule both front ends could produce but for its name, listen port
/// and origin (empty here; the test sets them): namespaces listed once,
/// an upstream that can be connected to, SCTP listen addresses that fit
/// `listen` (dropped when they would not).
pub(super) fn rule() -> impl Strategy<Value = Rule> {
    (
        protocol().prop_flat_map(settings),
        ip(),
        prop::collection::vec(ns_ref(true), 1..6),
        (unicast(), 1u16..),
        ns_ref(false),
        prop_oneof![Just(OnDelete::Close), Just(OnDelete::Drain)],
    )
        .prop_map(
            |(settings, listen_ip, netns, (up_ip, up_port), upstream_netns, on_delete)| {
                let mut seen = std::collections::HashSet::new();
                let netns = netns
                    .into_iter()
                    .filter(|r| seen.insert(r.clone()))
                    .collect();
                let listen = SocketAddr::new(listen_ip, 1);
                let upstream = SocketAddr::new(up_ip, up_port);
                let mut rule = Rule::new(
                    String::new(),
                    listen,
                    netns,
                    upstream,
                    upstream_netns,
                    settings,
                    String::new(),
                );
                rule.on_netns_delete = on_delete;
                if check_sctp_listen_addrs(listen, &rule.sctp_listen_addrs).is_err() {
                    rule.sctp_listen_addrs.clear();
                }
                rule
            },
        )
}
