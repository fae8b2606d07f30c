//! Property tests of the protocol's encoding and decoding.
use super::*;
use proptest::prelude::*;

fn ns() -> impl Strategy<Value = Ns> {
    (any::<u64>(), any::<u64>()).prop_map(|(dev, ino)| Ns { dev, ino })
}

fn spec() -> impl Strategy<Value = Spec> {
    (any::<i32>(), any::<i32>(), any::<i32>(), any::<bool>()).prop_map(
        |(domain, ty, protocol, transparent)| Spec {
            domain,
            ty,
            protocol,
            transparent,
        },
    )
}

pub(crate) fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        prop::collection::vec(".{0,40}", 0..8).prop_map(|refs| Op::Resolve { refs }),
        (ns(), spec()).prop_map(|(ns, spec)| Op::Socket { ns, spec }),
        (ns(), spec(), 0..=MAX_REFILL).prop_map(|(ns, spec, n)| Op::Refill { ns, spec, n }),
        prop::collection::vec((ns(), spec()), 0..=MAX_REFILL as usize)
            .prop_map(|items| Op::Sockets { items }),
        prop::collection::vec(ns(), 0..16).prop_map(|ns| Op::Release { ns }),
        prop::collection::vec(any::<SocketAddr>(), 0..4).prop_map(|mut addrs| {
            // Text form: an IPv6 address's flow label is not part of it
            // (nor of any address a config names); its scope id is
            // (`[fe80::1%2]:80`), so link-local binds keep their interface.
            for a in &mut addrs {
                if let SocketAddr::V6(v6) = a {
                    v6.set_flowinfo(0);
                }
            }
            Op::Bind { addrs }
        }),
        Just(Op::ReadConfig),
    ]
}

fn wire_io() -> impl Strategy<Value = WireIo> {
    (prop::option::of(1..200i32), ".{0,30}").prop_map(|(errno, message)| WireIo { errno, message })
}

fn error() -> impl Strategy<Value = WireError> {
    prop_oneof![
        (".{0,20}", ".{0,20}")
            .prop_map(|(reference, path)| WireError::NotFound { reference, path }),
        (".{0,20}", ".{0,20}", wire_io()).prop_map(|(reference, path, error)| {
            WireError::CannotEnter {
                reference,
                path,
                error,
            }
        }),
        (ns(), wire_io()).prop_map(|(ns, error)| WireError::Socket { ns, error }),
        ".{0,40}".prop_map(|reason| WireError::Refused { reason }),
        wire_io().prop_map(WireError::Io),
        Just(WireError::Stopped),
    ]
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        prop::collection::vec(prop::result::maybe_ok(ns(), error()), 0..6)
            .prop_map(Outcome::Resolved),
        Just(Outcome::Socket),
        (0..=MAX_REFILL, prop::option::of(error()))
            .prop_map(|(made, error)| Outcome::Refilled { made, error }),
        prop::collection::vec(prop::option::of(error()), 0..8).prop_map(Outcome::Sockets),
        Just(Outcome::Released),
        Just(Outcome::Bound),
        any::<u64>().prop_map(|len| Outcome::Config { len }),
        error().prop_map(Outcome::Failed),
    ]
}

proptest! {
    #[test]
    fn requests_round_trip(id in any::<u64>(), op in op()) {
        let r = Request { id, op };
        let b = encode_request(&r).unwrap();
        prop_assert_eq!(decode_request(&b).unwrap(), r);
        prop_assert_eq!(salvage_id(&b), id);
    }

    #[test]
    fn replies_round_trip(id in any::<u64>(), outcome in outcome()) {
        let r = Reply { id, outcome };
        let b = encode_reply(&r).unwrap();
        prop_assert_eq!(decode_reply(&b).unwrap(), r);
    }

    #[test]
    fn decoding_any_bytes_never_panics(b in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_request(&b);
        let _ = decode_reply(&b);
        let _ = salvage_id(&b);
    }

    #[test]
    fn decoding_near_valid_text_never_panics(id in any::<u64>(), op in op(), cut in any::<prop::sample::Index>(), flip in any::<u8>()) {
        let mut b = encode_request(&Request { id, op }).unwrap();
        let i = cut.index(b.len());
        b[i] ^= flip;
        let _ = decode_request(&b);
        b.truncate(i);
        let _ = decode_request(&b);
    }

    #[test]
    fn errors_keep_their_variant_and_errno(e in error()) {
        let before = format!("{:?}", std::mem::discriminant(&e));
        let back = WireError::from(&e.clone().into_ns_error());
        // Io travels as a refusal; every other variant comes back as itself.
        if !matches!(e, WireError::Io(_)) {
            prop_assert_eq!(format!("{:?}", std::mem::discriminant(&back)), before);
        }
        if let (WireError::Socket { error: a, .. }, WireError::Socket { error: b, .. }) = (&e, &back) {
            prop_assert_eq!(a.errno, b.errno);
        }
    }

}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn resolve_chunks_cover_everything_and_fit(refs in prop::collection::vec("[a-z0-9/\u{1}-\u{1f}]{1,300}", 0..600)) {
        let chunks = resolve_chunks(&refs);
        let mut next = 0;
        for c in &chunks {
            prop_assert_eq!(c.start, next);
            prop_assert!(c.end > c.start);
            next = c.end;
            let req = Request { id: u64::MAX, op: Op::Resolve { refs: refs[c.clone()].to_vec() } };
            prop_assert!(encode_request(&req).is_ok());
            let worst = Reply { id: u64::MAX, outcome: Outcome::Resolved(refs[c.clone()].iter().map(|r| Err(WireError::Open {
                reference: r.clone(),
                path: format!("/run/netns/{r}"),
                error: WireIo { errno: Some(24), message: "Too many open files (os error 24)".into() },
            })).collect()) };
            prop_assert!(encode_reply(&worst).is_ok());
        }
        prop_assert_eq!(next, refs.len());
    }
}

#[test]
fn an_oversized_message_is_refused_before_parsing() {
    let b = vec![b' '; MAX_MESSAGE + 1];
    assert_eq!(decode_request(&b), Err(WireFault::TooLong(MAX_MESSAGE + 1)));
    let huge = Request {
        id: 1,
        op: Op::Resolve {
            refs: vec!["x".repeat(MAX_MESSAGE)],
        },
    };
    assert!(matches!(encode_request(&huge), Err(WireFault::TooLong(_))));
}

#[test]
fn specs_and_namespaces_convert_both_ways() {
    let addr: SocketAddr = "[::1]:80".parse().unwrap();
    for s in [
        SocketSpec::tcp(&addr),
        SocketSpec::udp(&addr),
        SocketSpec::sctp(&addr),
    ] {
        assert_eq!(SocketSpec::from(Spec::from(s)), s);
    }
    let id = NsId { dev: 4, ino: 9 };
    assert_eq!(NsId::from(Ns::from(id)), id);
}

#[test]
fn the_largest_release_fits_in_one_message() {
    let worst = Request {
        id: u64::MAX,
        op: Op::Release {
            ns: vec![
                Ns {
                    dev: u64::MAX,
                    ino: u64::MAX,
                };
                MAX_RELEASE
            ],
        },
    };
    let bytes = encode_request(&worst).expect("within MAX_MESSAGE");
    assert_eq!(decode_request(&bytes).unwrap(), worst);
}
