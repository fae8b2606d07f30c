//! Local sockets only: AF_UNIX datagram pairs (the kernel reports
//! truncation on them the same way, Linux 3.4 and later) and UDP on
//! this namespace's loopback, port 0.

use std::net::UdpSocket;
use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;

use super::*;

#[test]
fn truncation_is_reported_per_datagram_with_the_real_length() {
    let (a, b) = UnixDatagram::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    a.send(&[7u8; 100]).unwrap();
    a.send(&[8u8; 10]).unwrap();
    a.send(&[9u8; 17]).unwrap();
    a.send(&[]).unwrap();
    let mut batch = RecvBatch::new(16);
    assert_eq!(batch.recv(b.as_fd(), false).unwrap(), 4);
    let (m, data) = batch.get(0);
    assert!(m.truncated);
    assert_eq!((m.len, data), (100, &[7u8; 16][..]));
    // Boundaries stay: the next slot holds the next datagram, whole.
    let (m, data) = batch.get(1);
    assert!(!m.truncated);
    assert_eq!((m.len, data), (10, &[8u8; 10][..]));
    let (m, _) = batch.get(2);
    assert!(m.truncated, "one byte too long is too long");
    assert_eq!(m.len, 17);
    // Empty datagrams are datagrams.
    let (m, data) = batch.get(3);
    assert!(!m.truncated && m.len == 0 && data.is_empty());
    assert!(m.peer.is_none(), "asked for no addresses");
    let e = batch.recv(b.as_fd(), false).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
}

#[test]
fn a_batch_is_at_most_batch_datagrams_and_keeps_their_order() {
    let (a, b) = UnixDatagram::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    for i in 0..BATCH + 5 {
        a.send(&[i as u8; 3]).unwrap();
    }
    let mut batch = RecvBatch::new(64);
    assert_eq!(batch.recv(b.as_fd(), false).unwrap(), BATCH);
    for i in 0..BATCH {
        assert_eq!(batch.get(i).1, &[i as u8; 3]);
    }
    assert_eq!(batch.recv(b.as_fd(), false).unwrap(), 5);
    assert_eq!(batch.get(4).1, &[BATCH as u8 + 4; 3]);
}

/// A non-blocking UDP socket on 127.0.0.1 with packet info on.
fn listener() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_nonblocking(true).unwrap();
    enable_pktinfo(s.as_fd(), false, false).unwrap();
    s
}

#[test]
fn each_datagram_of_a_batch_has_its_sender_and_destination() {
    let l = listener();
    let to = l.local_addr().unwrap();
    let (c1, c2) = (
        UdpSocket::bind("127.0.0.1:0").unwrap(),
        UdpSocket::bind("127.0.0.1:0").unwrap(),
    );
    c1.send_to(b"one", to).unwrap();
    c2.send_to(b"two", to).unwrap();
    c1.send_to(b"three", to).unwrap();
    let mut batch = RecvBatch::new(2048);
    assert_eq!(batch.recv(l.as_fd(), true).unwrap(), 3);
    let here = ReplyFrom {
        ip: "127.0.0.1".parse().unwrap(),
        ifindex: 1,
    };
    for (i, (from, data)) in [(&c1, b"one" as &[u8]), (&c2, b"two"), (&c1, b"three")]
        .into_iter()
        .enumerate()
    {
        let (m, got) = batch.get(i);
        assert_eq!(got, data);
        assert_eq!(m.peer, Some(from.local_addr().unwrap()));
        assert_eq!(m.reply_from, Some(here));
        assert_eq!(m.kernel_drops, None);
    }
}

/// Sends `sizes` (each datagram filled with its index) from `l` to a
/// new socket on 127.0.0.1 from l's address, and checks what arrives.
fn send_and_check(l: &UdpSocket, sizes: &[usize], gso: &Gso) -> Sent {
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let datagrams: Vec<Vec<u8>> = (0..).zip(sizes).map(|(i, &n)| vec![i; n]).collect();
    let from = ReplyFrom {
        ip: "127.0.0.1".parse().unwrap(),
        ifindex: 0,
    };
    let to = Some(c.local_addr().unwrap());
    let sent = send_batch(
        l.as_fd(),
        datagrams.iter().map(Vec::as_slice),
        to,
        Some(from),
        false,
        gso,
    )
    .unwrap();
    let mut buf = [0u8; 65_536];
    for d in &datagrams[..sent.count] {
        let (n, source) = c.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &d[..], "{sizes:?}");
        assert_eq!(source, l.local_addr().unwrap());
    }
    c.set_nonblocking(true).unwrap();
    assert!(c.recv(&mut buf).is_err(), "nothing more, nothing split");
    sent
}

#[test]
fn a_batch_goes_out_whole_in_order_from_the_given_address() {
    let l = listener();
    let all = |count| Sent {
        count,
        stopped: false,
    };
    for gso in [Gso::off(), Gso::new()] {
        let sizes = [0, 1, 64, 1500, 9000];
        assert_eq!(send_and_check(&l, &sizes, &gso), all(5));
        // Only the first BATCH of a longer list.
        assert_eq!(send_and_check(&l, &[1; BATCH + 3], &gso), all(BATCH));
    }
}

#[test]
fn runs_of_one_size_go_as_one_segmented_send_and_arrive_as_they_were() {
    let l = listener();
    let gso = Gso::new();
    let mut sizes = vec![100; 10];
    sizes.push(37);
    // One run, the last one shorter: all of it in one send.
    let sent = send_and_check(&l, &sizes, &gso);
    assert_eq!((sent.count, sent.stopped), (11, false));
    // A run, then others: the run goes first; the rest is for the
    // next call, not a failure.
    let sent = send_and_check(&l, &[500, 500, 500, 700, 1], &gso);
    assert_eq!((sent.count, sent.stopped), (3, false));
    assert_eq!(gso.limit(), GSO_MAX_BYTES, "nothing refused");
}

