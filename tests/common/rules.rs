//! Config text for the end-to-end tests: one place that knows the TOML
//! shape of a rule (also used by the SCTP tests, which run in the VM without
//! the rest of `common`).

#![allow(dead_code)]

/// A config with two workers and `rules`.
pub fn config(rules: &str) -> String {
    format!("workers = 2\n{rules}")
}

/// One `[[proxy]]` rule of `protocol`; `extra` adds keys, one per line (or
/// nothing, when empty).
pub fn rule_of(
    protocol: &str,
    name: &str,
    listen: &str,
    netns: &[&str],
    upstream: &str,
    upstream_netns: &str,
    extra: &str,
) -> String {
    let list: Vec<String> = netns.iter().map(|n| format!("\"{n}\"")).collect();
    format!(
        "[[proxy]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\nlisten = \"{listen}\"\nnetns = [{}]\nupstream = \"{upstream}\"\nupstream_netns = \"{upstream_netns}\"\n{extra}\n",
        list.join(", ")
    )
}
