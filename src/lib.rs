//! nsproxy: listen on and proxy TCP ports inside many Linux network
//! namespaces from one process with a small, fixed number of threads.
//!
//! A socket belongs to the network namespace its creating thread was in at
//! `socket(2)` time, and stays there for life. One dedicated thread
//! ([`netns::Switcher`]) switches in, creates the socket and switches back;
//! from then on the ordinary tokio reactor drives it like any other socket.
//!
//! # Layout
//! - [`netns`]: namespace references and identities, and the one thread that
//!   switches namespaces (the only `setns` in the process).
//! - [`config`]: the configuration model, its TOML and command-line front
//!   ends, and validation that reports every problem with its location.
//! - [`proxy`]: listeners and relays per protocol ([`proxy::tcp`]).
//! - [`server`]: turns a [`config::Config`] into running bindings (one rule in
//!   one namespace each), reports their state, and shuts them down.
//! - [`runtime`]: the tokio runtime with a fixed thread count.
//!
//! The `nsproxy` binary is a thin command-line layer over [`server::run`].

#![deny(unsafe_code)]

pub mod config;
pub mod netns;
pub mod proxy;
pub mod runtime;
pub mod server;
mod sys;