#[test]
fn a_run_is_cut_where_segmenting_would_change_it() {
    let run = |sizes: &[usize], limit| {
        let iovs: Vec<libc::iovec> = sizes
            .iter()
            .map(|&n| libc::iovec {
                iov_base: ptr::null_mut(),
                iov_len: n,
            })
            .collect();
        gso_run(&iovs, limit)
    };
    assert_eq!(run(&[100, 100, 100, 37], 65_507), Some((100, 4)));
    assert_eq!(run(&[100, 100, 37, 37], 65_507), Some((100, 3)));
    assert_eq!(run(&[100, 100, 150], 65_507), Some((100, 2)));
    // An empty datagram would vanish; a single one needs no segments.
    assert_eq!(run(&[100, 100, 0], 65_507), Some((100, 2)));
    assert_eq!(run(&[100, 0], 65_507), None);
    assert_eq!(run(&[0, 0], 65_507), None);
    assert_eq!(run(&[100], 65_507), None);
    assert_eq!(run(&[100, 200], 65_507), None);
    // Above what the route takes, or more than one send may carry.
    assert_eq!(run(&[100, 100], 99), None);
    assert_eq!(run(&[2048; BATCH], 65_507), Some((2048, 31)));
    assert_eq!(run(&[40_000, 40_000], 65_507), None);
}

#[test]
fn segments_too_large_for_the_route_go_one_by_one_and_the_limit_is_learnt() {
    // IPV6_MTU lowers this socket's MTU below loopback's, as a route
    // with a small MTU would.
    let Ok(l) = UdpSocket::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback: skipped");
        return;
    };
    setsockopt_int(l.as_fd(), libc::IPPROTO_IPV6, libc::IPV6_MTU, 1280).unwrap();
    let c = UdpSocket::bind("[::1]:0").unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let to = Some(c.local_addr().unwrap());
    let gso = Gso::new();
    let mut buf = [0u8; 2048];
    for (size, limit) in [(1400, 1399), (1000, 1399)] {
        let datagrams = vec![vec![7u8; size]; 4];
        let sent = send_batch(
            l.as_fd(),
            datagrams.iter().map(Vec::as_slice),
            to,
            None,
            true,
            &gso,
        )
        .unwrap();
        assert_eq!((sent.count, sent.stopped), (4, false));
        assert_eq!(gso.limit(), limit, "{size}-byte segments");
        for _ in 0..4 {
            assert_eq!(c.recv(&mut buf).unwrap(), size);
        }
    }
}

#[test]
fn a_full_receive_buffer_is_reported_with_the_next_datagram() {
    let l = listener();
    enable_drop_count(l.as_fd()).unwrap();
    socket2::SockRef::from(&l)
        .set_recv_buffer_size(4096)
        .unwrap();
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..200 {
        c.send_to(&[0u8; 1000], l.local_addr().unwrap()).unwrap();
    }
    let mut batch = RecvBatch::new(2048);
    let n = batch.recv(l.as_fd(), true).unwrap();
    assert!(n < BATCH, "{n} datagrams fit a 4 KiB buffer?");
    // These were queued before the buffer was full.
    assert_eq!(batch.get(0).0.kernel_drops, None);
    // The count comes with the next datagram that gets in.
    c.send_to(b"after", l.local_addr().unwrap()).unwrap();
    assert_eq!(batch.recv(l.as_fd(), true).unwrap(), 1);
    let (m, data) = batch.get(0);
    assert_eq!(data, b"after");
    assert_eq!(m.kernel_drops, Some(200 - n as u32), "{m:?}");
}

#[test]
fn pktinfo_payloads_have_the_kernel_layout() {
    let from = |ip: &str| ReplyFrom {
        ip: ip.parse().unwrap(),
        ifindex: 3,
    };
    let p = Pktinfo::new(from("127.0.0.2"), false);
    assert_eq!(
        (p.level, p.kind, p.len),
        (libc::IPPROTO_IP, libc::IP_PKTINFO, 12)
    );
    // ifindex 0, spec_dst 127.0.0.2, addr 0
    assert_eq!(p.as_slice(), [0, 0, 0, 0, 127, 0, 0, 2, 0, 0, 0, 0]);
    let p = Pktinfo::new(from("127.0.0.2"), true);
    assert_eq!(
        (p.level, p.kind, p.len),
        (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, 20)
    );
    assert_eq!(
        &p.as_slice()[..16],
        &Ipv4Addr::new(127, 0, 0, 2).to_ipv6_mapped().octets()
    );
    assert_eq!(
        &p.as_slice()[16..],
        &[0, 0, 0, 0],
        "no interface for a global address"
    );
    let p = Pktinfo::new(from("fe80::1"), true);
    assert_eq!(
        &p.as_slice()[16..],
        &3u32.to_ne_bytes(),
        "link-local needs its interface"
    );
}

#[test]
fn multicast_and_broadcast_are_never_sources() {
    for ip in ["224.0.0.1", "255.255.255.255", "0.0.0.0", "ff02::1", "::"] {
        assert!(!can_be_source(ip.parse().unwrap()), "{ip}");
    }
    for ip in ["127.0.0.2", "10.1.2.3", "::1", "fe80::1"] {
        assert!(can_be_source(ip.parse().unwrap()), "{ip}");
    }
}
