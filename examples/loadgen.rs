//! Load generator and servers for the benchmark harness (`bench/run.sh`).
//!
//! `cargo build --release --example loadgen`, then run every mode under
//! `ip netns exec NS target/release/examples/loadgen MODE ...`: the sockets are created in
//! the namespace of the process, and this program never switches namespaces itself.
//!
//! Modes (every one bounded in time; results are one JSON object on stdout):
//!
//! - `tcp-rr`: new TCP connections per second. Each of `--concurrency` threads loops:
//!   connect, send `--size` bytes, read `--size` bytes back (latency = connect start to last
//!   reply byte), then read until the server closes and close. The server closes first, so
//!   no client port stays in TIME_WAIT.
//! - `tcp-rr-server`: the peer of `tcp-rr`: reads `--size` bytes, writes `--size` bytes, closes.
//! - `udp-flood`: sends `--size`-byte datagrams to `--target` at `--rate` per second (0 = as fast
//!   as possible) for `--duration`.
//! - `udp-server`: `--mode sink` counts datagrams and prints the count once no datagram came for
//!   `--idle` after the first one (or at `--max-time`); `--mode echo` sends each one back.
//! - `tcp-hold`: opens `--conns` TCP connections, exchanges one `--size`-byte message on each
//!   (so that a proxy has set up both legs), prints `{"held": N, ...}`, keeps them open and idle
//!   for `--hold` (with `--bulk`, writes as fast as it can on each instead), then closes them and
//!   prints a summary. The harness measures the proxy between the two lines.
//! - `tcp-hold-server`: the peer of `tcp-hold`: echoes the first read of each connection, then
//!   reads and discards until the client closes (its own memory is not what is measured).
//! - `probe`: one TCP request/reply (or, with `--udp`, one UDP datagram echoed back), retried
//!   until it succeeds or `--within` passes; exit status 0 on success.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
#[command(about = "Load generator for the nsproxy benchmark (run it under `ip netns exec`)")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// New TCP connections per second: connect, request, reply, close.
    TcpRr {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Request and reply size in bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        duration: Duration,
        /// Stop after this many successful connections (0 = no limit).
        #[arg(long, default_value_t = 0)]
        max_conns: u64,
        /// Limit for each connect, read and write.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// The server side of tcp-rr.
    TcpRrServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Exit after this long whatever happens.
        #[arg(long, default_value = "900s", value_parser = parse_duration)]
        max_time: Duration,
    },
    /// Send datagrams at a fixed rate or as fast as possible.
    UdpFlood {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Datagrams per second; 0 = as fast as possible.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        duration: Duration,
        /// Client sockets (flows, each its own source port), sent from in
        /// turn: one datagram each, so that no two in a row share a flow.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=4096))]
        flows: u16,
    },
    /// Count (sink) or echo datagrams.
    UdpServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, value_enum, default_value_t = UdpMode::Sink)]
        mode: UdpMode,
        /// Sink: report and exit once nothing arrived for this long after the first datagram.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        idle: Duration,
        /// Exit after this long whatever happens.
        #[arg(long, default_value = "900s", value_parser = parse_duration)]
        max_time: Duration,
        /// SO_RCVBUF to ask for, in bytes.
        #[arg(long, default_value_t = 4 << 20)]
        rcvbuf: usize,
    },
    /// Open N connections, one exchange each, then hold them (idle, or bulk with --bulk).
    TcpHold {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// How long to keep the connections open after the "held" line.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        hold: Duration,
        /// Write continuously on every connection while holding.
        #[arg(long)]
        bulk: bool,
        /// Limit for the whole opening phase.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// The server side of tcp-hold.
    TcpHoldServer {
        #[arg(long)]
        listen: SocketAddr,
        /// Exit after this long whatever happens.
        #[arg(long, default_value = "900s", value_parser = parse_duration)]
        max_time: Duration,
    },
    /// One request/reply, retried until it works or `--within` passes.
    Probe {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        udp: bool,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        within: Duration,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum UdpMode {
    Sink,
    Echo,
}

/// "5s", "250ms", "2m" or plain seconds ("1.5").
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?}: expected 5s, 250ms, 2m or seconds"))?;
    if !(0.0..=86_400.0).contains(&(v * scale)) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.mode {
        Mode::TcpRr {
            target,
            concurrency,
            size,
            duration,
            max_conns,
            timeout,
        } => tcp_rr(
            target,
            concurrency.clamp(1, 1024),
            size,
            duration,
            max_conns,
            timeout,
        ),
        Mode::TcpRrServer {
            listen,
            size,
            max_time,
        } => tcp_rr_server(listen, size, max_time),
        Mode::UdpFlood {
            target,
            size,
            rate,
            duration,
            flows,
        } => udp_flood(target, size, rate, duration, flows),
        Mode::UdpServer {
            listen,
            mode,
            idle,
            max_time,
            rcvbuf,
        } => udp_server(listen, mode, idle, max_time, rcvbuf),
        Mode::TcpHold {
            target,
            conns,
            size,
            hold,
            bulk,
            timeout,
        } => tcp_hold(
            target,
            conns.clamp(1, 50_000),
            size.clamp(1, 65_536),
            hold,
            bulk,
            timeout,
        ),
        Mode::TcpHoldServer { listen, max_time } => tcp_hold_server(listen, max_time),
        Mode::Probe {
            target,
            udp,
            size,
            within,
        } => probe(target, udp, size, within),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------- tcp-rr

/// One connection: connect, request, reply, wait for the server's FIN. Returns the latency
/// up to the last reply byte.
fn one_exchange(
    target: &SocketAddr,
    req: &[u8],
    reply: &mut [u8],
    timeout: Duration,
) -> std::io::Result<Duration> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(target, timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(req)?;
    s.read_exact(reply)?;
    let latency = start.elapsed();
    // Wait for the server's close so that the server side is the one in TIME_WAIT.
    let mut rest = [0u8; 64];
    loop {
        match s.read(&mut rest) {
            Ok(0) => break,
            Ok(_) => return Err(std::io::Error::other("reply longer than expected")),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(latency)
}

struct RrThread {
    latencies_ns: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

fn tcp_rr(
    target: SocketAddr,
    concurrency: usize,
    size: usize,
    duration: Duration,
    max_conns: u64,
    timeout: Duration,
) -> std::io::Result<ExitCode> {
    let deadline = Instant::now() + duration;
    let per_thread_max = if max_conns == 0 {
        u64::MAX
    } else {
        max_conns.div_ceil(concurrency as u64)
    };
    let start = Instant::now();
    let handles: Vec<_> = (0..concurrency)
        .map(|i| {
            std::thread::Builder::new()
                .name(format!("rr-{i}"))
                .spawn(move || {
                    let req = vec![b'q'; size];
                    let mut reply = vec![0u8; size];
                    let mut t = RrThread {
                        latencies_ns: Vec::with_capacity(1 << 16),
                        errors: 0,
                        first_error: None,
                    };
                    while Instant::now() < deadline
                        && (t.latencies_ns.len() as u64) < per_thread_max
                    {
                        match one_exchange(&target, &req, &mut reply, timeout) {
                            Ok(l) => {
                                if t.latencies_ns.len() < 50_000_000 {
                                    t.latencies_ns.push(l.as_nanos() as u64);
                                }
                            }
                            Err(e) => {
                                t.errors += 1;
                                if t.first_error.is_none() {
                                    t.first_error = Some(e.to_string());
                                }
                                // Do not spin on a refused port.
                                std::thread::sleep(Duration::from_millis(1));
                            }
                        }
                    }
                    t
                })
        })
        .collect::<Result<_, _>>()?;
    let mut all = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for h in handles {
        let t = h
            .join()
            .map_err(|_| std::io::Error::other("a client thread panicked"))?;
        all.extend_from_slice(&t.latencies_ns);
        errors += t.errors;
        first_error = first_error.or(t.first_error);
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        all[i] as f64 / 1000.0
    };
    let out = serde_json::json!({
        "mode": "tcp-rr",
        "target": target.to_string(),
        "concurrency": concurrency,
        "size": size,
        "conns": all.len(),
        "errors": errors,
        "first_error": first_error,
        "duration_s": elapsed,
        "conns_per_s": all.len() as f64 / elapsed,
        "p50_us": pct(0.50),
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "max_us": all.last().map_or(0.0, |&v| v as f64 / 1000.0),
    });
    println!("{out}");
    Ok(if all.is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Accepts on `listen` for up to `max_time`, each connection (TCP_NODELAY
/// set) in a task of its own running `conn`.
fn serve_tcp<F, Fut>(
    name: &str,
    listen: SocketAddr,
    max_time: Duration,
    conn: F,
) -> std::io::Result<ExitCode>
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        eprintln!("loadgen {name}: listening on {listen}");
        let serve = async {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = s.set_nodelay(true);
                tokio::spawn(conn(s));
            }
        };
        let _ = tokio::time::timeout(max_time, serve).await;
        Ok(ExitCode::SUCCESS)
    })
}

fn tcp_rr_server(listen: SocketAddr, size: usize, max_time: Duration) -> std::io::Result<ExitCode> {
    serve_tcp("tcp-rr-server", listen, max_time, move |mut s| async move {
        let mut buf = vec![0u8; size];
        let work = async {
            s.read_exact(&mut buf).await?;
            s.write_all(&buf).await?;
            s.shutdown().await
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), work).await;
    })
}

// ---------------------------------------------------------------- udp

fn udp_socket_for(target: &SocketAddr) -> std::io::Result<UdpSocket> {
    let local: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    UdpSocket::bind(local)
}

fn udp_flood(
    target: SocketAddr,
    size: usize,
    rate: u64,
    duration: Duration,
    flows: u16,
) -> std::io::Result<ExitCode> {
    let socks = (0..flows)
        .map(|_| {
            let s = udp_socket_for(&target)?;
            s.connect(target)?;
            Ok(s)
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let buf = vec![b'u'; size.clamp(1, 65_507)];
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut errors: u64 = 0;
    let mut first_error: Option<String> = None;
    loop {
        let elapsed = start.elapsed();
        if elapsed >= duration {
            break;
        }
        // Send what the schedule owes (all of it at rate 0: 256 per clock check).
        let owed = if rate == 0 {
            256
        } else {
            let due = (elapsed.as_secs_f64() * rate as f64) as u64;
            due.saturating_sub(sent).min(4096)
        };
        if owed == 0 {
            std::thread::sleep(Duration::from_micros(100));
            continue;
        }
        for _ in 0..owed {
            let s = &socks[(sent + errors) as usize % socks.len()];
            match s.send(&buf) {
                Ok(_) => sent += 1,
                Err(e) => {
                    errors += 1;
                    if first_error.is_none() {
                        first_error = Some(e.to_string());
                    }
                    if e.kind() != ErrorKind::WouldBlock && e.kind() != ErrorKind::Interrupted {
                        // e.g. ECONNREFUSED from an ICMP error: do not spin.
                        std::thread::sleep(Duration::from_micros(200));
                        break;
                    }
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let out = serde_json::json!({
        "mode": "udp-flood",
        "target": target.to_string(),
        "size": size,
        "rate": rate,
        "flows": flows,
        "sent": sent,
        "send_errors": errors,
        "first_error": first_error,
        "duration_s": elapsed,
        "sent_pps": sent as f64 / elapsed,
    });
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}

fn udp_server(
    listen: SocketAddr,
    mode: UdpMode,
    idle: Duration,
    max_time: Duration,
    rcvbuf: usize,
) -> std::io::Result<ExitCode> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(listen),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    let _ = sock.set_recv_buffer_size(rcvbuf);
    sock.bind(&listen.into())?;
    let s: UdpSocket = sock.into();
    // Short timeouts so that the idle and max-time limits are checked often.
    s.set_read_timeout(Some(Duration::from_millis(50)))?;
    eprintln!("loadgen udp-server: listening on {listen}");
    println!("{}", serde_json::json!({"listening": listen.to_string()}));
    let _ = std::io::stdout().flush();
    let start = Instant::now();
    let mut buf = vec![0u8; 65_536];
    let mut received: u64 = 0;
    let mut bytes: u64 = 0;
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    while start.elapsed() < max_time {
        match s.recv_from(&mut buf) {
            Ok((n, peer)) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                received += 1;
                bytes += n as u64;
                if mode == UdpMode::Echo {
                    let _ = s.send_to(&buf[..n], peer);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if mode == UdpMode::Sink && first.is_some() && last.elapsed() >= idle {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let span = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    let out = serde_json::json!({
        "mode": "udp-server",
        "received": received,
        "bytes": bytes,
        "first_to_last_s": span,
    });
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------- tcp-hold

fn tcp_hold(
    target: SocketAddr,
    conns: usize,
    size: usize,
    hold: Duration,
    bulk: bool,
    timeout: Duration,
) -> std::io::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let start = Instant::now();
        let mut open = Vec::with_capacity(conns);
        let mut errors = 0u64;
        let mut first_error = None;
        let req = vec![b'h'; size];
        // A few at a time: a burst of thousands of SYNs would overflow the accept backlog.
        for chunk in (0..conns).collect::<Vec<_>>().chunks(64) {
            let opening = chunk.iter().map(|_| async {
                let mut s = tokio::net::TcpStream::connect(target).await?;
                s.set_nodelay(true)?;
                s.write_all(&req).await?;
                let mut reply = vec![0u8; size];
                s.read_exact(&mut reply).await?;
                Ok::<_, std::io::Error>(s)
            });
            let left = timeout.saturating_sub(start.elapsed());
            match tokio::time::timeout(left, futures_join_all(opening)).await {
                Ok(results) => {
                    for r in results {
                        match r {
                            Ok(s) => open.push(s),
                            Err(e) => {
                                errors += 1;
                                first_error.get_or_insert(e.to_string());
                            }
                        }
                    }
                }
                Err(_) => {
                    first_error.get_or_insert("timed out opening".to_string());
                    break;
                }
            }
        }
        let opened_s = start.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({"held": open.len(), "errors": errors, "first_error": first_error, "open_s": opened_s})
        );
        let mut sent = 0u64;
        if bulk {
            let block = vec![0u8; 128 << 10];
            let writers = open.iter_mut().map(|s| {
                let block = &block;
                async move {
                    let mut n = 0u64;
                    let _ = tokio::time::timeout(hold, async {
                        while s.write_all(block).await.is_ok() {
                            n += block.len() as u64;
                        }
                    })
                    .await;
                    n
                }
            });
            sent = futures_join_all(writers).await.into_iter().sum();
        } else {
            tokio::time::sleep(hold).await;
        }
        let held = open.len();
        drop(open);
        println!(
            "{}",
            serde_json::json!({"mode": "tcp-hold", "target": target.to_string(), "conns": held,
                "errors": errors, "bulk": bulk, "bytes_sent": sent,
                "duration_s": start.elapsed().as_secs_f64()})
        );
        Ok(if held == conns {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    })
}

/// Runs the futures concurrently on the current task and returns their outputs in order
/// (what `futures::future::join_all` does, without the dependency).
async fn futures_join_all<F: std::future::Future>(
    futs: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|v| v.expect("every future finished"))
        .collect()
}

fn tcp_hold_server(listen: SocketAddr, max_time: Duration) -> std::io::Result<ExitCode> {
    serve_tcp("tcp-hold-server", listen, max_time, |mut s| async move {
        let mut buf = vec![0u8; 64 << 10];
        let Ok(n) = s.read(&mut buf).await else {
            return;
        };
        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
            return;
        }
        // Discard until the client closes (bulk mode writes here).
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    })
}

// ---------------------------------------------------------------- probe

fn probe(
    target: SocketAddr,
    udp: bool,
    size: usize,
    within: Duration,
) -> std::io::Result<ExitCode> {
    let deadline = Instant::now() + within;
    let req = vec![b'p'; size.clamp(1, 65_507)];
    let mut last_err;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let t = left.clamp(Duration::from_millis(50), Duration::from_millis(500));
        let r = if udp {
            probe_udp(&target, &req, t)
        } else {
            let mut reply = vec![0u8; req.len()];
            one_exchange(&target, &req, &mut reply, t).map(|_| ())
        };
        match r {
            Ok(()) => {
                println!(
                    "{}",
                    serde_json::json!({"probe": "ok", "target": target.to_string(), "attempts": attempts})
                );
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) => last_err = e.to_string(),
        }
        if Instant::now() >= deadline {
            break;
        }
        // Short: start-up is timed by the first probe that answers, and a
        // refused connect costs microseconds.
        std::thread::sleep(Duration::from_millis(2));
    }
    println!(
        "{}",
        serde_json::json!({"probe": "failed", "target": target.to_string(), "attempts": attempts, "error": last_err})
    );
    Ok(ExitCode::from(1))
}

fn probe_udp(target: &SocketAddr, req: &[u8], timeout: Duration) -> std::io::Result<()> {
    let s = udp_socket_for(target)?;
    s.connect(target)?;
    s.set_read_timeout(Some(timeout))?;
    s.send(req)?;
    let mut buf = vec![0u8; 65_536];
    let n = s.recv(&mut buf)?;
    if n == req.len() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "echo of {} bytes came back as {n}",
            req.len()
        )))
    }
}
