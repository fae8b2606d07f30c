//! Property-test strategies both config front ends' tests draw from.

use std::net::IpAddr;

use proptest::prelude::*;

use crate::netns::NsRef;

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
