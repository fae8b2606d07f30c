//! The walk's context, where problems are collected, and the readers of
//! scalar values (strings, integers, checked strings, durations).

use std::ops::Range;

use toml::Spanned;
use toml::de::DeValue;

use super::locate::LineIndex;
use crate::config::{Problem, parse_duration};

/// What the walk carries: where the text came from, its line index, and
/// the problems found so far.
pub(super) struct Cx<'a> {
    origin: &'a str,
    lines: LineIndex,
    /// Each problem with the byte offset it is at, to sort them into file order.
    pub(super) problems: Vec<(usize, Problem)>,
}

impl<'a> Cx<'a> {
    pub(super) fn new(origin: &'a str, text: &str) -> Cx<'a> {
        Cx {
            origin,
            lines: LineIndex::new(text),
            problems: Vec::new(),
        }
    }

    pub(super) fn location(&self, span: Range<usize>) -> String {
        let (line, col) = self.lines.line_col(span.start);
        format!("{}:{line}:{col}", self.origin)
    }

    pub(super) fn problem(
        &mut self,
        span: Range<usize>,
        rule: Option<&str>,
        key: Option<&str>,
        message: String,
    ) {
        let at = span.start;
        self.problems.push((
            at,
            Problem {
                location: self.location(span),
                rule: rule.map(str::to_owned),
                key: key.map(str::to_owned),
                message,
            },
        ));
    }

    pub(super) fn unknown_key(
        &mut self,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        rule: Option<&str>,
        name: &str,
        known: &[&str],
    ) {
        self.problem(
            key.span(),
            rule,
            None,
            format!(
                "unknown key `{name}` (expected one of: {})",
                known.join(", ")
            ),
        );
    }

    pub(super) fn string<'v>(
        &mut self,
        v: &'v Spanned<DeValue<'_>>,
        rule: Option<&str>,
        key: &str,
    ) -> Option<&'v str> {
        match v.get_ref() {
            DeValue::String(s) => Some(s.as_ref()),
            other => {
                self.problem(
                    v.span(),
                    rule,
                    Some(key),
                    format!(
                        "expected a string, found {} {}",
                        article(other.type_str()),
                        other.type_str()
                    ),
                );
                None
            }
        }
    }

    pub(super) fn integer(
        &mut self,
        v: &Spanned<DeValue<'_>>,
        rule: Option<&str>,
        key: &str,
        min: i64,
        max: i64,
    ) -> Option<i64> {
        let DeValue::Integer(i) = v.get_ref() else {
            let t = v.get_ref().type_str();
            self.problem(
                v.span(),
                rule,
                Some(key),
                format!("expected an integer, found {} {t}", article(t)),
            );
            return None;
        };
        match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.problem(
                    v.span(),
                    rule,
                    Some(key),
                    format!("must be between {min} and {max}, got {}", i.as_str()),
                );
                None
            }
        }
    }

    /// Applies a shared check to a string value, reporting its message here.
    pub(super) fn checked<T>(
        &mut self,
        v: &Spanned<DeValue<'_>>,
        rule: Option<&str>,
        key: &str,
        check: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let s = self.string(v, rule, key)?;
        match check(s) {
            Ok(t) => Some(t),
            Err(msg) => {
                self.problem(v.span(), rule, Some(key), msg);
                None
            }
        }
    }

    /// A duration as a string ("250ms", "5s", "2m") or whole seconds.
    pub(super) fn duration(
        &mut self,
        v: &Spanned<DeValue<'_>>,
        rule: Option<&str>,
        key: &str,
    ) -> Option<std::time::Duration> {
        match v.get_ref() {
            DeValue::Integer(_) => self
                .integer(v, rule, key, 1, 86_400)
                .map(|s| std::time::Duration::from_secs(s as u64)),
            _ => self.checked(v, rule, key, parse_duration),
        }
    }

    /// A duration, or `false` for none.
    pub(super) fn optional_duration(
        &mut self,
        v: &Spanned<DeValue<'_>>,
        rule: Option<&str>,
        key: &str,
    ) -> Option<Option<std::time::Duration>> {
        match v.get_ref() {
            DeValue::Boolean(false) => Some(None),
            DeValue::Boolean(true) => {
                self.problem(
                    v.span(),
                    rule,
                    Some(key),
                    "expected a duration such as \"30m\", or false to turn it off; true is not a duration".to_owned(),
                );
                None
            }
            _ => self.duration(v, rule, key).map(Some),
        }
    }
}

pub(super) fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}
