//! UDP forwarding rate through nsproxy: datagrams per second and nsproxy's
//! CPU, the measurement behind the README's UDP batching figures.
//!
//! ```text
//! cargo build --release --bin nsproxy --example udp_pps
//! target/release/examples/udp_pps bench --nsproxy target/release/nsproxy
//! ```
//!
//! `bench` (as root) makes three namespaces (`udppps-PID-{h,c,u}`: nsproxy's
//! home, the clients' and the upstream's), starts nsproxy in the first with
//! one UDP rule from `c` to `u`, and then, `--runs` times: a sink (or echo
//! server) in `u`, and a flood of `--size`-byte datagrams from `--clients`
//! sockets in `c` (so as many sessions) for `--seconds`, at `--rate` per
//! second or as fast as one thread can send. It reports per run, and the
//! median over runs:
//!
//! - `sink_pps`: datagrams that reached the upstream, per second of flood;
//! - `reply_pps` (with `--echo`): replies that reached the clients;
//! - `cpu`: nsproxy's CPU time over the flood's wall time (1.0 = one core);
//! - `cpu_us_per_dgram`: nsproxy's CPU time per datagram it moved (each way).
//!
//! The other modes are the pieces `bench` runs in the namespaces (through
//! `ip netns exec`, so nothing here switches namespaces itself). Everything
//! it makes is removed when it ends, also when a run fails.

