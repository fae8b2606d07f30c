//! The TOML front end.
//!
//! The document is walked by hand over the spanned tree of the `toml` parser
//! rather than through serde, so that one pass can report *every* problem
//! (serde stops at the first) and each with its line and column.
//!
//! [`cx`] holds the walk's context and the readers of scalar values,
//! [`rule`] reads one `[[proxy]]` table, [`compound`] the values that are
//! lists or tables, and [`locate`] turns byte offsets into `LINE:COLUMN`.

mod compound;
mod cx;
mod locate;
#[cfg(test)]
mod print;
#[cfg(test)]
mod props;
mod rule;
#[cfg(test)]
mod tests;

use std::ops::Range;

use toml::de::{DeTable, DeValue};

use self::cx::Cx;
use super::{
    Config, ConfigError, MAX_WORKERS, Problem, Rule, check_listen, check_rules, check_user,
};

const TOP_KEYS: &[&str] = &[
    "workers",
    "control_socket",
    "metrics_listen",
    "drain_timeout",
    "user",
    "proxy",
];

/// Parses and checks a TOML configuration; `origin` names it in messages
/// (usually the file path).
pub fn parse_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
    parse_toml_located(text, origin).map(|(config, _)| config)
}

/// Like [`parse_toml`], and also where each rule's namespace references are
/// written (one [`RuleLocations`] per rule, in the order of `rules`), so
/// that `nsproxy check` can point at the entry a finding is about.
pub fn parse_toml_located(
    text: &str,
    origin: &str,
) -> Result<(Config, Vec<RuleLocations>), ConfigError> {
    let mut cx = Cx::new(origin, text);
    let doc = match DeTable::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            cx.problem(
                span,
                None,
                None,
                format!("TOML syntax error: {}", e.message().trim_end()),
            );
            return Err(ConfigError::Invalid(finish(cx, &[])));
        }
    };
    let top = cx.top(doc.get_ref());
    let problems = finish(cx, &top.rules);
    if !problems.is_empty() {
        return Err(ConfigError::Invalid(problems));
    }
    let (rules, locations) = top.rules.into_iter().map(|(r, _, l)| (r, l)).unzip();
    Ok((
        Config {
            workers: top.workers,
            control_socket: top.control_socket,
            metrics_listen: top.metrics_listen,
            drain_timeout: top.drain_timeout,
            user: top.user,
            rules,
        },
        locations,
    ))
}

/// Every problem found, in file order; cross-rule ones after them. A stable
/// sort keeps the problems at one offset in the order they were found.
fn finish(cx: Cx<'_>, rules: &[ReadRule]) -> Vec<Problem> {
    let mut found = cx.problems;
    found.sort_by_key(|(at, _)| *at);
    let mut problems: Vec<Problem> = found.into_iter().map(|(_, p)| p).collect();
    check_rules(
        rules
            .iter()
            .map(|(r, name_loc, at)| (r, name_loc.as_str(), at.netns.as_slice())),
        &mut problems,
    );
    problems
}

/// A rule as read, with where its name is written and its locations.
type ReadRule = (Rule, String, RuleLocations);

/// The top-level keys as read; each `None` when absent or wrong.
struct Top {
    workers: Option<usize>,
    control_socket: Option<std::path::PathBuf>,
    metrics_listen: Option<std::net::SocketAddr>,
    drain_timeout: Option<std::time::Duration>,
    user: Option<String>,
    /// The rules read without a problem.
    rules: Vec<ReadRule>,
}

impl Cx<'_> {
    /// Reads the document's top-level table.
    fn top(&mut self, doc: &DeTable<'_>) -> Top {
        let mut top = Top {
            workers: None,
            control_socket: None,
            metrics_listen: None,
            drain_timeout: None,
            user: None,
            rules: Vec::new(),
        };
        let mut saw_proxy = false;
        for (key, value) in doc.iter() {
            match key.get_ref().as_ref() {
                "workers" => {
                    top.workers = self
                        .integer(value, None, "workers", 1, MAX_WORKERS as i64)
                        .map(|n| n as usize)
                }
                "control_socket" => {
                    top.control_socket = self
                        .string(value, None, "control_socket")
                        .map(std::path::PathBuf::from)
                }
                "metrics_listen" => {
                    top.metrics_listen = self.checked(value, None, "metrics_listen", check_listen)
                }
                "drain_timeout" => top.drain_timeout = self.duration(value, None, "drain_timeout"),
                "user" => top.user = self.checked(value, None, "user", check_user),
                "proxy" => {
                    saw_proxy = true;
                    self.proxy_tables(value.get_ref(), value.span(), &mut top.rules);
                }
                other => self.unknown_key(key, None, other, TOP_KEYS),
            }
        }
        if !saw_proxy {
            self.problem(
                0..0,
                None,
                None,
                "no rules: add at least one [[proxy]] table".into(),
            );
        }
        top
    }

    /// Reads the `[[proxy]]` array; appends the rules read without a problem.
    fn proxy_tables(&mut self, value: &DeValue<'_>, span: Range<usize>, rules: &mut Vec<ReadRule>) {
        match value {
            DeValue::Array(items) if items.iter().all(|t| t.get_ref().is_table()) => {
                for (i, item) in items.iter().enumerate() {
                    if let DeValue::Table(t) = item.get_ref() {
                        if let Some(r) = self.rule(i, item.span(), t) {
                            rules.push(r);
                        }
                    }
                }
            }
            _ => self.problem(
                span,
                None,
                Some("proxy"),
                "`proxy` must be an array of tables: write each rule under its own [[proxy]] header"
                    .into(),
            ),
        }
    }
}

/// Where one rule's namespace references are written, as `FILE:LINE:COLUMN`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuleLocations {
    /// One per entry of [`Rule::netns`], in its order.
    pub netns: Vec<String>,
    /// The `upstream_netns` value; `None` when the key is absent (`host`).
    pub upstream_netns: Option<String>,
}
