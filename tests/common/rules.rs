//! Config text for the end-to-end tests: one place that knows the TOML
//! shape of a rule (also used by the SCTP tests, which run in the VM without
//! the rest of `common`).

#![allow(dead_code)]

use std::fmt;

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
    tcp(name)
        .protocol(protocol)
        .listen(listen)
        .netns(netns)
        .upstream_in(upstream_netns, upstream)
        .extra(extra)
        .to_string()
}

/// One `[[proxy]]` rule, built key by key and written out by `Display`.
///
/// Namespaces are plain strings here; a [`Scenario`](super::Scenario)
/// turns the tags of its own namespaces into their unique names.
#[derive(Clone, Debug)]
pub struct Rule {
    pub protocol: String,
    pub name: String,
    pub listen: String,
    pub netns: Vec<String>,
    pub upstream: String,
    /// `None` leaves the key out (nsproxy's default: its own namespace).
    pub upstream_netns: Option<String>,
    /// Further keys, each a whole `key = value` line.
    pub extra: Vec<String>,
}

/// A `protocol = "tcp"` rule called `name`.
pub fn tcp(name: &str) -> Rule {
    Rule {
        protocol: "tcp".into(),
        name: name.into(),
        listen: String::new(),
        netns: Vec::new(),
        upstream: String::new(),
        upstream_netns: None,
        extra: Vec::new(),
    }
}

/// A `protocol = "udp"` rule called `name`.
pub fn udp(name: &str) -> Rule {
    tcp(name).protocol("udp")
}

/// A `protocol = "sctp"` rule called `name`.
pub fn sctp(name: &str) -> Rule {
    tcp(name).protocol("sctp")
}

impl Rule {
    pub fn protocol(mut self, protocol: &str) -> Rule {
        self.protocol = protocol.into();
        self
    }

    pub fn listen(mut self, addr: &str) -> Rule {
        self.listen = addr.into();
        self
    }

    /// The namespaces to listen in (replacing any given before).
    pub fn netns<S: AsRef<str>>(mut self, list: impl IntoIterator<Item = S>) -> Rule {
        self.netns = list.into_iter().map(|s| s.as_ref().to_owned()).collect();
        self
    }

    /// The upstream address, in nsproxy's own namespace (no `upstream_netns`).
    pub fn upstream(mut self, addr: &str) -> Rule {
        self.upstream = addr.into();
        self
    }

    /// The upstream address inside namespace `ns` (`upstream_netns`).
    pub fn upstream_in(mut self, ns: &str, addr: &str) -> Rule {
        self.upstream = addr.into();
        self.upstream_netns = Some(ns.into());
        self
    }

    /// More keys, one `key = value` per line; an empty string adds nothing.
    pub fn extra(mut self, lines: &str) -> Rule {
        if !lines.is_empty() {
            self.extra.push(lines.into());
        }
        self
    }

    /// This rule with every namespace passed through `f` (tag to name).
    pub fn map_netns(mut self, f: impl Fn(&str) -> String) -> Rule {
        self.netns = self.netns.iter().map(|n| f(n)).collect();
        self.upstream_netns = self.upstream_netns.as_deref().map(&f);
        self
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.netns.iter().map(|n| format!("\"{n}\"")).collect();
        writeln!(f, "[[proxy]]")?;
        writeln!(f, "name = \"{}\"", self.name)?;
        writeln!(f, "protocol = \"{}\"", self.protocol)?;
        writeln!(f, "listen = \"{}\"", self.listen)?;
        writeln!(f, "netns = [{}]", list.join(", "))?;
        writeln!(f, "upstream = \"{}\"", self.upstream)?;
        if let Some(ns) = &self.upstream_netns {
            writeln!(f, "upstream_netns = \"{ns}\"")?;
        }
        writeln!(f, "{}", self.extra.join("\n"))
    }
}

/// The rules one after another, as config text.
pub fn rules(list: &[Rule]) -> String {
    list.iter().map(Rule::to_string).collect()
}
