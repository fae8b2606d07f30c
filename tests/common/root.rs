//! The one root check of the end-to-end tests (shared with the SCTP tests,
//! which run in the VM without the rest of `common`).

#![allow(dead_code)]

/// True when this process runs as root (the effective uid, read from /proc
/// so that the tests need no unsafe code for it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
        })
        .is_some_and(|euid| euid == "0")
}

/// True when skipping is a failure (`NSPROXY_REQUIRE_ROOT=1`, as in CI).
pub fn skip_forbidden() -> bool {
    std::env::var("NSPROXY_REQUIRE_ROOT").as_deref() == Ok("1")
}

/// True when the test may run. Without root it prints why it skips, and
/// under `NSPROXY_REQUIRE_ROOT=1` a skip is a failure.
pub fn root_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    if skip_forbidden() {
        panic!(
            "{test}: needs root (network namespaces), and NSPROXY_REQUIRE_ROOT=1 forbids skipping"
        );
    }
    eprintln!("SKIPPED {test}: needs root to create network namespaces");
    false
}

/// The name of the running test: libtest runs each test on a thread named
/// after it.
pub fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("(unnamed test)")
        .to_owned()
}

/// Runs the body of a test that needs root (network namespaces): without
/// root the test says why it skips, or fails under `NSPROXY_REQUIRE_ROOT=1`.
///
/// ```ignore
/// #[test]
/// fn half_close() {
///     as_root(|| {
///         let s = Scenario::with(&["a", "b"]) /* ... */ .start();
///         // the behaviour and its assertions
///     })
/// }
/// ```
pub fn as_root(test: impl FnOnce()) {
    if root_or_skip(&test_name()) {
        test();
    }
}