use std::io::{BufRead, BufReader, ErrorKind};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "UDP datagrams per second through nsproxy, and its CPU (as root)")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// The whole measurement: namespaces, nsproxy, sink, flood.
    Bench {
        /// The nsproxy binary to measure.
        #[arg(long)]
        nsproxy: PathBuf,
        #[arg(long, default_value_t = 1)]
        clients: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Datagrams per second over all clients; 0 = as fast as possible.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// The upstream echoes, and the clients count the replies.
        #[arg(long)]
        echo: bool,
        /// nsproxy's worker threads.
        #[arg(long, default_value_t = 2)]
        workers: usize,
    },
    /// Counts (or echoes) datagrams on `listen` until none came for 1 s.
    Sink {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        echo: bool,
    },
    /// Sends from `clients` connected sockets for `seconds`, counting replies.
    Flood {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        clients: usize,
        #[arg(long)]
        size: usize,
        #[arg(long)]
        seconds: f64,
        #[arg(long)]
        rate: u64,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().mode {
        Mode::Bench {
            nsproxy,
            clients,
            size,
            seconds,
            rate,
            runs,
            echo,
            workers,
        } => bench(&Setup {
            nsproxy,
            clients: clients.clamp(1, 10_000),
            size: size.min(65_507),
            seconds,
            rate,
            runs: runs.max(1),
            echo,
            workers,
        }),
        Mode::Sink { listen, echo } => sink(listen, echo),
        Mode::Flood {
            target,
            clients,
            size,
            seconds,
            rate,
        } => flood(target, clients, size, seconds, rate),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("udp_pps: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Setup {
    nsproxy: PathBuf,
    clients: usize,
    size: usize,
    seconds: f64,
    rate: u64,
    runs: usize,
    echo: bool,
    workers: usize,
}

const LISTEN: &str = "127.0.0.1:7000";
const UPSTREAM: &str = "127.0.0.1:9000";

/// A namespace made here; deleted on drop.
struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Result<Ns> {
        let name = format!("udppps-{}-{tag}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        let ns = Ns(name);
        run("ip", &["-n", &ns.0, "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.0]);
    }
}

/// A child process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd).args(args).stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into())
    }
}

/// This program, started inside `ns` with `args`, its stdout piped.
fn me_in(ns: &Ns, args: &[String]) -> Result<Proc> {
    let me = std::env::current_exe()?;
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(me)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    Ok(Proc(child))
}

/// The next line the child prints, as `key=value` pairs.
fn line_of(p: &mut Proc) -> Result<Vec<(String, f64)>> {
    let out = p.0.stdout.as_mut().ok_or("no stdout")?;
    let mut line = String::new();
    // One byte at a time, so that nothing after the line is swallowed.
    let mut r = BufReader::with_capacity(1, out);
    r.read_line(&mut line)?;
    Ok(line
        .split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect())
}

fn get(kv: &[(String, f64)], key: &str) -> Result<f64> {
    kv.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| *v)
        .ok_or_else(|| format!("no {key} in the child's report").into())
}

/// The binding's counters, from `nsproxy status --json`.
fn counters(nsproxy: &PathBuf, control: &PathBuf) -> Result<serde_json::Value> {
    let out = Command::new(nsproxy)
        .args(["status", "--json", "--control-socket"])
        .arg(control)
        .stdin(Stdio::null())
        .output()?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    fn find(v: &serde_json::Value) -> Option<&serde_json::Value> {
        match v {
            serde_json::Value::Object(m) => m.get("counters").or_else(|| m.values().find_map(find)),
            serde_json::Value::Array(a) => a.iter().find_map(find),
            _ => None,
        }
    }
    find(&status)
        .cloned()
        .ok_or_else(|| "no counters in nsproxy status --json".into())
}

/// Counter `key` of `after` minus that of `before`.
fn delta(before: &serde_json::Value, after: &serde_json::Value, key: &str) -> u64 {
    let get = |v: &serde_json::Value| v.get(key).and_then(serde_json::Value::as_u64);
    get(after)
        .unwrap_or(0)
        .saturating_sub(get(before).unwrap_or(0))
}

/// utime + stime of process `pid` in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').ok_or("bad stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // USER_HZ is 100 on every Linux architecture nsproxy runs on.
    Ok(ticks / 100.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn bench(s: &Setup) -> Result<()> {
    let (home, clients, upstream) = (Ns::new("h")?, Ns::new("c")?, Ns::new("u")?);
    let dir = std::env::temp_dir().join(format!("udppps-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("nsproxy.toml");
    std::fs::write(
        &config,
        format!(
            "workers = {}\n[[proxy]]\nname = \"pps\"\nprotocol = \"udp\"\nlisten = \"{LISTEN}\"\nnetns = [\"{}\"]\nupstream = \"{UPSTREAM}\"\nupstream_netns = \"{}\"\nudp_idle_timeout = \"3s\"\n",
            s.workers, clients.0, upstream.0
        ),
    )?;
    let log = dir.join("nsproxy.log");
    let control = dir.join("control.sock");
    let nsproxy = Proc(
        Command::new("ip")
            .args(["netns", "exec", &home.0])
            .arg(&s.nsproxy)
            .args(["--log-format", "json", "run", "--config"])
            .arg(&config)
            .arg("--control-socket")
            .arg(&control)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log)?.contains("\"ready: ") {
        if Instant::now() > deadline {
            return Err("nsproxy did not get ready within 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = nsproxy.0.id();
    println!(
        "nsproxy {} ({} workers): {} client(s), {}-byte datagrams, {} s per run, rate {}{}",
        s.nsproxy.display(),
        s.workers,
        s.clients,
        s.size,
        s.seconds,
        if s.rate == 0 {
            "max".to_owned()
        } else {
            s.rate.to_string()
        },
        if s.echo { ", echoed" } else { "" },
    );
    let (mut sink_pps, mut reply_pps, mut cpu, mut per) = (vec![], vec![], vec![], vec![]);
    for r in 1..=s.runs {
        let mut args = vec!["sink".into(), "--listen".into(), UPSTREAM.into()];
        if s.echo {
            args.push("--echo".into());
        }
        let mut sink = me_in(&upstream, &args)?;
        line_of(&mut sink)?; // bound
        let counted = counters(&s.nsproxy, &control)?;
        let before = cpu_seconds(pid)?;
        let started = Instant::now();
        let mut flood = me_in(
            &clients,
            &[
                "flood".into(),
                "--target".into(),
                LISTEN.into(),
                "--clients".into(),
                s.clients.to_string(),
                "--size".into(),
                s.size.to_string(),
                "--seconds".into(),
                s.seconds.to_string(),
                "--rate".into(),
                s.rate.to_string(),
            ],
        )?;
        let sent = line_of(&mut flood)?;
        let wall = started.elapsed().as_secs_f64();
        let used = cpu_seconds(pid)? - before;
        let got = line_of(&mut sink)?;
        // Including the backlog nsproxy worked off after the flood ended
        // (the sink waits 1 s for stragglers: nsproxy is idle then).
        let used_all = cpu_seconds(pid)? - before;
        let now = counters(&s.nsproxy, &control)?;
        let (flood_s, sent_n, replies) = (
            get(&sent, "seconds")?,
            get(&sent, "sent")?,
            get(&sent, "replies")?,
        );
        let received = get(&got, "received")?;
        let moved = received + replies;
        println!(
            "run {r}: sent {:.0}/s, sink {:.0}/s{}, nsproxy cpu {:.2} cores, {:.2} µs per datagram",
            sent_n / flood_s,
            received / flood_s,
            if s.echo {
                format!(", replies {:.0}/s", replies / flood_s)
            } else {
                String::new()
            },
            used / wall,
            used_all * 1e6 / moved.max(1.0),
        );
        let drops: Vec<String> = [
            "dropped_by_kernel",
            "dropped_queue_full",
            "send_errors",
            "truncated",
        ]
        .iter()
        .map(|k| format!("{k} {}", delta(&counted, &now, k)))
        .collect();
        println!(
            "       nsproxy: datagrams_in {}, datagrams_out {}; {}",
            delta(&counted, &now, "datagrams_in"),
            delta(&counted, &now, "datagrams_out"),
            drops.join(", ")
        );
        sink_pps.push(received / flood_s);
        reply_pps.push(replies / flood_s);
        cpu.push(used / wall);
        per.push(used_all * 1e6 / moved.max(1.0));
        if r < s.runs {
            // Let the sessions of this run expire, so that every run
            // starts alike.
            std::thread::sleep(Duration::from_secs(4));
        }
    }
    println!(
        "median of {}: sink {:.0}/s{}, nsproxy cpu {:.2} cores, {:.2} µs per datagram",
        s.runs,
        median(&mut sink_pps),
        if s.echo {
            format!(", replies {:.0}/s", median(&mut reply_pps))
        } else {
            String::new()
        },
        median(&mut cpu),
        median(&mut per),
    );
    // What nsproxy warned about (drops it counted), so that a figure is
    // never read without them.
    let text = std::fs::read_to_string(&log)?;
    for line in text.lines().filter(|l| l.contains("\"WARN\"")) {
        println!("nsproxy: {line}");
    }
    drop(nsproxy);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn sink(listen: SocketAddr, echo: bool) -> Result<()> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(listen),
        socket2::Type::DGRAM,
        None,
    )?;
    sock.set_recv_buffer_size(4 << 20)?;
    sock.bind(&listen.into())?;
    let s: UdpSocket = sock.into();
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    println!("bound=1");
    let mut buf = vec![0u8; 65_536];
    let mut received = 0u64;
    let mut last = Instant::now();
    let mut started = false;
    loop {
        match s.recv_from(&mut buf) {
            Ok((n, from)) => {
                received += 1;
                last = Instant::now();
                started = true;
                if echo {
                    let _ = s.send_to(&buf[..n], from);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if started && last.elapsed() > Duration::from_secs(1) {
                    break;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    println!("received={received}");
    Ok(())
}

fn flood(target: SocketAddr, clients: usize, size: usize, seconds: f64, rate: u64) -> Result<()> {
    let from = if target.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    };
    let socks: Vec<UdpSocket> = (0..clients)
        .map(|_| {
            let s = UdpSocket::bind(from)?;
            s.connect(target)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<std::io::Result<_>>()?;
    let payload = vec![b'x'; size];
    let mut buf = vec![0u8; 65_536];
    let (mut sent, mut replies) = (0u64, 0u64);
    let started = Instant::now();
    let until = Duration::from_secs_f64(seconds);
    let mut next = 0;
    // Replies are read after every round of sends, and for 200 ms after
    // the last one (the measured span stays the sending time).
    let mut drain = |socks: &[UdpSocket], replies: &mut u64| {
        for s in socks {
            while s.recv(&mut buf).is_ok() {
                *replies += 1;
            }
        }
    };
    loop {
        let elapsed = started.elapsed();
        if elapsed >= until {
            break;
        }
        let owed = if rate == 0 {
            socks.len().max(64) as u64
        } else {
            ((elapsed.as_secs_f64() * rate as f64) as u64)
                .saturating_sub(sent)
                .min(4096)
        };
        if owed == 0 {
            drain(&socks, &mut replies);
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        for _ in 0..owed {
            // A full send buffer (WouldBlock) loses nothing: try the next.
            if socks[next].send(&payload).is_ok() {
                sent += 1;
            }
            next = (next + 1) % socks.len();
        }
        drain(&socks, &mut replies);
    }
    let seconds = started.elapsed().as_secs_f64();
    let tail = Instant::now();
    while tail.elapsed() < Duration::from_millis(200) {
        drain(&socks, &mut replies);
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("sent={sent} seconds={seconds} replies={replies}");
    Ok(())
}
