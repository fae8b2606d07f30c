//! The tokio runtime nsproxy runs on, built so that its thread count is fixed.
//!
//! Total threads = the calling (main) thread + `workers` + the namespace
//! thread, whatever the number of namespaces, listeners and connections.
//! nsproxy never uses tokio's blocking pool (no `spawn_blocking`, no
//! `tokio::fs`, no DNS), and the pool is capped at one thread so that a
//! stray use could not grow it either.

use std::io;

/// The default number of forwarding threads: one per CPU.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Builds a multi-threaded runtime with exactly `workers` worker threads.
pub fn build(workers: usize) -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .max_blocking_threads(1)
        .thread_name("nsproxy-worker")
        .enable_io()
        .enable_time()
        .build()
}

pub use crate::sys::NofileLimit;

/// Raises the open-file limit as far as nsproxy may (see the README's
/// "Threads and limits" section); returns the limit now in force.
pub fn raise_fd_limit() -> io::Result<NofileLimit> {
    crate::sys::raise_nofile_limit()
}

/// Most fds [`presize_fd_table`] makes room for: 512 KiB of kernel memory
/// for the table, and room for tens of thousands of connections before it
/// must grow again.
pub const FD_TABLE_PRESIZE: u64 = 65_536;

/// Grows the process's fd table now to hold `fds` descriptors (at most
/// [`FD_TABLE_PRESIZE`]). Call it while the process has one thread, before
/// the runtime starts: growing the table later, with several threads,
/// stalls the thread that opens the fd for an RCU grace period at each
/// doubling (tens of milliseconds; five of them in a start-up with 2,000
/// listeners, and one in a worker accepting a connection whenever the
/// number of open fds passes a power of two).
pub fn presize_fd_table(fds: u64) -> io::Result<()> {
    crate::sys::presize_fd_table(fds.min(FD_TABLE_PRESIZE))
}
