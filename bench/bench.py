#!/usr/bin/env python3
"""nsproxy comparative benchmark. Start it through bench/run.sh (as root), which installs the
tools and builds the binaries first; see bench/README.md.

Topology: two network namespaces this script creates (unique names nsb<PID>-cli / nsb<PID>-srv),
with only their loopback up and no link between them. Servers (iperf3, a TCP request/reply
server, a UDP sink) listen on 127.0.0.1 in the server namespace; clients run in the client
namespace and talk to 127.0.0.1 there, where each proxy listens. "direct" runs the same
clients in the server namespace against the same servers: the same loopback path minus the proxy. The host -> namespace workloads (host-rr, host-tcp1) run
their clients in the host namespace against a free port on host loopback, where nsproxy (a
rule with netns = ["host"]), HAProxy (a bind without namespace) and pasta (-t, attached to the
server namespace) listen.

Everything this script creates is recorded in the state directory (namespace names before they
are created; process ids with their start times) so bench/run.sh can clean up even after a crash,
and it is removed on every exit path here.
"""

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HZ = os.sysconf("SC_CLK_TCK")
LOCAL = "127.0.0.1"

# Ports inside the namespaces (all on 127.0.0.1).
SRV_PORTS = {"iperf": 5201, "rr": 5300, "udp": 5400, "hold": 5500}
# What each workload's client connects to (a key of Proxy.ports).
WORKLOAD_KIND = {"tcp1": "iperf", "tcp4": "iperf", "rr": "rr", "udpmax": "udp", "udpmany": "udp", "udp50k": "udp",
                 "udp1": "udp-iperf", "udp1w": "udp-iperf", "host-rr": "h-rr", "host-tcp1": "h-iperf", "idle": "hold"}
HOST_WORKLOADS = ("host-rr", "host-tcp1")
PROXY_BASE = {"nsproxy": 11000, "haproxy": 12000, "socat": 13000, "nginx": 14000,
              "nsproxy-copy": 15000, "nsproxy-nopool": 16000, "nsproxy-before": 17000}
# Host-namespace loopback ports (host -> namespace topology): below the ephemeral range
# (32768-60999), so that no outgoing connection of the machine takes one mid-run; each is checked
# free before use and moved if not (free_host_port).
HOST_BASE = {"nsproxy": 21000, "haproxy": 22000, "pasta": 23000, "nsproxy-copy": 25000,
             "nsproxy-nopool": 26000, "nsproxy-before": 27000}
# nsproxy with one of its optimisations turned off, for measuring what each brings
# (not in the default run: `--proxies direct,nsproxy,nsproxy-copy,nsproxy-nopool`).
NSPROXY_VARIANTS = {
    "nsproxy": {},
    "nsproxy-copy": {"NSPROXY_TCP_SPLICE": "0"},      # buffered copy instead of splice(2)
    "nsproxy-nopool": {"NSPROXY_UPSTREAM_POOL": "0"},  # no pre-created upstream sockets
    # another build (--nsproxy-before PATH), for a before/after comparison in one run
    "nsproxy-before": {},
}
SCALE_PORT = 7000
SCALE_TCP_UPSTREAM = 5300  # the request/reply server
SCALE_UDP_UPSTREAM = 5401  # a UDP echo server, for the probes

ALL_PROXIES = ["direct", "nsproxy", "haproxy", "pasta", "socat", "nginx"]
ALL_WORKLOADS = ["tcp1", "tcp4", "rr", "udpmax", "udpmany", "udp50k", "udp1", "udp1w", "host-rr", "host-tcp1", "idle"]


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Interrupted(Exception):
    pass


_INTERRUPTED = []


def _on_signal(signum, _frame):
    # Only the first signal interrupts; later ones (Ctrl-C reaches both run.sh, which then sends
    # SIGTERM, and this process) must not break off the cleanup that the first one started.
    if _INTERRUPTED:
        return
    _INTERRUPTED.append(signum)
    raise Interrupted(f"signal {signum}")


# ------------------------------------------------------------------ /proc helpers


