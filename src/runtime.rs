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