def read_stat(pid):
    """(ppid, utime+stime+cutime+cstime ticks, starttime) or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rfind(")") + 2 :].split()
    # rest[0]=state [1]=ppid ... [11]=utime [12]=stime [13]=cutime [14]=cstime [19]=starttime
    return int(rest[1]), sum(int(x) for x in rest[11:15]), int(rest[19])


def status_fields(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "Threads"):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def children_map():
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = read_stat(int(name))
        if st:
            children.setdefault(st[0], []).append(int(name))
    return children


def process_tree(roots, children=None):
    """All live pids descending from roots (roots included)."""
    if children is None:
        children = children_map()
    seen, todo = [], [r for r in roots if os.path.exists(f"/proc/{r}")]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo.extend(children.get(p, []))
    return seen


def tree_cpu_ticks(roots):
    """CPU ticks of the tree: utime+stime of the live processes plus what their reaped
    children used (cutime+cstime), so forked per-connection children (socat) count too."""
    total = 0
    for p in process_tree(roots):
        st = read_stat(p)
        if st:
            total += st[1]
    return total


def tree_hwm_kib(roots, children):
    return sum(status_fields(p).get("VmHWM", 0) for p in process_tree(roots, children))


def tree_stats(roots):
    pids = process_tree(roots)
    rss = hwm = threads = fds = 0
    for p in pids:
        s = status_fields(p)
        rss += s.get("VmRSS", 0)
        hwm += s.get("VmHWM", 0)
        threads += s.get("Threads", 0)
        try:
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return {"procs": len(pids), "rss_kib": rss, "hwm_kib": hwm, "threads": threads, "fds": fds}


class MemSampler:
    """Samples the summed VmHWM of each proxy's process tree every 250 ms while running,
    keeping the peak (per-connection children of socat come and go between reads of VmHWM)."""

    def __init__(self):
        self.roots = {}
        self.peak = {}
        self._stop = threading.Event()
        self._t = None

    def start(self, roots_by_name):
        self.roots = roots_by_name
        self._stop.clear()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(0.25)

    def sample(self):
        children = children_map()  # one /proc scan for all proxies
        for name, roots in self.roots.items():
            h = tree_hwm_kib(roots, children)
            self.peak[name] = max(self.peak.get(name, 0), h)

    def stop(self):
        self._stop.set()
        if self._t:
            self._t.join(timeout=5)
        self.sample()


# ------------------------------------------------------------------ the harness


class Harness:
    def __init__(self, args):
        self.args = args
        self.state = args.state_dir
        os.makedirs(self.state, exist_ok=True)
        self.work = os.path.join(self.state, "w")  # configs, UNIX sockets
        os.makedirs(self.work, exist_ok=True)
        self.logs = os.path.join(args.out, "logs")
        shutil.rmtree(self.logs, ignore_errors=True)
        os.makedirs(self.logs, exist_ok=True)
        self.prefix = f"nsb{os.getpid()}"
        self.cli = f"{self.prefix}-cli"
        self.srv = f"{self.prefix}-srv"
        self.netns = []  # names this run created (and only those are ever deleted)
        self.procs = []  # (label, Popen)
        self.nsproxy = args.nsproxy
        self.loadgen = args.loadgen

    # ---- namespaces

    def add_netns(self, names):
        # Record first, so that run.sh's trap can remove them even if we die half-way.
        with open(os.path.join(self.state, "netns"), "a") as f:
            f.write("".join(n + "\n" for n in names))
            f.flush()
            os.fsync(f.fileno())
        for n in names:
            if os.path.exists(f"/run/netns/{n}"):
                raise RuntimeError(f"namespace {n} already exists; refusing to reuse it")
        self.netns.extend(names)
        for i in range(0, len(names), 2000):
            chunk = names[i : i + 2000]
            subprocess.run(
                ["ip", "-batch", "-"],
                input="".join(f"netns add {n}\n" for n in chunk),
                text=True,
                check=True,
                timeout=600,
            )
        # Loopback up in each: bench/lo_up.py, a process of its own (see there why not `ip -n`).
        subprocess.run(
            [sys.executable, os.path.join(ROOT, "bench", "lo_up.py")],
            input="".join(n + "\n" for n in names),
            text=True,
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=1800,
        )

    def del_netns(self, names):
        mine = [n for n in names if n in self.netns and os.path.exists(f"/run/netns/{n}")]
        for i in range(0, len(mine), 2000):
            chunk = mine[i : i + 2000]
            subprocess.run(
                ["ip", "-batch", "-"],
                input="".join(f"netns del {n}\n" for n in chunk),
                text=True,
                timeout=1800,
            )
        gone = set(names)
        self.netns = [n for n in self.netns if n not in gone]

    # ---- processes

    def spawn(self, label, argv, ns=None, stdout=None, stderr=None, stdin=subprocess.DEVNULL, env=None):
        if ns:
            argv = ["ip", "netns", "exec", ns] + argv
        if stdout is None:
            stdout = open(os.path.join(self.logs, f"{label}.out"), "ab")
        if stderr is None:
            stderr = open(os.path.join(self.logs, f"{label}.err"), "ab")
        p = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, start_new_session=True,
                             env=dict(os.environ, **env) if env else None)
        st = read_stat(p.pid)
        with open(os.path.join(self.state, "pids"), "a") as f:
            f.write(f"{p.pid} {st[2] if st else 0} {label}\n")
        self.procs.append((label, p))
        return p

    def stop(self, p, grace=5.0):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # The group may still hold forked children (socat, nginx workers).
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.procs = [(l, q) for (l, q) in self.procs if q is not p]

    def cleanup(self):
        for _, p in reversed(list(self.procs)):
            self.stop(p, grace=3.0)
        if self.netns:
            log(f"removing {len(self.netns)} namespace(s) this run created")
            self.del_netns(list(self.netns))
        shutil.rmtree(self.work, ignore_errors=True)

    def run(self, argv, ns=None, timeout=60):
        if ns:
            argv = ["ip", "netns", "exec", ns] + argv
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def probe(self, ns, port, udp=False, within=10.0):
        argv = [self.loadgen, "probe", "--target", f"{LOCAL}:{port}", "--within", f"{within}s"]
        if udp:
            argv.append("--udp")
        r = self.run(argv, ns=ns, timeout=within + 20)
        return r.returncode == 0


# ------------------------------------------------------------------ proxies


class Proxy:
    def __init__(self, name, ns, ports, roots=(), notes="", hns=None):
        self.name = name
        self.ns = ns  # where clients run
        self.hns = hns  # where clients of the host -> namespace workloads run (None: the host namespace)
        self.ports = ports  # workload kind -> port, None if unsupported
        self.roots = list(roots)  # Popen objects to measure
        self.notes = notes
        self.na_reason = {}
        # Starts another instance of this proxy with only the rr and hold rules, for `idle`: what
        # N connections cost a process that has not served (and kept memory for) others before.
        self.fresh = None
        # nsproxy: `nsproxy status --json` argv, for its own counters (what it dropped and why).
        self.status_argv = None

    def status(self, h):
        if not self.status_argv:
            return None
        r = h.run(self.status_argv, timeout=15)
        try:
            return json.loads(r.stdout)
        except json.JSONDecodeError:
            return None

    def pids(self):
        return [p.pid for p in self.roots]

    def client_ns(self, wl):
        return self.hns if wl in HOST_WORKLOADS else self.ns


def free_host_port(base, taken):
    """`base`, or the first of base+1000, base+2000, ... that nothing on the host holds (TCP and UDP
    on 127.0.0.1 and the wildcard), and that this run has not handed out already."""
    import socket

    for k in range(20):
        port = base + 1000 * k
        if port in taken or port >= 32768:
            continue
        try:
            for fam, addr in ((socket.SOCK_STREAM, LOCAL), (socket.SOCK_STREAM, "0.0.0.0"), (socket.SOCK_DGRAM, LOCAL)):
                with socket.socket(socket.AF_INET, fam) as sk:
                    # As the proxies bind: TIME_WAIT left by an earlier run does not make a port busy.
                    if fam == socket.SOCK_STREAM:
                        sk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sk.bind((addr, port))
                    if fam == socket.SOCK_STREAM:
                        sk.listen(1)
        except OSError:
            continue
        taken.add(port)
        return port
    raise RuntimeError(f"no free host loopback port near {base}")


HOST_PORTS_TAKEN = set()


def host_ports(name):
    b = HOST_BASE[name]
    return {"h-iperf": free_host_port(b + 201, HOST_PORTS_TAKEN), "h-rr": free_host_port(b + 300, HOST_PORTS_TAKEN)}


def start_servers(h):
    srv = h.srv
    h.spawn("srv-iperf3", ["iperf3", "-s", "-B", LOCAL, "-p", str(SRV_PORTS["iperf"]), "--idle-timeout", "60"], ns=srv)
    h.spawn("srv-rr", [h.loadgen, "tcp-rr-server", "--listen", f"{LOCAL}:{SRV_PORTS['rr']}", "--size", "64", "--max-time", "7200s"], ns=srv)
    h.spawn("srv-hold", [h.loadgen, "tcp-hold-server", "--listen", f"{LOCAL}:{SRV_PORTS['hold']}", "--max-time", "7200s"], ns=srv)
    h.spawn(
        "srv-udp-echo",
        [h.loadgen, "udp-server", "--mode", "echo", "--listen", f"{LOCAL}:{SCALE_UDP_UPSTREAM}", "--max-time", "7200s"],
        ns=srv,
    )
    if not h.probe(srv, SRV_PORTS["rr"], within=10):
        raise RuntimeError("the request/reply server did not come up")


def nsproxy_run_opts(h, tag):
    """A private control socket, if this build has one (never the system-wide default path)."""
    r = h.run([h.nsproxy, "run", "--help"], timeout=30)
    if "--control-socket" in r.stdout:
        return ["--control-socket", os.path.join(h.work, f"nsproxy-{tag}.sock")]
    return []


def start_nsproxy(h, workers, variant="nsproxy", fresh=False):
    b = PROXY_BASE[variant]
    if fresh:
        ports = {"rr": b + 601, "hold": b + 602}
    else:
        ports = {"iperf": b + 201, "rr": b + 300, "udp": b + 400, "udp-iperf": b + 201, "hold": b + 500}
        ports.update(host_ports(variant))
    # (port kind, protocol, upstream port, namespace it listens in); udp-iperf shares iperf's port,
    # as iperf3 -u needs its TCP control connection and its datagrams on one port number.
    rules = [("iperf", "tcp", SRV_PORTS["iperf"], h.cli), ("rr", "tcp", SRV_PORTS["rr"], h.cli),
             ("udp", "udp", SRV_PORTS["udp"], h.cli), ("udp-iperf", "udp", SRV_PORTS["iperf"], h.cli),
             ("hold", "tcp", SRV_PORTS["hold"], h.cli),
             ("h-iperf", "tcp", SRV_PORTS["iperf"], "host"), ("h-rr", "tcp", SRV_PORTS["rr"], "host")]
    rules = [r for r in rules if r[0] in ports]
    tag = variant + ("-fresh" if fresh else "")

    def config(with_udp):
        out = [f"workers = {workers}", ""]
        for kind, proto, up, listen_ns in rules:
            if proto == "udp" and not with_udp:
                continue
            out += [
                "[[proxy]]",
                f'name = "bench-{kind}"',
                f'protocol = "{proto}"',
                f'listen = "{LOCAL}:{ports[kind]}"',
                f'netns = ["{listen_ns}"]',
                f'upstream = "{LOCAL}:{up}"',
                f'upstream_netns = "{h.srv}"',
                "",
            ]
        return "\n".join(out)

    cfg = os.path.join(h.work, f"{tag}.toml")
    with open(cfg, "w") as f:
        f.write(config(True))
    binary = ARGS.nsproxy_before if variant == "nsproxy-before" else h.nsproxy
    chk = h.run([binary, "check", "--config", cfg], timeout=30)
    px = Proxy(variant, h.cli, dict(ports), hns=None)
    if chk.returncode != 0:
        log("nsproxy check refused the UDP rule; UDP workloads are n/a for nsproxy: " + (chk.stdout + chk.stderr).strip().replace("\n", " | ")[:300])
        with open(cfg, "w") as f:
            f.write(config(False))
        px.ports["udp"] = px.ports["udp-iperf"] = None
        px.na_reason["udp"] = px.na_reason["udp-iperf"] = "this nsproxy build has no UDP"
        chk = h.run([binary, "check", "--config", cfg], timeout=30)
        if chk.returncode != 0:
            raise RuntimeError("nsproxy check failed: " + chk.stdout + chk.stderr)
    # Connection lines (nsproxy::proxy, info) are off, as the other proxies log nothing per
    # connection here; startup and the "ready:" line stay at info.
    env = NSPROXY_VARIANTS[variant]
    ctl = nsproxy_run_opts(h, "main" if tag == "nsproxy" else tag)
    p = h.spawn(tag, [binary, "--log-level", "info,nsproxy::proxy=warn", "run", "--config", cfg] + ctl, env=env)
    px.roots = [p]
    if ctl:
        px.status_argv = [binary, "status", "--json"] + ctl
    if fresh:
        return px
    px.fresh = lambda: start_nsproxy(h, workers, variant, fresh=True)
    px.notes = (f"`workers = {workers}`; split as root (a socket broker as root + the relay as nobody, CPU and RSS summed); "
                f"listens in the client ns (host -> ns: in the host ns, 127.0.0.1:{ports['h-rr']} and :{ports['h-iperf']}), "
                "connects from the server ns")
    if env:
        px.notes += "; " + ", ".join(f"`{k}={v}`" for k, v in env.items())
    if variant == "nsproxy-before":
        px.notes += f"; the build `{binary}` (--nsproxy-before)"
    return px


def start_haproxy(h, workers, fresh=False):
    b = PROXY_BASE["haproxy"]
    if fresh:
        ports = {"rr": b + 601, "hold": b + 602}
    else:
        ports = {"iperf": b + 201, "rr": b + 300, "udp": None, "udp-iperf": None, "hold": b + 500}
        ports.update(host_ports("haproxy"))
    tag = "haproxy" + ("-fresh" if fresh else "")
    cfg = os.path.join(h.work, f"{tag}.cfg")
    lines = [
        "global",
        f"    nbthread {workers}",
        "    maxconn 4096",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 60s",
    ]
    # host -> ns: the bind without a namespace (HAProxy's own, the host's), the server in the server ns.
    for kind, up, bind_ns in (("iperf", "iperf", h.cli), ("rr", "rr", h.cli), ("hold", "hold", h.cli),
                              ("h-iperf", "iperf", None), ("h-rr", "rr", None)):
        if kind not in ports:
            continue
        lines += [
            f"frontend fe_{kind}",
            f"    bind {LOCAL}:{ports[kind]}" + (f" namespace {bind_ns}" if bind_ns else ""),
            f"    default_backend be_{kind}",
            f"backend be_{kind}",
            f"    server s1 {LOCAL}:{SRV_PORTS[up]} namespace {h.srv}",
        ]
    with open(cfg, "w") as f:
        f.write("\n".join(lines) + "\n")
    p = h.spawn(tag, ["haproxy", "-db", "-f", cfg])
    if fresh:
        return Proxy(tag, h.cli, ports, [p])
    px = Proxy("haproxy", h.cli, ports, [p], f"one process, `nbthread {workers}`, mode tcp; `bind ... namespace` + `server ... namespace` "
               f"(host -> ns: `bind 127.0.0.1:{ports['h-rr']}` without namespace)", hns=None)
    px.na_reason["udp"] = px.na_reason["udp-iperf"] = "HAProxy has no generic UDP proxy"
    px.fresh = lambda: start_haproxy(h, workers, fresh=True)
    return px


def start_pasta(h):
    """pasta (passt), Podman's port forwarder, attached to the server namespace: `-t` forwards a
    host loopback port into it, and a connection from host loopback takes pasta's spliced path
    (a socket in each namespace, splice(2) between them), the path a Podman user's `-p
    127.0.0.1:P:P` takes. No `--config-net`: pasta adds its tap device to the namespace and leaves
    addresses and routes alone; the host side is two listening sockets and nothing else."""
    ports = {"iperf": None, "rr": None, "udp": None, "udp-iperf": None, "hold": None}
    ports.update(host_ports("pasta"))
    # --runas 0:0: pasta drops to nobody by default, and as nobody it cannot join a namespace
    # owned by the initial user namespace (it exits "Couldn't switch to pasta namespaces");
    # a rootless Podman user runs it as themselves in a user namespace they own, the same rights.
    argv = ["pasta", "-f", "-q", "--runas", "0:0", "--netns", f"/run/netns/{h.srv}",
            "-t", f"{LOCAL}/{ports['h-iperf']}:{SRV_PORTS['iperf']}", "-t", f"{LOCAL}/{ports['h-rr']}:{SRV_PORTS['rr']}",
            "-u", "none", "-T", "none", "-U", "none", "--no-map-gw"]
    p = h.spawn("pasta", argv)
    px = Proxy("pasta", h.cli, ports, [p],
               f"`{' '.join(argv[:3] + ['--runas', '0:0', '--netns', 'SRV', '-t', '127.0.0.1/P:PORT', '...', '-u', 'none', '-T', 'none', '-U', 'none', '--no-map-gw'])}`: "
               "host loopback -> spliced path into the server ns; host -> ns workloads only", hns=None)
    for k in ("iperf", "rr", "hold"):
        px.na_reason[k] = "pasta forwards host -> namespace, not between two namespaces"
    px.na_reason["udp"] = px.na_reason["udp-iperf"] = "pasta: UDP host -> namespace not set up here"
    return px


def start_socat(h):
    b = PROXY_BASE["socat"]
    ports = {"iperf": b + 201, "rr": b + 300, "udp": b + 400}
    roots = []
    for kind in ("iperf", "rr"):
        sock = os.path.join(h.work, f"socat-{kind}.sock")
        roots.append(
            h.spawn(
                f"socat-srv-{kind}",
                ["socat", f"UNIX-LISTEN:{sock},fork,unlink-early,backlog=1024", f"TCP:{LOCAL}:{SRV_PORTS[kind]}"],
                ns=h.srv,
            )
        )
        roots.append(
            h.spawn(
                f"socat-cli-{kind}",
                ["socat", f"TCP-LISTEN:{ports[kind]},bind={LOCAL},fork,reuseaddr,backlog=1024", f"UNIX-CONNECT:{sock}"],
                ns=h.cli,
            )
        )
    usock = os.path.join(h.work, "socat-udp.sock")
    roots.append(h.spawn("socat-srv-udp", ["socat", "-u", f"UNIX-RECV:{usock},unlink-early", f"UDP-SENDTO:{LOCAL}:{SRV_PORTS['udp']}"], ns=h.srv))
    time.sleep(0.2)
    roots.append(h.spawn("socat-cli-udp", ["socat", "-u", f"UDP-RECV:{ports['udp']},bind={LOCAL}", f"UNIX-SENDTO:{usock}"], ns=h.cli))
    return Proxy(
        "socat",
        h.cli,
        ports,
        roots,
        "socat 1.7.4 cannot switch namespaces: per port, `TCP-LISTEN,fork` in the client ns -> UNIX socket -> "
        "`UNIX-LISTEN,fork` in the server ns -> TCP (2 forked processes per connection); "
        "UDP: `-u UDP-RECV` -> UNIX datagram -> `-u UNIX-RECV` -> UDP (one way only)",
    )


def nginx_conf(h, side, workers, servers):
    return "\n".join(
        [
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;",
            "user root;",  # workers must reach the root-owned UNIX sockets of the other instance
            f"worker_processes {workers};",
            "daemon off;",
            f"pid {h.work}/nginx-{side}.pid;",
            f"error_log {h.logs}/nginx-{side}.error.log warn;",
            "worker_rlimit_nofile 16384;",
            "events { worker_connections 8192; }",
            "stream {",
            *servers,
            "}",
            "",
        ]
    )


def start_nginx(h, workers):
    b = PROXY_BASE["nginx"]
    ports = {"iperf": b + 201, "rr": b + 300, "udp": b + 400}
    cli, srv = [], []
    for kind in ("iperf", "rr"):
        sock = os.path.join(h.work, f"nginx-{kind}.sock")
        cli.append(f"  server {{ listen {LOCAL}:{ports[kind]} backlog=1024; proxy_pass unix:{sock}; }}")
        srv.append(f"  server {{ listen unix:{sock} backlog=1024; proxy_pass {LOCAL}:{SRV_PORTS[kind]}; }}")
    usock = os.path.join(h.work, "nginx-udp.sock")
    cli.append(f"  server {{ listen {LOCAL}:{ports['udp']} udp; proxy_pass unix:{usock}; proxy_responses 0; proxy_timeout 10s; }}")
    srv.append(f"  server {{ listen unix:{usock} udp; proxy_pass {LOCAL}:{SRV_PORTS['udp']}; proxy_responses 0; proxy_timeout 10s; }}")
    roots = []
    for side, ns, servers in (("srv", h.srv, srv), ("cli", h.cli, cli)):
        conf = os.path.join(h.work, f"nginx-{side}.conf")
        with open(conf, "w") as f:
            f.write(nginx_conf(h, side, workers, servers))
        roots.append(h.spawn(f"nginx-{side}", ["nginx", "-e", f"{h.logs}/nginx-{side}.error.log", "-p", h.work, "-c", conf], ns=ns))
        time.sleep(0.3)
    return Proxy(
        "nginx",
        h.cli,
        ports,
        roots,
        f"nginx cannot switch namespaces: two instances (`worker_processes {workers}` each), stream module; "
        "client ns TCP -> UNIX socket -> server ns TCP. UDP one way (`proxy_responses 0`) through a UNIX datagram "
        "socket; the server-side instance sees every datagram as a new session (its UNIX peer is unbound)",
    )


# ------------------------------------------------------------------ workloads


def iperf_json(r, what):
    """iperf3 -J's report, or why there is none (its error, or what it printed)."""
    try:
        j = json.loads(r.stdout)
    except json.JSONDecodeError:
        return None, f"{what}: {r.stderr.strip()[:200]}"
    if "error" in j:
        return None, f"{what}: {j['error']}"
    return j, None


def w_iperf(h, px, streams, dur, port=None, ns=False):
    port = port or px.ports["iperf"]
    r = h.run(
        ["iperf3", "-c", LOCAL, "-p", str(port), "-t", str(dur), "-P", str(streams), "-J", "--connect-timeout", "3000"],
        ns=px.ns if ns is False else ns,
        timeout=dur + 30,
    )
    j, err = iperf_json(r, "iperf3")
    if err:
        return None, err
    s = j["end"]["sum_received"]
    return {"gbps": s["bits_per_second"] / 1e9, "bytes": s["bytes"], "seconds": s["seconds"]}, None


def w_rr(h, px, dur, port=None, ns=False):
    port = port or px.ports["rr"]
    r = h.run(
        [h.loadgen, "tcp-rr", "--target", f"{LOCAL}:{port}", "--concurrency", "8", "--size", "64", "--duration", f"{dur}s"],
        ns=px.ns if ns is False else ns,
        timeout=dur + 30,
    )
    try:
        j = json.loads(r.stdout)
    except json.JSONDecodeError:
        return None, f"tcp-rr: {r.stderr.strip()[:200]}"
    if j["conns"] == 0:
        return None, f"tcp-rr: no connection succeeded ({j.get('first_error')})"
    return {"cps": j["conns_per_s"], "p50_ms": j["p50_us"] / 1000, "p99_ms": j["p99_us"] / 1000, "conns": j["conns"], "errors": j["errors"]}, None


# udpmany: as udpmax, from this many client sockets (flows) sent from in turn, so that no two
# datagrams in a row share a flow: a proxy's batches and sessions at their worst.
UDPMANY_FLOWS = 64


def w_udp(h, px, dur, rate, flows=1):
    port = px.ports["udp"]
    sink = h.spawn(
        "udp-sink",
        [h.loadgen, "udp-server", "--mode", "sink", "--listen", f"{LOCAL}:{SRV_PORTS['udp']}", "--idle", "1s", "--max-time", f"{dur + 4}s"],
        ns=h.srv,
        stdout=subprocess.PIPE,
    )
    try:
        first = sink.stdout.readline()  # {"listening": ...}
        if b"listening" not in first:
            return None, "UDP sink did not start"
        r = h.run(
            [h.loadgen, "udp-flood", "--target", f"{LOCAL}:{port}", "--size", "64", "--rate", str(rate), "--duration", f"{dur}s",
             "--flows", str(flows)],
            ns=px.ns,
            timeout=dur + 30,
        )
        try:
            sent = json.loads(r.stdout)
        except json.JSONDecodeError:
            return None, f"udp-flood: {r.stderr.strip()[:200]}"
        try:
            out, _ = sink.communicate(timeout=dur + 10)
        except subprocess.TimeoutExpired:
            return None, "UDP sink did not finish"
        got = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        h.stop(sink, grace=1)
    recv = got["received"]
    return {
        "sent": sent["sent"],
        "received": recv,
        "sent_kpps": sent["sent_pps"] / 1e3,
        "rx_kpps": recv / sent["duration_s"] / 1e3,
        "loss_pct": 100.0 * (1 - recv / sent["sent"]) if sent["sent"] else 100.0,
    }, None


def udp_snmp(h, ns):
    """The Udp: counters of /proc/net/snmp in `ns` (that file is per network namespace)."""
    r = h.run(["cat", "/proc/net/snmp"], ns=ns, timeout=15)
    rows = [l.split()[1:] for l in r.stdout.splitlines() if l.startswith("Udp:")]
    if len(rows) < 2:
        return {}
    return {k: int(v) for k, v in zip(rows[0], rows[1])}


# udp1w: the same flow with iperf3's socket buffers at 4 MiB (`-w`), within this VM's
# net.core.rmem_max: how much of udp1's loss is the server's default buffer.
UDP1W_BUFFER = "4M"


def w_udp1(h, px, dur, window=None):
    """One UDP flow at full rate, as a user tries it first: iperf3 -u -l 64 -b 0, one client socket
    (with `window`, iperf3 -w: both ends' socket buffers).
    Received = what the iperf3 server counted (sum_received: highest sequence seen minus the gaps).
    Where the rest went: RcvbufErrors in the client namespace are datagrams the proxy's listening
    socket had no room for (lost before the proxy); in the server namespace, at the iperf3 server."""
    port = px.ports["udp-iperf"]
    proxied = px.ns != h.srv
    before = {ns: udp_snmp(h, ns) for ns in (h.cli, h.srv)}
    st0 = px.status(h)
    backlog0 = softnet_drops()
    r = h.run(["iperf3", "-c", LOCAL, "-p", str(port), "-u", "-l", "64", "-b", "0", "-t", str(dur), "-J",
               "--connect-timeout", "3000"] + (["-w", window] if window else []), ns=px.ns, timeout=dur + 30)
    backlog = softnet_drops() - backlog0
    after = {ns: udp_snmp(h, ns) for ns in (h.cli, h.srv)}
    st1 = px.status(h)
    j, err = iperf_json(r, "iperf3 -u")
    if err:
        return None, err
    sent = j["end"]["sum_sent"]["packets"]
    rcv = j["end"]["sum_received"]
    recv = rcv["packets"] - rcv["lost_packets"]
    d = lambda ns, k: after[ns].get(k, 0) - before[ns].get(k, 0)
    drops = {ns: d(ns, "RcvbufErrors") for ns in after}
    pct = lambda x: 100.0 * x / sent if sent else None
    # What the proxy took in (client ns) minus what reached the server's socket (delivered or
    # dropped there; server ns): what the proxy itself did not send on. (Not the server ns's
    # OutDatagrams: one UDP_SEGMENT send counts once there, however many datagrams it carries.)
    # InErrors holds RcvbufErrors and the other drops at a socket (MemErrors: the machine's udp_mem).
    in_proxy = (max(0, d(h.cli, "InDatagrams") - d(h.srv, "InDatagrams") - d(h.srv, "InErrors")) if proxied else None)
    return {
        "sent": sent,
        "received": recv,
        "sent_kpps": sent / j["end"]["sum_sent"]["seconds"] / 1e3,
        "rx_kpps": recv / rcv["seconds"] / 1e3 if rcv["seconds"] else 0.0,
        "loss_pct": pct(sent - recv),
        # What the proxy's listening socket took in: the proxy's CPU went on these, whether the
        # server's socket then had room for them or not.
        "taken_in": sent - drops[h.cli] if proxied else None,
        # Counted over the whole client namespace / server namespace: nothing else sends UDP there.
        "loss_before_proxy_pct": pct(drops[h.cli]) if proxied else None,
        "loss_at_server_pct": pct(drops[h.srv]),
        "loss_in_proxy_pct": pct(in_proxy) if proxied else None,
        "proxy_sndbuf_errors": d(h.srv, "SndbufErrors") if proxied else None,
        "udp_counters": {"client ns" if ns == h.cli else "server ns": {k: d(ns, k) for k in after[ns]} for ns in after},
        # nsproxy's own count of what it sent on and what it dropped, and why.
        "nsproxy_counters": udp_rule_delta(st0, st1, "bench-udp-iperf"),
        "dropped_queue_full_pct": pct(udp_rule_delta(st0, st1, "bench-udp-iperf").get("dropped_queue_full", 0))
        if st0 and st1 else None,
        # Machine-wide (other sessions' traffic too), so only an indication.
        "loss_backlog_pct": pct(backlog),
    }, None


def udp_rule_delta(st0, st1, rule):
    """The change of one rule's counters between two `nsproxy status --json` answers ({} if either is missing)."""
    if not (st0 and st1):
        return {}

    def counters(st):
        for b in st.get("bindings", []):
            if b.get("rule") == rule:
                return b.get("counters", {})
        return {}

    c0, c1 = counters(st0), counters(st1)
    keys = ("datagrams_in", "dropped_queue_full", "dropped_by_kernel", "send_errors", "truncated", "recv_errors", "sessions_created")
    return {k: c1.get(k, 0) - c0.get(k, 0) for k in keys if k in c1}


def tcp_skmem_bytes(h, ns):
    """Kernel memory charged to the TCP sockets of `ns` (ss -tm: rmem_alloc + wmem_queued +
    forward_alloc + opt_mem per socket, summed), and the number of sockets."""
    r = h.run(["ss", "-tmnaH"], ns=ns, timeout=30)
    total = n = 0
    for m in re.finditer(r"skmem:\(([^)]*)\)", r.stdout):
        f = dict(re.match(r"([a-z]+)(\d+)", x).groups() for x in m.group(1).split(",") if re.match(r"[a-z]+\d+", x))
        total += sum(int(f.get(k, 0)) for k in ("r", "w", "f", "o"))
        n += 1
    return total, n


def socket_struct_bytes():
    """What one TCP socket costs the kernel before any buffer: the object sizes of its slab caches
    (the tcp_sock, and the socket inode that an fd-held socket has), from /proc/slabinfo. The
    caches' totals are machine-wide and move with everything else, so they are not differenced."""
    size = {}
    try:
        with open("/proc/slabinfo") as f:
            for line in f:
                x = line.split()
                if x and x[0] in ("TCP", "sock_inode_cache"):
                    size[x[0]] = int(x[3])
    except OSError:
        pass
    return sum(size.values()) if len(size) == 2 else None


def softnet_drops():
    """Packets dropped machine-wide because a CPU's input backlog was full (loopback traffic is
    queued there before any socket sees it), from /proc/net/softnet_stat's second column."""
    try:
        with open("/proc/net/softnet_stat") as f:
            return sum(int(l.split()[1], 16) for l in f if l.strip())
    except OSError:
        return 0


def fd_counts(pids):
    """(all fds, pipe fds) held by the processes."""
    n = pipes = 0
    for p in pids:
        try:
            names = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        n += len(names)
        for fd in names:
            try:
                pipes += os.readlink(f"/proc/{p}/fd/{fd}").startswith("pipe:")
            except OSError:
                pass
    return n, pipes


def read_line(proc, within):
    """One line of proc's stdout, or b"" if none comes within `within` seconds."""
    import select

    ready, _, _ = select.select([proc.stdout], [], [], within)
    return proc.stdout.readline() if ready else b""


def w_idle(h, px, n):
    """Memory of idle connections: N connections through the proxy, one 64-byte exchange on each
    (so that both legs are set up), then held idle; the proxy's RSS, fds and the kernel's socket
    memory with them open minus before, per connection. Then one bulk connection: the fds the
    proxy holds while it moves data."""
    port = px.ports["hold"]
    pids = list(px.pids())
    nss = [h.srv] if px.ns == h.srv else [h.cli, h.srv]

    def snap():
        tree = process_tree(pids)
        st = tree_stats(pids) if pids else {}
        fds, pipes = fd_counts(tree)
        mem = [tcp_skmem_bytes(h, ns) for ns in nss]
        status = px.status(h) or {}
        return {"rss": st.get("rss_kib"), "fds": fds, "pipes": pipes, "skmem": sum(m[0] for m in mem),
                "sockets": sum(m[1] for m in mem), "heap": status.get("heap_allocated_bytes")}

    hold_s = 3
    ssize = socket_struct_bytes()
    s0 = snap()
    hp = h.spawn("hold-idle", [h.loadgen, "tcp-hold", "--target", f"{LOCAL}:{port}", "--conns", str(n), "--hold", f"{hold_s}s",
                               "--timeout", "30s"], ns=px.ns, stdout=subprocess.PIPE)
    try:
        first = read_line(hp, 45)
        try:
            held = json.loads(first)["held"]
        except (ValueError, KeyError):
            return None, f"tcp-hold: no 'held' line ({first[:100]!r})"
        if held == 0:
            return None, "tcp-hold: no connection opened: " + str(json.loads(first).get("first_error"))
        time.sleep(0.5)  # the proxy has seen the reply go through; let it settle its bookkeeping
        s1 = snap()
        hp.communicate(timeout=hold_s + 15)
    finally:
        h.stop(hp, grace=1)
    res = {"conns": held, "open_errors": n - held,
           "rss_kib_per_conn": (s1["rss"] - s0["rss"]) / held if pids else None,
           "fds_per_conn": (s1["fds"] - s0["fds"]) / held if pids else None,
           # Buffers charged to the path's sockets (0 when every byte has been read), and the sockets
           # themselves: TCP sockets in the namespaces per connection x the kernel's size of one.
           "kmem_kib_per_conn": (s1["skmem"] - s0["skmem"]) / 1024 / held,
           "sockets_per_conn": (s1["sockets"] - s0["sockets"]) / held,
           "ksock_kib_per_conn": (s1["sockets"] - s0["sockets"]) / held * ssize / 1024 if ssize else None,
           # nsproxy's own count of its heap (status --json), where it reports one.
           "heap_kib_per_conn": (s1["heap"] - s0["heap"]) / 1024 / held if s0["heap"] is not None and s1["heap"] is not None else None,
           "rss_kib_before": s0["rss"], "rss_kib_held": s1["rss"], "fds_before": s0["fds"], "fds_held": s1["fds"]}
    if not pids:
        return res, None
    # Bulk: wait until the idle connections' fds are gone (bounded), then one writing connection.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and fd_counts(process_tree(pids))[0] > s0["fds"] + 4:
        time.sleep(0.1)
    b0 = fd_counts(process_tree(pids))
    bp = h.spawn("hold-bulk", [h.loadgen, "tcp-hold", "--target", f"{LOCAL}:{port}", "--conns", "1", "--hold", "2s", "--bulk"],
                 ns=px.ns, stdout=subprocess.PIPE)
    peak = (0, 0)
    kmem0 = sum(tcp_skmem_bytes(h, ns)[0] for ns in nss)
    kpeak = 0
    try:
        if b'"held":1' in read_line(bp, 15):
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                c = fd_counts(process_tree(pids))
                peak = max(peak, (c[0] - b0[0], c[1] - b0[1]))
                kpeak = max(kpeak, sum(tcp_skmem_bytes(h, ns)[0] for ns in nss) - kmem0)
                time.sleep(0.1)
            res["bulk_kmem_kib"] = kpeak / 1024
            out, _ = bp.communicate(timeout=15)
            res["bulk_gbps"] = json.loads(out.decode().strip().splitlines()[-1])["bytes_sent"] * 8 / 2 / 1e9
            res["bulk_fds"], res["bulk_pipes"] = peak
            # Pipes still held once the transfer is over: a pool's idle pipes (the README's fd accounting).
            time.sleep(0.5)
            res["pipes_after_bulk"] = fd_counts(process_tree(pids))[1] - b0[1]
    finally:
        h.stop(bp, grace=1)
    return res, None


def run_workload(h, px, wl, dur, udp_rate, idle_conns=2000):
    kind = WORKLOAD_KIND[wl]
    if px.ports.get(kind) is None:
        why = px.na_reason.get(kind)
        if why is None and kind.startswith("h-"):
            why = "not set up host -> namespace in this harness"
        return None, why or "not set up in this harness"
    if wl == "udp1":
        return w_udp1(h, px, dur)
    if wl == "udp1w":
        return w_udp1(h, px, dur, window=UDP1W_BUFFER)
    if wl == "host-rr":
        return w_rr(h, px, dur, port=px.ports["h-rr"], ns=px.hns)
    if wl == "host-tcp1":
        return w_iperf(h, px, 1, dur, port=px.ports["h-iperf"], ns=px.hns)
    if wl == "idle":
        if px.fresh is None:
            return w_idle(h, px, idle_conns)
        f = px.fresh()
        try:
            if not h.probe(f.ns, f.ports["rr"], within=15):
                return None, f"the fresh {f.name} did not answer; see {h.logs}"
            return w_idle(h, f, idle_conns)
        finally:
            for r in f.roots:
                h.stop(r)
    if wl == "tcp1":
        return w_iperf(h, px, 1, dur)
    if wl == "tcp4":
        return w_iperf(h, px, 4, dur)
    if wl == "rr":
        return w_rr(h, px, dur)
    if wl == "udpmax":
        return w_udp(h, px, dur, 0)
    if wl == "udpmany":
        return w_udp(h, px, dur, 0, flows=UDPMANY_FLOWS)
    return w_udp(h, px, dur, udp_rate)


def work_units(wl, res):
    """(units, unit name) for the CPU-per-unit figure (ms of CPU per unit)."""
    if wl in ("tcp1", "tcp4", "host-tcp1"):
        return res["bytes"] / 2**30, "GiB"
    if wl in ("rr", "host-rr"):
        return res["conns"] / 1e3, "1k conns"
    if wl in ("udp1", "udp1w"):
        return res["received"] / 1e3, "1k datagrams"  # ms per 1k = µs per datagram
    if wl == "idle":
        return None, None
    return res["received"] / 1e6, "M datagrams"


# ------------------------------------------------------------------ statistics and output


def summarize(values):
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


METRICS = [
    # key, workload, field, title, unit, higher is better
    ("tcp1_gbps", "tcp1", "gbps", "TCP bulk, 1 stream", "Gbit/s", True),
    ("tcp4_gbps", "tcp4", "gbps", "TCP bulk, 4 streams", "Gbit/s", True),
    ("rr_cps", "rr", "cps", "new TCP conns/s (64 B req/reply, 8 concurrent)", "conn/s", True),
    ("rr_p50", "rr", "p50_ms", "conn+req+reply latency p50", "ms", False),
    ("rr_p99", "rr", "p99_ms", "conn+req+reply latency p99", "ms", False),
    ("udpmax_kpps", "udpmax", "rx_kpps", "UDP 64 B, max offered: received", "kpps", True),
    ("udpmany_kpps", "udpmany", "rx_kpps", f"UDP 64 B, {UDPMANY_FLOWS} flows in turn, max offered: received", "kpps", True),
    ("udp50k_loss", "udp50k", "loss_pct", "UDP 64 B at 50k pps offered: loss", "%", False),
    ("udp1_kpps", "udp1", "rx_kpps", "UDP 1 flow, iperf3 -u -l 64 -b 0: received", "kpps", True),
    ("udp1_loss", "udp1", "loss_pct", "UDP 1 flow: loss (sent - received)", "%", False),
    ("udp1_loss_pre", "udp1", "loss_before_proxy_pct", "UDP 1 flow: lost before the proxy (client ns RcvbufErrors)", "%", False),
    ("udp1_loss_srv", "udp1", "loss_at_server_pct", "UDP 1 flow: lost at the server (server ns RcvbufErrors)", "%", False),
    ("udp1_loss_px", "udp1", "loss_in_proxy_pct", "UDP 1 flow: taken in by the proxy, not sent on", "%", False),
    ("udp1_qfull", "udp1", "dropped_queue_full_pct", "UDP 1 flow: of which nsproxy's own count, session queue full", "%", False),
    ("udp1_loss_bl", "udp1", "loss_backlog_pct", "UDP 1 flow: input backlog drops (softnet_stat, machine-wide)", "%", False),
    ("udp1w_kpps", "udp1w", "rx_kpps", "UDP 1 flow, iperf3 -w 4M (socket buffers 4 MiB): received", "kpps", True),
    ("udp1w_loss", "udp1w", "loss_pct", "UDP 1 flow, -w 4M: loss (sent - received)", "%", False),
    ("udp1w_loss_srv", "udp1w", "loss_at_server_pct", "UDP 1 flow, -w 4M: lost at the server", "%", False),
    ("hrr_cps", "host-rr", "cps", "host -> ns: new TCP conns/s (64 B req/reply, 8 concurrent)", "conn/s", True),
    ("hrr_p50", "host-rr", "p50_ms", "host -> ns: conn+req+reply latency p50", "ms", False),
    ("hrr_p99", "host-rr", "p99_ms", "host -> ns: conn+req+reply latency p99", "ms", False),
    ("htcp1_gbps", "host-tcp1", "gbps", "host -> ns: TCP bulk, 1 stream", "Gbit/s", True),
    ("idle_rss", "idle", "rss_kib_per_conn", "idle conns: proxy RSS per connection", "KiB", False),
    ("idle_heap", "idle", "heap_kib_per_conn", "idle conns: nsproxy's heap per connection (its own count)", "KiB", False),
    ("idle_fds", "idle", "fds_per_conn", "idle conns: proxy fds per connection", "fds", False),
    ("idle_kmem", "idle", "kmem_kib_per_conn", "idle conns: kernel socket buffers per connection (ss -tm, whole path)", "KiB", False),
    ("idle_socks", "idle", "sockets_per_conn", "idle conns: TCP sockets per connection (whole path)", "sockets", False),
    ("idle_ksock", "idle", "ksock_kib_per_conn", "idle conns: kernel socket structs per connection (sockets x slab object sizes)", "KiB", False),
    ("bulk_fds", "idle", "bulk_fds", "one bulk connection: added proxy fds during the transfer", "fds", False),
    ("bulk_pipes", "idle", "bulk_pipes", "one bulk connection: of which pipes", "fds", False),
    ("pipes_rest", "idle", "pipes_after_bulk", "after the bulk connection closed: pipes the proxy still holds", "fds", False),
    ("bulk_kmem", "idle", "bulk_kmem_kib", "one bulk connection: kernel socket buffers during the transfer (whole path)", "KiB", False),
]
# Cells with no ratio to direct: losses, and what direct has no value for.
NO_RATIO = {"udp50k_loss", "udp1_loss", "udp1w_loss", "udp1w_loss_srv", "udp1_loss_pre", "udp1_loss_srv", "udp1_loss_px", "udp1_qfull", "udp1_loss_bl", "idle_rss", "idle_heap", "idle_fds",
            "idle_kmem", "bulk_fds", "bulk_pipes", "pipes_rest", "bulk_kmem"}
# What the plot shows (the rest is in the tables): one panel each.
PLOT_KEYS = {"tcp1_gbps", "tcp4_gbps", "rr_cps", "rr_p99", "udpmax_kpps", "udp50k_loss", "udp1_kpps", "udp1_loss",
             "hrr_cps", "hrr_p99", "htcp1_gbps", "idle_rss", "idle_fds", "bulk_fds"}
# The proxy-CPU table's columns: workload, title.
CPU_COLS = [("tcp1", "CPU ms per GiB (1 stream)"), ("tcp4", "CPU ms per GiB (4 streams)"), ("rr", "CPU ms per 1k conns"),
            ("udpmax", "CPU ms per M datagrams (max rate)"), ("udpmany", f"CPU ms per M datagrams ({UDPMANY_FLOWS} flows)"), ("udp1", "CPU µs per datagram (1 flow, iperf3)"),
            ("udp1:in", "the same, per datagram taken in (delivered or not)"),
            ("udp1w", "CPU µs per datagram (1 flow, iperf3 -w 4M)"),
            ("host-rr", "host -> ns: CPU ms per 1k conns"), ("host-tcp1", "host -> ns: CPU ms per GiB")]


def spread(median, runs):
    """A median with the min-max of its repetitions, when there were several."""
    timed = sorted(r for r in (runs or []) if r is not None)
    if len(timed) < 2:
        return fmt(median)
    failed = f", {len(runs) - len(timed)} failed" if len(timed) < len(runs) else ""
    return f"{fmt(median)} ({fmt(timed[0])}–{fmt(timed[-1])}{failed})"


def fmt(x):
    if x is None:
        return "n/a"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def cell(s, direct, ratio=True):
    if s is None:
        return "n/a"
    txt = f"{fmt(s['median'])} ({fmt(s['min'])}–{fmt(s['max'])})"
    if ratio and direct and direct["median"]:
        txt += f" ×{s['median'] / direct['median']:.2f}"
    return txt


def write_markdown(path, meta, proxies, table, cpu, mem, scale, na, measured=True):
    L = []
    L.append("# nsproxy benchmark results")
    L.append("")
    L.append(f"Run {meta['date']} on {meta['cpu']} ({meta['nproc']} CPUs), Linux {meta['kernel']}; "
             f"{meta['reps']} interleaved repetitions of {meta['duration']} s each; load average at start {meta['loadavg']}."
             + (" **Quick mode: short runs, noisy numbers.**" if meta["quick"] else ""))
    L.append("")
    if not measured:
        L.append("(No throughput workloads in this run.)")
        L.append("")
    L.append("Each cell: median (min–max over repetitions) ×ratio to `direct` (the same client and server "
             "talking over loopback in one namespace, no proxy). Throughput: higher is better; latency and loss: lower is better.")
    L.append("")
    L.append("| workload (unit) | " + " | ".join(f"**{p}**" for p in proxies) + " |")
    L.append("|---|" + "---|" * len(proxies))
    for key, wl, _field, title, unit, better in METRICS:
        if not any(table[p].get(key) for p in proxies):
            continue
        row = [f"{title} ({unit}, {'higher' if better else 'lower'} is better)"]
        for p in proxies:
            s = table[p].get(key)
            d = table["direct"].get(key) if p != "direct" else None
            row.append(cell(s, d, ratio=(p != "direct" and key not in NO_RATIO)))
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    L.append("Proxy cost: CPU time of the proxy's processes (utime+stime from `/proc/PID/stat`, including "
             "reaped per-connection children) per unit of work, median over repetitions; peak RSS = the largest "
             "sum of VmHWM over the proxy's processes seen during the run.")
    L.append("")
    # A column "workload:variant" is another figure of that workload.
    known = meta.get("workloads", [w.split(":")[0] for w, _ in CPU_COLS])
    cols = [(w, t) for w, t in CPU_COLS if w.split(":")[0] in known]
    L.append("| proxy | " + " | ".join(t for _, t in cols) + " | peak RSS (MiB) | processes / threads at rest |")
    L.append("|---|" + "---|" * (len(cols) + 2))
    for p in proxies:
        if p == "direct":
            continue
        c = cpu.get(p, {})
        vals = [cell(c[w], None, ratio=False) if c.get(w) else "n/a" for w, _ in cols]
        m = mem.get(p, {})
        L.append(f"| **{p}** | " + " | ".join(vals) + f" | {fmt(m.get('peak_mib'))} | {m.get('procs', 'n/a')} / {m.get('threads', 'n/a')} |")
    L.append("")
    if na:
        groups = {}
        for (p, w), why in na.items():
            groups.setdefault((p, why), []).append(w)
        L.append("n/a: " + "; ".join(f"{p} {', '.join(ws)}: {why}" for (p, why), ws in sorted(groups.items(), key=str)))
        L.append("")
    if scale:
        L.append("## Scale: one TCP and one UDP listener in each of N namespaces")
        L.append("")
        L.append("Namespace creation is setup and not timed. *Startup* is from process start until the last "
                 "namespace answers a TCP request through the proxy (a probe retried every 2 ms in that namespace); "
                 "with a rule per namespace, the median of the interleaved repetitions (min–max); "
                 "for nsproxy also until its `ready:` log line. Probes: TCP (and UDP for nsproxy) request/reply "
                 "through the proxy from a sample of namespaces. Idle CPU: over "
                 f"{scale[0].get('idle_window', 3)} s with no traffic.")
        L.append("")
        L.append("| proxy | N namespaces | listeners | startup: last ns answers (s) | `ready:` line (s) | probes OK | threads | processes | RSS (MiB) | fds | idle CPU (%) | notes |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for s in scale:
            L.append(
                f"| **{s['proxy']}** | {s['n']} | {s.get('listeners', 'n/a')} | {spread(s.get('startup_s'), s.get('startup_runs'))} | "
                f"{spread(s.get('ready_s'), s.get('ready_runs'))} | "
                f"{s.get('probes', 'n/a')} | {s.get('threads', 'n/a')} | {s.get('procs', 'n/a')} | {fmt(s.get('rss_mib'))} | "
                f"{s.get('fds', 'n/a')} | {fmt(s.get('idle_cpu_pct'))} | {s.get('error', '')} |"
            )
        L.append("")
        slopes = memory_per_listener(scale)
        if slopes:
            L.append("Memory per listener: the RSS slope between the smallest and the largest N at which every "
                     "listener opened (what each further listener costs, fixed costs excluded): "
                     + "; ".join(f"**{p}** {fmt(kib)} KiB (N = {n1} → {n2})" for p, kib, n1, n2 in slopes) + ".")
            L.append("")
    L.append("## How each path is set up")
    L.append("")
    for p in proxies:
        L.append(f"- **{p}**: {meta['notes'].get(p, '')}")
    L.append("")
    L.append("Versions: " + "; ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    L.append("")
    L.append("![benchmark](latest.png)")
    L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L))


def memory_per_listener(scale):
    """[(proxy, KiB per listener, n1, n2)] from scale rows where every listener opened."""
    rows = {}
    for s in scale:
        m = re.match(r"(\d+)(?: of (\d+))?", str(s.get("listeners", "")))
        if not m or s.get("rss_mib") is None or s.get("error") or (m.group(2) and m.group(1) != m.group(2)):
            continue
        rows.setdefault(s["proxy"], []).append((s["n"], int(m.group(1)), s["rss_mib"]))
    out = []
    for p, pts in rows.items():
        pts.sort()
        if len(pts) >= 2 and pts[-1][1] > pts[0][1]:
            (n1, l1, r1), (n2, l2, r2) = pts[0], pts[-1]
            out.append((p, (r2 - r1) * 1024 / (l2 - l1), n1, n2))
    return out


def write_plot(out_dir, logs, proxies, table, meta):
    if not shutil.which("gnuplot"):
        log("gnuplot not found: no plot")
        return
    panels = [m for m in METRICS if m[0] in PLOT_KEYS and any(table[p].get(m[0]) for p in proxies)]
    if not panels:
        return
    cols = 4 if len(panels) > 9 else 3 if len(panels) > 4 else 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    script = [
        f"set terminal pngcairo size {500 * cols},{450 * rows} font 'DejaVu Sans,10'",
        f"set output '{os.path.join(out_dir, 'latest.png')}'",
        f"set multiplot layout {rows},{cols} title 'nsproxy vs HAProxy, pasta, socat, nginx (across two namespaces; host -> ns where marked) "
        f"(median, min–max bars; {meta['reps']} reps × {meta['duration']} s{', QUICK MODE: noisy' if meta['quick'] else ''})'",
        "set style fill solid 0.75 border -1",
        "set boxwidth 0.7",
        "set grid ytics",
        "set yrange [0:*]",
        "set offsets 0.5, 0.5, graph 0.12, 0",
        "set xtics rotate by -30 nomirror",
        "unset key",
    ]
    for key, wl, field, title, unit, better in panels:
        dat = os.path.join(logs, f"plot-{key}.dat")
        with open(dat, "w") as f:
            # name median min max colour label label_y
            for p in proxies:
                s = table[p].get(key)
                colour = ("0xee7733" if p == "nsproxy" else "0xf4b183" if p.startswith("nsproxy-") else "0x999999" if p == "direct"
                          else "0x228833" if p == "pasta" else "0x4477aa")
                if s is None:
                    f.write(f'{p} NaN NaN NaN {colour} "n/a" 0\n')
                else:
                    f.write(f'{p} {s["median"]} {s["min"]} {s["max"]} {colour} "{fmt(s["median"])}" {s["max"]}\n')
        script.append(f"set title \"{title} ({'higher' if better else 'lower'} is better)\"")
        script.append(f"set ylabel '{unit}'")
        script.append(
            f"plot '{dat}' using 0:2:5:xtic(1) with boxes lc rgb variable, "
            f"'' using 0:2:3:4 with yerrorbars lc rgb 'black' pt 0, "
            f"'' using 0:7:6 with labels offset 0,0.8 font ',9'"
        )
    script.append("unset multiplot")
    gp = os.path.join(logs, "plot.gp")
    with open(gp, "w") as f:
        f.write("\n".join(script) + "\n")
    r = subprocess.run(["gnuplot", gp], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        log("gnuplot failed: " + r.stderr[-500:])


def versions():
    def first(argv):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except Exception:
            return "?"

    def word(text, pattern):
        m = re.search(pattern, text)
        return m.group(1) if m else "?"

    socat = subprocess.run(["socat", "-V"], capture_output=True, text=True, timeout=10).stdout
    return {
        "nsproxy": word(first([ARGS.nsproxy, "--version"]), r"(\d\S*)"),
        "HAProxy": word(first(["haproxy", "-v"]), r"version (\S+)"),
        "socat": word(socat, r"socat version (\S+)"),
        "nginx": word(first(["nginx", "-v"]), r"nginx/(\S+)"),
        "iperf3": word(first(["iperf3", "--version"]), r"iperf (\S+)"),
        "pasta": first(["dpkg-query", "-W", "-f", "${Version}", "passt"]) if shutil.which("pasta") else "?",
        "loadgen": "examples/loadgen.rs",
    }


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


# ------------------------------------------------------------------ scale


def last_line(path, pattern="ALERT"):
    try:
        with open(path, errors="replace") as f:
            lines = [l.strip() for l in f if l.strip()]
    except OSError:
        return "?"
    hits = [l for l in lines if pattern in l] or lines
    return hits[-1][:200] if hits else "?"


def probe_while_alive(h, ns, port, proc, within, give_up=lambda: False):
    """Probe ns:port until it answers (True), `within` passes, `proc` exits or give_up() (False)."""
    pr = h.spawn(f"probe-{ns}", [h.loadgen, "probe", "--target", f"{LOCAL}:{port}", "--within", f"{within}s"], ns=ns,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + within + 20
    while time.monotonic() < deadline:
        rc = pr.poll()
        if rc is not None:
            h.stop(pr)
            return rc == 0
        if proc.poll() is not None or give_up():
            break
        time.sleep(0.005)
    h.stop(pr, grace=0.5)
    return False


def scale_run(h, n, workers, with_haproxy, idle_window=3, shape="one-rule"):
    """shape "one-rule": a TCP (and a UDP) rule listing all N namespaces, HAProxy one frontend with N
    binds; "per-ns": a TCP and a UDP rule per namespace (2N rules, a generated config's shape),
    HAProxy one frontend per namespace."""
    fd_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    names = [f"{h.prefix}-k{i}" for i in range(n)]
    log(f"scale N={n}: creating {n} namespaces (setup, not timed)")
    t = time.monotonic()
    h.add_netns(names)
    log(f"scale N={n}: namespaces ready in {time.monotonic() - t:.1f} s")
    sample = sorted(set([0, n - 1] + [int(i * (n - 1) / 9) for i in range(10)])) if n > 1 else [0]
    results = []
    # Start-up with a generated config's shape is a headline figure: measured `reps` times, the
    # proxies interleaved, and reported as the median with min-max (see merge_reps).
    reps = max(1, ARGS.startup_reps) if shape == "per-ns" else 1
    try:
        for rep in range(reps):
            if reps > 1:
                log(f"scale N={n}: start-up repetition {rep + 1} of {reps}")
            # ---- nsproxy: TCP and UDP listeners, then TCP only (like for like with HAProxy)
            udp_ok = True
            for protos in (("tcp", "udp"), ("tcp",)):
                if protos == ("tcp",) and ((not with_haproxy and udp_ok) or shape == "per-ns"):
                    continue
                res = scale_nsproxy(h, n, names, sample, workers, protos, fd_hard, idle_window, shape)
                results.append(res)
                udp_ok = "udp" in protos and not res.get("no_udp")
                if res.get("no_udp"):
                    break  # the first run was TCP only already

            # ---- HAProxy, TCP only
            if with_haproxy:
                hcfg = os.path.join(h.work, f"scale-{n}-haproxy.cfg")
                with open(hcfg, "w") as f:
                    f.write(f"global\n    nbthread {workers}\n    maxconn {n + 256}\ndefaults\n    mode tcp\n    timeout connect 5s\n"
                            "    timeout client 60s\n    timeout server 60s\n")
                    if shape == "per-ns":
                        for i, x in enumerate(names):
                            f.write(f"frontend fe{i}\n    bind {LOCAL}:{SCALE_PORT} namespace {x}\n    default_backend be\n")
                    else:
                        f.write("frontend fe\n")
                        for x in names:
                            f.write(f"    bind {LOCAL}:{SCALE_PORT} namespace {x}\n")
                        f.write("    default_backend be\n")
                    f.write(f"backend be\n    server s1 {LOCAL}:{SCALE_TCP_UPSTREAM} namespace {h.srv}\n")
                t0 = time.monotonic()
                hp = h.spawn(f"scale-{n}-haproxy", ["haproxy", "-db", "-f", hcfg])
                ok_last = probe_while_alive(h, names[-1], SCALE_PORT, hp, within=300)
                res = {"proxy": "haproxy (TCP)" if shape != "per-ns" else "haproxy (TCP, frontend per ns)", "n": n, "startup_s": (time.monotonic() - t0) if ok_last else None,
                       "listeners": f"{n} TCP configured", "idle_window": idle_window}
                if hp.poll() is not None:
                    res["error"] = (f"needs ~{3 * n + 600} fds; the hard RLIMIT_NOFILE here is {fd_hard}; " if 3 * n + 600 > fd_hard else "") + f"haproxy exited with status {hp.returncode}: " + last_line(os.path.join(h.logs, f"scale-{n}-haproxy.err"))
                else:
                    res.update(scale_measure(h, hp, names, sample, False, idle_window))
                results.append(res)
                log(f"scale N={n} haproxy: {res}")
                h.stop(hp)
    finally:
        log(f"scale N={n}: removing the {n} namespaces")
        h.del_netns(names)
    results = merge_reps(results)
    for r in results:
        r["shape"] = shape
    return results


def merge_reps(results):
    """One result per proxy: the repetition with the median start-up, with every repetition's
    start-up (and `ready:` line) kept beside it for the min-max."""
    by = {}
    for r in results:
        by.setdefault(r["proxy"], []).append(r)
    out = []
    for runs in by.values():
        if len(runs) == 1:
            out.append(runs[0])
            continue
        timed = sorted((r for r in runs if r.get("startup_s") is not None), key=lambda r: r["startup_s"])
        pick = dict(timed[len(timed) // 2] if timed else runs[-1])
        pick["startup_runs"] = [r.get("startup_s") for r in runs]
        readies = sorted(r["ready_s"] for r in runs if r.get("ready_s") is not None)
        if readies:
            pick["ready_s"] = readies[len(readies) // 2]
            pick["ready_runs"] = readies
        out.append(pick)
    return out


def scale_nsproxy(h, n, names, sample, workers, protos, fd_hard, idle_window, shape="one-rule"):
    tag = "+".join(protos) + ("-per-ns" if shape == "per-ns" else "")
    cfg = os.path.join(h.work, f"scale-{n}-{tag}.toml")

    def write(protos):
        ns_list = ", ".join(f'"{x}"' for x in names)
        with open(cfg, "w") as f:
            f.write(f"workers = {workers}\n\n")
            if shape == "per-ns":
                for i, x in enumerate(names):
                    for proto in protos:
                        up = SCALE_TCP_UPSTREAM if proto == "tcp" else SCALE_UDP_UPSTREAM
                        f.write(f'[[proxy]]\nname = "{proto}{i}"\nprotocol = "{proto}"\nlisten = "{LOCAL}:{SCALE_PORT}"\n'
                                f'netns = ["{x}"]\nupstream = "{LOCAL}:{up}"\nupstream_netns = "{h.srv}"\n\n')
                return
            for proto in protos:
                up = SCALE_TCP_UPSTREAM if proto == "tcp" else SCALE_UDP_UPSTREAM
                f.write(f'[[proxy]]\nname = "scale-{proto}"\nprotocol = "{proto}"\nlisten = "{LOCAL}:{SCALE_PORT}"\n'
                        f'netns = [{ns_list}]\nupstream = "{LOCAL}:{up}"\nupstream_netns = "{h.srv}"\n\n')

    write(protos)
    no_udp = False
    if "udp" in protos and h.run([h.nsproxy, "check", "--config", cfg], timeout=120).returncode != 0:
        protos, no_udp = ("tcp",), True
        write(protos)
    label = f"nsproxy ({'+'.join(p.upper() for p in protos)}{', rule per ns' if shape == 'per-ns' else ''})"
    ready = {}
    errlog = open(os.path.join(h.logs, f"scale-{n}-nsproxy-{tag}.err"), "wb")
    t0 = time.monotonic()
    p = h.spawn(f"scale-{n}-nsproxy-{tag}",
                [h.nsproxy, "--log-level", "info,nsproxy::proxy=warn", "run", "--config", cfg] + nsproxy_run_opts(h, f"scale{n}{shape}"),
                stderr=subprocess.PIPE)

    def reader():
        for line in p.stderr:
            errlog.write(line)
            if b"ready:" in line and "t" not in ready:
                ready["t"] = time.monotonic() - t0
                ready["line"] = line.decode(errors="replace").strip()
        errlog.close()

    rt = threading.Thread(target=reader, daemon=True)
    rt.start()
    # Once nsproxy has said it is ready, the last namespace gets 5 s more (it may have failed).
    ok_last = probe_while_alive(h, names[-1], SCALE_PORT, p, within=600,
                                give_up=lambda: "t" in ready and time.monotonic() - t0 > ready["t"] + 5)
    startup = time.monotonic() - t0
    deadline = time.monotonic() + 600
    while "t" not in ready and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    res = {"proxy": label, "n": n, "startup_s": startup if ok_last else None, "ready_s": ready.get("t"), "idle_window": idle_window}
    m = re.search(r"ready: (\d+) of (\d+) binding", ready.get("line", ""))
    res["listeners"] = f"{m.group(1)} of {m.group(2)}" if m else "?"
    notes = []
    # One fd per listener, plus namespace fds held while a chunk of listeners is opened (nsproxy
    # opens the bindings of at most 1,024 namespaces at a time and releases the fds of namespaces
    # it only listens in), plus a few of its own.
    need = len(protos) * n + 1100
    if need > fd_hard:
        notes.append(f"needs ~{need} fds; the hard RLIMIT_NOFILE here is {fd_hard}")
    if p.poll() is not None:
        notes.append(f"nsproxy exited with status {p.returncode}")
    else:
        res.update(scale_measure(h, p, names, sample, "udp" in protos, idle_window))
    if no_udp:
        notes.append("this nsproxy build has no UDP")
        res["no_udp"] = True
    if notes:
        res["error"] = "; ".join(notes)
    log(f"scale N={n} {label}: {res}")
    h.stop(p)
    rt.join(timeout=5)
    return res


def scale_measure(h, p, names, sample, udp, idle_window):
    ok = tried = 0
    for i in sample:
        tried += 1
        ok += h.probe(names[i], SCALE_PORT, within=5)
        if udp:
            tried += 1
            ok += h.probe(names[i], SCALE_PORT, udp=True, within=5)
    time.sleep(0.5)
    st = tree_stats([p.pid])
    c0 = tree_cpu_ticks([p.pid])
    time.sleep(idle_window)
    c1 = tree_cpu_ticks([p.pid])
    return {
        "probes": f"{ok}/{tried}",
        "threads": st["threads"],
        "procs": st["procs"],
        "rss_mib": st["rss_kib"] / 1024,
        "fds": st["fds"],
        "idle_cpu_pct": 100.0 * (c1 - c0) / HZ / idle_window,
    }


def report(out, logs, meta, raw, mem, scale):
    """Aggregates the measurements and writes latest.md, latest.png and latest.json."""
    proxies = meta.get("proxies") or list(dict.fromkeys(r["proxy"] for r in raw))
    workloads = meta.get("workloads") or list(dict.fromkeys(r["workload"] for r in raw))
    os.makedirs(logs, exist_ok=True)
    # ---- aggregate
    table = {p: {} for p in proxies}
    cpu = {p: {} for p in proxies}
    for key, wl, field, *_ in METRICS:
        for p in proxies:
            vals = [r["result"].get(field) for r in raw if r["proxy"] == p and r["workload"] == wl and r["result"]]
            table[p][key] = summarize(vals)
    for p in proxies:
        for wl in workloads:
            vals = [r.get("cpu_ms_per_unit") for r in raw if r["proxy"] == p and r["workload"] == wl and r.get("cpu_ms_per_unit") is not None]
            cpu[p][wl] = summarize(vals)
        if "udp1" in workloads:
            vals = [r["cpu_us_per_taken_in"] for r in raw if r["proxy"] == p and "cpu_us_per_taken_in" in r]
            cpu[p]["udp1:in"] = summarize(vals)
    ok = {(r["proxy"], r["workload"]) for r in raw if r["result"]}
    na = {(r["proxy"], r["workload"]): r["error"] for r in raw if not r["result"] and (r["proxy"], r["workload"]) not in ok}

    md = os.path.join(out, "latest.md")
    write_markdown(md, meta, proxies, table, cpu, mem, scale, na, measured=bool(raw))
    write_plot(out, logs, proxies, table, meta)
    with open(os.path.join(out, "latest.json"), "w") as f:
        json.dump({"meta": meta, "raw": raw, "scale": scale, "table": table, "cpu": cpu, "mem": mem}, f, indent=1, default=str)

    # ---- console summary
    print()
    print(f"{'metric':45s} " + " ".join(f"{p:>26s}" for p in proxies))
    for key, wl, field, title, unit, _ in METRICS:
        if not any(table[p].get(key) for p in proxies):
            continue
        cells = []
        for p in proxies:
            s, d = table[p].get(key), table["direct"].get(key)
            if s is None:
                cells.append(f"{'n/a':>26s}")
                continue
            r = f" x{s['median'] / d['median']:.2f}" if p != "direct" and d and d["median"] and key not in NO_RATIO else ""
            cells.append(f"{fmt(s['median']) + ' [' + fmt(s['min']) + '-' + fmt(s['max']) + ']' + r:>26s}")
        print(f"{title + ' (' + unit + ')':45.45s} " + " ".join(cells))
    for s in scale:
        print(f"scale {s['proxy']:8s} N={s['n']}: startup {fmt(s.get('startup_s'))} s, ready line {fmt(s.get('ready_s'))} s, "
              f"probes {s.get('probes')}, threads {s.get('threads')}, RSS {fmt(s.get('rss_mib'))} MiB, fds {s.get('fds')}, idle CPU {fmt(s.get('idle_cpu_pct'))} % {s.get('error', '')}")
    print()
    log(f"wrote {md}, {os.path.join(out, 'latest.png')}, latest.json; logs in {logs}")


# ------------------------------------------------------------------ config scale

CONFIG_RULES = [1000, 2000, 4000, 8000]
CONFIG_UNKNOWN = [10000, 40000]


def config_rules_text(n):
    """A generated config of the common shape at scale: one rule per tenant and protocol (TCP and
    UDP on the same port), each listening in its tenant's namespace. The namespaces do not exist
    (unlikely names), so `check` also looks each one up and reports it as waiting."""
    out = []
    for i in range(n):
        proto = "tcp" if i % 2 == 0 else "udp"
        out.append(f'[[proxy]]\nname = "t{i // 2}-{proto}"\nprotocol = "{proto}"\nlisten = "0.0.0.0:7000"\n'
                   f'netns = ["nsbcfg-absent-{i // 2}"]\nupstream = "127.0.0.1:9000"\n')
    return "\n".join(out)


def config_unknown_text(n):
    """One valid rule and `n` misspelt top-level keys: `n` problems, each with its line and column."""
    head = '[[proxy]]\nname = "r"\nprotocol = "tcp"\nlisten = "127.0.0.1:7000"\nnetns = ["host"]\nupstream = "127.0.0.1:9000"\n'
    return "".join(f"unknown_key_{i} = 1\n" for i in range(n)) + head


def time_check(nsproxy, path):
    """Runs `nsproxy check` once; (wall s, user+sys CPU s, exit code, stderr lines)."""
    t0 = time.monotonic()
    p = subprocess.Popen([nsproxy, "check", "--config", path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return wall, ru.ru_utime + ru.ru_stime, p.returncode, err.count(b"\n")


def config_scale(nsproxy, out_dir, rule_counts=CONFIG_RULES, unknown_counts=CONFIG_UNKNOWN, reps=3):
    """Times `nsproxy check` on generated configs (needs no root and no namespace): N rules, and
    N unknown keys (N problems). The median of `reps` runs each. Writes config-scale.md/json."""
    work = tempfile.mkdtemp(prefix="nsbench-config.")
    rows = []
    try:
        cases = [("rules", n, config_rules_text(n), 0) for n in rule_counts]
        cases += [("unknown keys", n, config_unknown_text(n), 1) for n in unknown_counts]
        for kind, n, text, want_code in cases:
            path = os.path.join(work, f"{kind.replace(' ', '-')}-{n}.toml")
            with open(path, "w") as f:
                f.write(text)
            runs = [time_check(nsproxy, path) for _ in range(reps)]
            codes = {r[2] for r in runs}
            row = {"kind": kind, "n": n, "bytes": len(text),
                   "wall_s": statistics.median(r[0] for r in runs),
                   "cpu_s": statistics.median(r[1] for r in runs),
                   "exit": sorted(codes), "stderr_lines": runs[0][3]}
            if codes != {want_code}:
                row["error"] = f"exit {sorted(codes)}, expected {want_code}"
            rows.append(row)
            log(f"config scale: {n} {kind}: check {row['wall_s']:.3f} s wall, {row['cpu_s']:.3f} s CPU "
                f"(median of {reps}), exit {sorted(codes)}, {row['stderr_lines']} message line(s)"
                + (f"; {row['error']}" if "error" in row else ""))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
    md = os.path.join(out_dir, "config-scale.md")
    with open(md, "w") as f:
        f.write(f"# `nsproxy check` on generated configs\n\n{datetime.datetime.now():%Y-%m-%d %H:%M}, "
                f"{cpu_model()} ({os.cpu_count()} CPUs), load {' '.join(open('/proc/loadavg').read().split()[:3])}; "
                f"median of {reps} runs each.\n\n")
        f.write("| config | size | wall | CPU (user+sys) | exit | messages |\n|---|---:|---:|---:|---:|---:|\n")
        for r in rows:
            f.write(f"| {r['n']} {r['kind']} | {r['bytes'] / 1024:.0f} KiB | {r['wall_s']:.3f} s | {r['cpu_s']:.3f} s | "
                    f"{'/'.join(map(str, r['exit']))} | {r['stderr_lines']} |\n")
    with open(os.path.join(out_dir, "config-scale.json"), "w") as f:
        json.dump({"reps": reps, "rows": rows}, f, indent=1)
    log(f"wrote {md}")
    return 1 if any("error" in r for r in rows) else 0


# ------------------------------------------------------------------ main


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 reps of 2 s, scale N=100")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--duration", type=int, help="seconds per measurement")
    ap.add_argument("--scale", help="comma-separated N values, or 'none' (default 1000,10000; quick 100)")
    ap.add_argument("--no-fit", action="store_true",
                    help="do not add the largest N that fits the fd limit when a --scale N does not")
    ap.add_argument("--haproxy-scale-max", type=int, default=10000, help="largest N to try HAProxy at")
    ap.add_argument("--startup-rules", help="comma-separated N values, or 'none': N namespaces with one TCP and one UDP "
                    "rule each (2N rules), against HAProxy with one frontend per namespace (default 1000,5000; quick 100)")
    ap.add_argument("--startup-reps", type=int, help="repetitions of each --startup-rules start-up, interleaved "
                    "(default: --reps); the median is reported with min-max")
    ap.add_argument("--startup-haproxy-max", type=int, default=1000, help="largest N of --startup-rules to run HAProxy at")
    ap.add_argument("--idle-conns", type=int, default=2000, help="connections the idle workload holds open (default 2000)")
    ap.add_argument("--proxies", default=",".join(ALL_PROXIES))
    ap.add_argument("--workloads", default=",".join(ALL_WORKLOADS))
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="threads/processes per proxy (default: CPUs)")
    ap.add_argument("--udp-rate", type=int, default=50000)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--from-json", metavar="FILE", help="only rewrite latest.md/png from a latest.json (no measuring)")
    ap.add_argument("--state-dir")
    ap.add_argument("--nsproxy")
    ap.add_argument("--loadgen")
    ap.add_argument("--nsproxy-before", metavar="PATH",
                    help="another nsproxy build, measured in the same run as proxy `nsproxy-before` "
                         "(add it to --proxies) for a before/after comparison")
    ap.add_argument("--config-scale", action="store_true",
                    help="only time `nsproxy check` on generated configs (no root, no namespaces); needs --nsproxy")
    ap.add_argument("--config-rules", default=",".join(map(str, CONFIG_RULES)), help="rule counts for --config-scale")
    ap.add_argument("--config-unknown", default=",".join(map(str, CONFIG_UNKNOWN)),
                    help="unknown-key counts for --config-scale")
    ARGS = args = ap.parse_args()
    if args.config_scale:
        if not args.nsproxy:
            ap.error("--config-scale needs --nsproxy (a release build: target/release/nsproxy)")
        counts = lambda v: [int(x) for x in v.split(",") if x and x != "none"]
        return config_scale(args.nsproxy, args.out, counts(args.config_rules), counts(args.config_unknown),
                            reps=args.reps or 3)
    if args.from_json:
        with open(args.from_json) as f:
            j = json.load(f)
        report(args.out, os.path.join(args.out, "logs"), j["meta"], j["raw"], j["mem"], j["scale"])
        return 0
    if not (args.state_dir and args.nsproxy and args.loadgen):
        ap.error("--state-dir, --nsproxy and --loadgen are required (bench/run.sh passes them)")
    reps = args.reps or (2 if args.quick else 5)
    args.startup_reps = args.startup_reps or reps
    dur = args.duration or (2 if args.quick else 5)
    scale_ns = args.scale or ("100" if args.quick else "1000,10000")
    scale_ns = [] if scale_ns == "none" else [int(x) for x in scale_ns.split(",") if x]
    startup_ns = args.startup_rules or ("100" if args.quick else "1000,5000")
    startup_ns = [] if startup_ns == "none" else [int(x) for x in startup_ns.split(",") if x]
    proxies = [p for p in args.proxies.split(",") if p]
    workloads = [w for w in args.workloads.split(",") if w and w != "none"]
    if "nsproxy-before" in proxies and not args.nsproxy_before:
        ap.error("proxy nsproxy-before needs --nsproxy-before PATH")
    for p in proxies:
        if p not in ALL_PROXIES and p not in NSPROXY_VARIANTS:
            sys.exit(f"unknown proxy {p}; known: {ALL_PROXIES + list(NSPROXY_VARIANTS)[1:]}")
    for w in workloads:
        if w not in ALL_WORKLOADS:
            sys.exit(f"unknown workload {w}; known: {ALL_WORKLOADS}")
    if "direct" not in proxies:
        proxies.insert(0, "direct")
    os.makedirs(args.out, exist_ok=True)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)
    # Many namespaces mean many fds (nsproxy raises its soft limit to the hard one).
    # Where the hard limit cannot be raised (no CAP_SYS_RESOURCE in the initial user namespace),
    # the soft one still goes up to it: the idle-connection clients and servers inherit it.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    for want in ((1 << 20, 1 << 20), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, want)
            break
        except (ValueError, OSError):
            pass

    h = Harness(args)
    meta = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "kernel": platform.release(),
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "reps": reps,
        "duration": dur,
        "quick": args.quick,
        "loadavg": " ".join(open("/proc/loadavg").read().split()[:3]),
        "versions": versions(),
        "notes": {},
    }
    raw = []  # every measurement
    na = {}
    try:
        log(f"topology: client ns {h.cli}, server ns {h.srv} (loopback only, no link between them)")
        h.add_netns([h.cli, h.srv])
        start_servers(h)
        direct_ports = dict(SRV_PORTS, **{"udp-iperf": SRV_PORTS["iperf"], "h-iperf": SRV_PORTS["iperf"], "h-rr": SRV_PORTS["rr"]})
        px = {"direct": Proxy("direct", h.srv, direct_ports, [], "", hns=h.srv)}
        px["direct"].notes = ("no proxy: the same clients run in the server namespace and talk to the same servers over its "
                              "loopback (one loopback hop, as the proxied paths have on each side); also for host -> ns, "
                              "where the same clients in the host namespace would have no path to the servers at all")
        if workloads:
            for variant in NSPROXY_VARIANTS:
                if variant in proxies:
                    px[variant] = start_nsproxy(h, args.workers, variant)
            if "haproxy" in proxies:
                px["haproxy"] = start_haproxy(h, args.workers)
            if "socat" in proxies:
                px["socat"] = start_socat(h)
            if "nginx" in proxies:
                px["nginx"] = start_nginx(h, args.workers)
            if "pasta" in proxies:
                px["pasta"] = start_pasta(h)
            for name in proxies:
                meta["notes"][name] = px[name].notes
                if name == "direct":
                    continue
                for kind, ns in (("rr", px[name].ns), ("h-rr", px[name].hns)):
                    port = px[name].ports.get(kind)
                    if port and not h.probe(ns, port, within=15):
                        raise RuntimeError(f"{name} does not answer on {port} ({ns or 'host ns'}); see {h.logs}")
            log("all proxies answer; measuring")
        else:
            proxies = [p for p in proxies if p in px]
        sampler = MemSampler()
        sampler.start({n: px[n].pids() for n in proxies if n != "direct"})
        total = reps * len(workloads) * len(proxies)
        k = 0
        for rep in range(reps):
            for wl in workloads:
                order = proxies[rep % len(proxies) :] + proxies[: rep % len(proxies)]  # rotate per repetition
                for name in order:
                    k += 1
                    p = px[name]
                    c0 = tree_cpu_ticks(p.pids()) if p.roots else 0
                    t0 = time.monotonic()
                    res, err = run_workload(h, p, wl, dur, args.udp_rate, args.idle_conns)
                    wall = time.monotonic() - t0
                    time.sleep(0.3)  # let per-connection children exit and be reaped
                    c1 = tree_cpu_ticks(p.pids()) if p.roots else 0
                    rec = {"rep": rep + 1, "proxy": name, "workload": wl, "result": res, "error": err, "wall_s": wall}
                    if res is not None and p.roots and work_units(wl, res)[0] is not None:
                        units, unit = work_units(wl, res)
                        rec["cpu_s"] = (c1 - c0) / HZ
                        rec["cpu_ms_per_unit"] = 1000 * rec["cpu_s"] / units if units else None
                        rec["unit"] = unit
                        if wl == "udp1" and res.get("taken_in"):
                            rec["cpu_us_per_taken_in"] = 1e6 * rec["cpu_s"] / res["taken_in"]
                    if res is None:
                        na[(name, wl)] = err
                    raw.append(rec)
                    short = {kk: round(v, 3) if isinstance(v, float) else v for kk, v in (res or {}).items()}
                    log(f"[{k}/{total}] rep {rep + 1} {wl:7s} {name:8s} {short if res else 'n/a: ' + str(err)}"
                        + (f" cpu {rec['cpu_s']:.2f}s" if "cpu_s" in rec else ""))
        sampler.stop()
        mem = {}
        for name in proxies:
            if name == "direct":
                continue
            if name not in px:
                continue
            st = tree_stats(px[name].pids())
            mem[name] = {"peak_mib": sampler.peak.get(name, 0) / 1024, "procs": st["procs"], "threads": st["threads"]}
        # Throughput proxies off before the scale runs.
        for name in proxies:
            for r in px[name].roots:
                h.stop(r)
        scale = []
        fd_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        fit = max(100, (fd_hard - 600) // 2 // 100 * 100)  # nsproxy: 2 listeners per namespace + ~600
        if any(2 * n + 600 > fd_hard for n in scale_ns) and fit not in scale_ns and not args.no_fit:
            log(f"the hard fd limit ({fd_hard}) is too low for N={max(scale_ns)}; also measuring N={fit}, the most that fits")
            scale_ns = sorted(set(scale_ns + [fit]))
        # HAProxy keeps an fd per namespace and sizes for maxconn ~ N: about 3N fds. Its largest N
        # that fits too, so that both have a point beyond N = 1000 (memory per listener).
        hfit = max(100, (fd_hard - 600) // 3 // 100 * 100)
        if ("haproxy" in args.proxies.split(",") and any(3 * n + 600 > fd_hard for n in scale_ns)
                and hfit not in scale_ns and not args.no_fit):
            log(f"also measuring N={hfit}, the most HAProxy fits under the fd limit ({fd_hard})")
            scale_ns = sorted(set(scale_ns + [hfit]))
        for n in scale_ns:
            scale += scale_run(h, n, args.workers, "haproxy" in args.proxies.split(",") and n <= args.haproxy_scale_max)
        # Start-up with a generated config's shape: one TCP and one UDP rule per namespace.
        for n in startup_ns:
            if 2 * n + 600 > fd_hard:
                log(f"start-up N={n}: needs ~{2 * n + 600} fds, the hard limit is {fd_hard}; measured anyway")
            scale += scale_run(h, n, args.workers, "haproxy" in args.proxies.split(",") and n <= args.startup_haproxy_max,
                               shape="per-ns")
    except Interrupted as e:
        log(f"interrupted ({e}); cleaning up")
        h.cleanup()
        return 130
    except Exception:
        log("failed; cleaning up")
        h.cleanup()
        raise
    h.cleanup()

    meta["proxies"], meta["workloads"] = proxies, workloads
    report(args.out, h.logs, meta, raw, mem, scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
