//! What `nsproxy check` says about the namespaces a valid config names.
//!
//! The caller looks the namespaces up (as the daemon does, entering each once
//! to know it may) and lists the names under `/run/netns`;
//! [`check_namespaces`] decides what each outcome means for a daemon started
//! with this config now, in the terms of the
//! README's "Namespaces that come and go": a missing name waits and opens
//! when it appears, a pattern follows the names live, a path or `pid:` is
//! looked up when the config is (re)loaded.

use std::collections::HashMap;
use std::fmt;

use super::{Config, RuleLocations};
use crate::netns::routing::Routing;
use crate::netns::{NsError, NsId, NsRef};

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Worth knowing, not a problem: `--strict` accepts it.
    Note,
    /// A binding will not listen now; `--strict` fails on it.
    Warning,
}

/// One thing `check` says about a namespace reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// Where the reference is written (`FILE:LINE:COLUMN`).
    pub location: String,
    pub rule: String,
    /// `netns[N]` or `upstream_netns`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: rule {}: `{}`: {}",
            self.location, self.rule, self.key, self.message
        )
    }
}

/// What [`check_namespaces`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NsReport {
    /// In rule order, each rule's `upstream_netns` first, then its `netns`.
    pub findings: Vec<Finding>,
    /// Bindings a daemon would have now: one per exact reference (listening
    /// or waiting) and one per name a pattern matches now, counted once per
    /// rule.
    pub bindings: usize,
    /// How many `netns` entries are patterns.
    pub patterns: usize,
    /// How many of [`NsReport::bindings`] come from patterns only.
    pub from_patterns: usize,
    /// Rules whose `listen` is a port range (each port is a binding in
    /// each of its namespaces).
    pub ranges: usize,
    /// The ports of those ranges, together.
    pub range_ports: usize,
    /// How many of the warnings are [`routing_findings`]' (which are not
    /// about listening).
    pub routing: usize,
}

impl NsReport {
    /// Findings of one severity.
    pub fn count(&self, severity: Severity) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == severity)
            .count()
    }

    /// The line `check` ends with, after `FILE: OK: `.
    pub fn summary(&self, rules: usize) -> String {
        let mut s = format!("{rules} rule(s), {} binding(s)", self.bindings);
        if self.ranges > 0 {
            s.push_str(&format!(
                " ({} port range(s) of {} port(s) together: one binding per port in each namespace)",
                self.ranges, self.range_ports
            ));
        }
        if self.patterns > 0 {
            s.push_str(&format!(
                " ({} from {} pattern(s) over the namespaces there now; patterns follow them as they come and go)",
                self.from_patterns, self.patterns
            ));
        }
        let warnings = self.count(Severity::Warning) - self.routing;
        if warnings > 0 {
            s.push_str(&format!(
                ", {warnings} namespace warning(s): those bindings do not listen now (each warning says when they will)"
            ));
        }
        if self.routing > 0 {
            s.push_str(&format!(
                ", {} routing warning(s): upstream_source = \"client\" replies would not come back (each warning gives the commands)",
                self.routing
            ));
        }
        let notes = self.count(Severity::Note);
        if notes > 0 {
            s.push_str(&format!(", {notes} note(s)"));
        }
        s
    }
}

/// What a reference resolved to, kept per distinct reference so that a
/// namespace named by thousands of rules is looked up once.
#[derive(Clone)]
enum Outcome {
    Found(NsId),
    /// A name under /run/netns that does not exist: followed live.
    MissingName(String),
    /// A file followed by path that is not a namespace now (missing, or
    /// nothing mounted on it): followed live in its directory.
    MissingPath(String),
    /// Anything else: looked at again only when the config is (re)loaded.
    Unusable(String),
}

/// Decides what each namespace reference of `config` means now.
///
/// `locations` is one entry per rule, as [`super::parse_toml_located`]
/// returns them (a missing entry locates findings at the rule); `names` are
/// the names under `/run/netns` now; `resolve` looks references up (as the
/// daemon does), one result per reference in order
/// ([`crate::netns::Switcher::resolve_many`]). It is called once, with each
/// distinct exact reference once: a namespace named by thousands of rules
/// is looked up once, and all of them in one batch.
pub fn check_namespaces(
    config: &Config,
    locations: &[RuleLocations],
    names: &[String],
    resolve: impl FnOnce(&[NsRef]) -> Vec<Result<NsId, NsError>>,
) -> NsReport {
    let mut checker = Checker {
        known: look_up(config, resolve),
        names,
        matches_of: HashMap::new(),
        report: NsReport::default(),
    };
    for (i, rule) in config.rules.iter().enumerate() {
        checker.rule(rule, locations.get(i));
    }
    checker.report
}

/// Looks up each distinct exact reference of `config` once, in one batch.
fn look_up(
    config: &Config,
    resolve: impl FnOnce(&[NsRef]) -> Vec<Result<NsId, NsError>>,
) -> HashMap<NsRef, Outcome> {
    let mut distinct: Vec<NsRef> = Vec::new();
    let mut seen: std::collections::HashSet<&NsRef> = Default::default();
    for rule in &config.rules {
        for r in std::iter::once(&rule.upstream_netns).chain(&rule.netns) {
            if !matches!(r, NsRef::Glob(_)) && seen.insert(r) {
                distinct.push(r.clone());
            }
        }
    }
    let mut results = resolve(&distinct).into_iter();
    distinct
        .into_iter()
        .map(|r| {
            let o = match results.next() {
                Some(Ok(id)) => Outcome::Found(id),
                Some(Err(
                    err @ NsError::NotFound {
                        reference: NsRef::Named(_),
                        ..
                    },
                )) => Outcome::MissingName(err.to_string()),
                Some(Err(err)) if followed_path(&err) => Outcome::MissingPath(err.to_string()),
                Some(Err(err)) => Outcome::Unusable(err.to_string()),
                None => Outcome::Unusable(format!("namespace \"{r}\" was not looked at")),
            };
            (r, o)
        })
        .collect()
}

/// Whether `err` says a path followed in its directory is not a namespace
/// now (missing, or nothing mounted on it), so that it may become one.
fn followed_path(err: &NsError) -> bool {
    match err {
        NsError::NotFound {
            reference: NsRef::Path(p),
            ..
        }
        | NsError::NotNsfs {
            reference: NsRef::Path(p),
            ..
        } => !p.starts_with("/proc"),
        _ => false,
    }
}

/// The state of one [`check_namespaces`] pass over the rules.
struct Checker<'a> {
    known: HashMap<NsRef, Outcome>,
    /// The names under `/run/netns` now.
    names: &'a [String],
    /// Each distinct pattern's matches among `names`: generated configs
    /// repeat one pattern in many rules.
    matches_of: HashMap<&'a NsRef, Vec<&'a str>>,
    report: NsReport,
}

/// One reference of a rule, for the findings about it.
struct Entry<'r> {
    rule: &'r super::Rule,
    location: Option<&'r String>,
    key: String,
}

impl<'a> Checker<'a> {
    fn outcome(&self, r: &NsRef) -> Outcome {
        self.known
            .get(r)
            .cloned()
            .unwrap_or_else(|| Outcome::Unusable(format!("namespace \"{r}\" was not looked at")))
    }

    fn finding(&mut self, severity: Severity, at: &Entry<'_>, message: String) {
        self.report.findings.push(Finding {
            severity,
            location: at.location.unwrap_or(&at.rule.origin).clone(),
            rule: at.rule.name.clone(),
            key: at.key.clone(),
            message,
        })
    }

    /// The rule's `upstream_netns`, then each of its `netns` entries.
    fn rule(&mut self, rule: &'a super::Rule, at: Option<&RuleLocations>) {
        let (bindings, from_patterns) = (self.report.bindings, self.report.from_patterns);
        self.namespaces(rule, at);
        // Each port of a range is a binding of its own in every namespace.
        let ports = rule.port_count();
        if rule.ports.is_some() {
            let r = &mut self.report;
            r.ranges += 1;
            r.range_ports += ports;
            r.bindings = bindings + (r.bindings - bindings) * ports;
            r.from_patterns = from_patterns + (r.from_patterns - from_patterns) * ports;
        }
    }

    fn namespaces(&mut self, rule: &'a super::Rule, at: Option<&RuleLocations>) {
        let up = Entry {
            rule,
            location: at.and_then(|l| l.upstream_netns.as_ref()),
            key: "upstream_netns".into(),
        };
        match self.outcome(&rule.upstream_netns) {
            Outcome::Found(_) => {}
            Outcome::MissingName(e) => self.finding(
                Severity::Warning,
                &up,
                format!(
                    "{e}; the rule's bindings wait, and open when the name appears under /run/netns"
                ),
            ),
            Outcome::MissingPath(e) => self.finding(
                Severity::Warning,
                &up,
                format!(
                    "{e}; the rule's bindings wait, and open when a network namespace is mounted there"
                ),
            ),
            Outcome::Unusable(e) => self.finding(
                Severity::Warning,
                &up,
                format!(
                    "{e}; the rule's bindings do not listen until this is fixed and the config is reloaded"
                ),
            ),
        }
        // The first reference of each namespace in this rule, and of each
        // name, so that a second reference to the same one is said once and
        // a pattern's match of a listed name is not counted twice.
        let mut first_of_ns: HashMap<NsId, usize> = HashMap::new();
        let listed: std::collections::HashSet<&str> = rule
            .netns
            .iter()
            .filter_map(|r| match r {
                NsRef::Named(n) => Some(n.as_str()),
                NsRef::Path(p) => p.to_str(),
                _ => None,
            })
            .collect();
        let mut matched: std::collections::HashSet<&'a str> = Default::default();
        for (j, r) in rule.netns.iter().enumerate() {
            let entry = Entry {
                rule,
                location: at.and_then(|l| l.netns.get(j)),
                key: format!("netns[{j}]"),
            };
            if let NsRef::Glob(_) = r {
                self.pattern(r, &entry, &listed, &mut matched);
            } else {
                self.exact(r, j, &entry, &mut first_of_ns);
            }
        }
    }

    /// A pattern: counts the bindings its matches add to the rule's.
    fn pattern(
        &mut self,
        r: &'a NsRef,
        at: &Entry<'_>,
        listed: &std::collections::HashSet<&str>,
        matched: &mut std::collections::HashSet<&'a str>,
    ) {
        let Checker {
            names,
            matches_of,
            report,
            ..
        } = self;
        report.patterns += 1;
        let hits = matches_of.entry(r).or_insert_with(|| {
            // `names` holds /run/netns names and, for absolute patterns,
            // the paths of their directories' files.
            names
                .iter()
                .filter(|n| match n.starts_with('/') {
                    true => r.matches_ref(&NsRef::Path(n.into())),
                    false => r.matches(n),
                })
                .map(String::as_str)
                .collect()
        });
        for &n in hits.iter() {
            if !listed.contains(n) && matched.insert(n) {
                report.from_patterns += 1;
                report.bindings += 1;
            }
        }
        if hits.is_empty() {
            let place = match r.glob_dir() {
                Some((dir, _)) => format!("file in {}", dir.display()),
                None => "name under /run/netns".to_owned(),
            };
            self.finding(
                Severity::Note,
                at,
                format!(
                    "\"{r}\" matches no {place} now; the rule listens in each matching namespace as it appears"
                ),
            );
        }
    }

    /// An exact reference, entry `j` of its rule's `netns`.
    fn exact(
        &mut self,
        r: &NsRef,
        j: usize,
        at: &Entry<'_>,
        first_of_ns: &mut HashMap<NsId, usize>,
    ) {
        self.report.bindings += 1;
        match self.outcome(r) {
            Outcome::Found(id) => {
                if let Some(&first) = first_of_ns.get(&id) {
                    let netns = &at.rule.netns;
                    self.finding(
                        Severity::Note,
                        at,
                        format!(
                            "\"{r}\" is the same namespace as \"{}\" (netns[{first}]); the rule listens there once, as \"{}\"",
                            netns[first], netns[first]
                        ),
                    );
                } else {
                    first_of_ns.insert(id, j);
                }
            }
            Outcome::MissingName(e) => self.finding(
                Severity::Warning,
                at,
                format!("{e}; its binding waits, and opens when the name appears"),
            ),
            Outcome::MissingPath(e) => self.finding(
                Severity::Warning,
                at,
                format!(
                    "{e}; its binding waits, and opens when a network namespace is mounted there"
                ),
            ),
            Outcome::Unusable(e) => self.finding(
                Severity::Warning,
                at,
                format!(
                    "{e}; its binding does not listen until this is fixed and the config is reloaded"
                ),
            ),
        }
    }
}

/// The paths of the files in the directories of `config`'s absolute
/// patterns now, for [`check_namespaces`]'s `names` (reads the file system).
pub fn files_of_path_patterns(config: &Config) -> Vec<String> {
    let globs: Vec<NsRef> = config
        .rules
        .iter()
        .flat_map(|r| r.netns.iter().filter(|n| n.glob_dir().is_some()).cloned())
        .collect();
    crate::netns::discovery::pattern_files(&globs)
        .into_iter()
        .filter_map(|p| p.into_os_string().into_string().ok())
        .collect()
}

/// The directories the daemon would follow that its relay, split (the
/// default as root; not with `user = "root"`), cannot watch: it runs as
/// `nobody`, so each must be readable and searchable by others, and its
/// ancestors searchable (reads the file system; directories that do not
/// exist are left out).
pub fn dirs_the_relay_cannot_watch(config: &Config) -> Vec<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if config.user.as_deref() == Some("root") {
        return Vec::new();
    }
    let refs: Vec<NsRef> = crate::netns::discovery::followed_paths(
        config
            .rules
            .iter()
            .flat_map(|r| r.netns.iter().chain(std::iter::once(&r.upstream_netns))),
    );
    let others = |p: &std::path::Path, bits: u32| {
        std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & bits == bits)
    };
    crate::netns::discovery::followed_dirs(&refs)
        .into_iter()
        .filter(|d| d.is_dir())
        .filter(|d| !others(d, 0o005) || !d.ancestors().skip(1).all(|a| others(a, 0o001)))
        .collect()
}

/// A note per directory of [`dirs_the_relay_cannot_watch`], at the first
/// rule that names a file in it.
pub fn unwatchable_findings(
    config: &Config,
    locations: &[RuleLocations],
    dirs: &[std::path::PathBuf],
) -> Vec<Finding> {
    let mut out = Vec::new();
    for dir in dirs {
        let found = config.rules.iter().enumerate().find_map(|(i, rule)| {
            let j = rule.netns.iter().position(|n| match n {
                NsRef::Path(p) => p.parent() == Some(dir.as_path()),
                // A directory of the pattern's, or one where its wildcard
                // directories are matched.
                _ => {
                    n.glob_dir().is_some()
                        && crate::netns::discovery::followed_dirs(std::slice::from_ref(n))
                            .contains(dir)
                }
            })?;
            Some((i, rule, j))
        });
        let Some((i, rule, j)) = found else { continue };
        let location = locations
            .get(i)
            .and_then(|l| l.netns.get(j))
            .unwrap_or(&rule.origin)
            .clone();
        out.push(Finding {
            severity: Severity::Note,
            location,
            rule: rule.name.clone(),
            key: format!("netns[{j}]"),
            message: format!(
                "{} is not readable by `nobody`, whom the relay runs as (split, the default as root): its namespace files are resolved when the config is loaded or reloaded, not followed as they come and go; make it (and its parents) readable to others, or set user = \"root\"",
                dir.display()
            ),
        });
    }
    out
}

/// The distinct upstream namespaces of the rules with `upstream_source =
/// "client"`, whose policy routing [`routing_findings`] judges.
pub fn client_source_namespaces(config: &Config) -> Vec<NsRef> {
    let mut out: Vec<NsRef> = Vec::new();
    for rule in config
        .rules
        .iter()
        .filter(|r| r.upstream_source.is_client())
    {
        if !out.contains(&rule.upstream_netns) {
            out.push(rule.upstream_netns.clone());
        }
    }
    out
}

/// A warning, at its `upstream_source`'s namespace entry, for each rule
/// with `upstream_source = "client"` whose upstream namespace lacks the
/// policy routing for its upstream's family (see
/// [`crate::netns::routing`]), with the commands that add it; a note where
/// the routing could not be read. `routing` holds what each namespace of
/// [`client_source_namespaces`] has; one missing from it (not found, say:
/// already a finding of its own) is passed over.
pub fn routing_findings(
    config: &Config,
    locations: &[RuleLocations],
    routing: &HashMap<NsRef, Result<Routing, String>>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    for (i, rule) in config.rules.iter().enumerate() {
        if !rule.upstream_source.is_client() {
            continue;
        }
        let Some(has) = routing.get(&rule.upstream_netns) else {
            continue;
        };
        let location = locations
            .get(i)
            .and_then(|l| l.upstream_netns.as_ref())
            .unwrap_or(&rule.origin)
            .clone();
        let (severity, message) = match has {
            Err(e) => (
                Severity::Note,
                format!(
                    "cannot read the policy routing of namespace \"{}\" ({e}): upstream_source = \"client\" needs it (see the README's \"The client's address at the upstream\")",
                    rule.upstream_netns
                ),
            ),
            Ok(r) if r.v4 && rule.upstream.is_ipv4() || r.v6 && rule.upstream.is_ipv6() => {
                continue;
            }
            Ok(_) => (Severity::Warning, missing_routing(rule)),
        };
        out.push(Finding {
            severity,
            location,
            rule: rule.name.clone(),
            key: "upstream_netns".into(),
            message,
        });
    }
    out
}

/// The warning for a rule whose upstream namespace has no policy routing
/// for its family, with the commands (run as root) that add it.
fn missing_routing(rule: &super::Rule) -> String {
    let ns = &rule.upstream_netns;
    let ip = match ns {
        NsRef::Host => "ip".to_owned(),
        NsRef::Named(n) => format!("ip -n {n}"),
        NsRef::Path(p) => format!("nsenter --net={} ip", p.display()),
        NsRef::Pid(pid) => format!("nsenter --net=/proc/{pid}/ns/net ip"),
        NsRef::Glob(_) => "ip".to_owned(),
    };
    let (six, any) = if rule.upstream.is_ipv6() {
        (" -6", "::/0")
    } else {
        ("", "0.0.0.0/0")
    };
    let family = if rule.upstream.is_ipv6() {
        "IPv6"
    } else {
        "IPv4"
    };
    format!(
        "upstream_source = \"client\": namespace \"{ns}\" has no {family} policy routing that delivers replies to client addresses locally (an `ip rule` looking up a table with a `local` default route), so the upstream's replies would not reach nsproxy and its connections would time out; add it with `{ip}{six} rule add from {} lookup 100` and `{ip}{six} route add local {any} dev lo table 100`",
        rule.upstream.ip()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_toml_located;
    use std::path::PathBuf;

    const TEXT: &str = r#"[[proxy]]
name = "a"
protocol = "tcp"
listen = "127.0.0.1:80"
netns = ["host", "tenant-*", "gone",
         "/run/netns/t1", "t1", "none-*"]
upstream = "127.0.0.1:9000"
upstream_netns = "pid:77"
"#;

    fn report(names: &[&str]) -> (NsReport, usize) {
        let (config, locations) = parse_toml_located(TEXT, "t.toml").unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut lookups = 0;
        let r = check_namespaces(&config, &locations, &names, |refs| {
            lookups += refs.len();
            refs.iter()
                .map(|r| match r {
                    NsRef::Host => Ok(NsId { dev: 1, ino: 1 }),
                    NsRef::Named(n) if n == "t1" => Ok(NsId { dev: 1, ino: 5 }),
                    NsRef::Path(p) if p.as_os_str() == "/run/netns/t1" => {
                        Ok(NsId { dev: 1, ino: 5 })
                    }
                    NsRef::Pid(_) => Err(NsError::NotFound {
                        reference: r.clone(),
                        path: PathBuf::from("/proc/77/ns/net"),
                    }),
                    _ => Err(NsError::NotFound {
                        reference: r.clone(),
                        path: r.path().unwrap(),
                    }),
                })
                .collect()
        });
        (r, lookups)
    }

    #[test]
    fn a_range_counts_a_binding_per_port_and_namespace() {
        let text = TEXT.replace("127.0.0.1:80", "127.0.0.1:8000-8099");
        let (config, locations) = parse_toml_located(&text, "t.toml").unwrap();
        let names = ["tenant-1".to_owned()];
        let r = check_namespaces(&config, &locations, &names, |refs| {
            refs.iter().map(|_| Ok(NsId { dev: 1, ino: 1 })).collect()
        });
        // host, tenant-1, gone, /run/netns/t1, t1: five namespaces × 100 ports.
        assert_eq!((r.bindings, r.from_patterns), (500, 100));
        assert!(
            r.summary(1).starts_with("1 rule(s), 500 binding(s) (1 port range(s) of 100 port(s) together: one binding per port in each namespace)"),
            "{}",
            r.summary(1)
        );
    }

    #[test]
    fn every_reference_is_judged_at_its_own_entry() {
        let (r, lookups) = report(&["tenant-1", "tenant-2", "t1"]);
        let lines: Vec<String> = r
            .findings
            .iter()
            .map(|f| format!("{:?} {f}", f.severity))
            .collect();
        assert_eq!(
            lines,
            vec![
                "Warning t.toml:8:18: rule a: `upstream_netns`: namespace \"pid:77\" not found: /proc/77/ns/net does not exist (is process 77 running?); the rule's bindings do not listen until this is fixed and the config is reloaded",
                "Warning t.toml:5:30: rule a: `netns[2]`: namespace \"gone\" not found: /run/netns/gone does not exist (create it with `ip netns add gone`); its binding waits, and opens when the name appears",
                "Note t.toml:6:27: rule a: `netns[4]`: \"t1\" is the same namespace as \"/run/netns/t1\" (netns[3]); the rule listens there once, as \"/run/netns/t1\"",
                "Note t.toml:6:33: rule a: `netns[5]`: \"none-*\" matches no name under /run/netns now; the rule listens in each matching namespace as it appears",
            ]
        );
        // host, gone, /run/netns/t1, t1 and tenant-1, tenant-2.
        assert_eq!(
            (r.bindings, r.patterns, r.from_patterns),
            (6, 2, 2),
            "{r:?}"
        );
        assert_eq!(lookups, 5, "each distinct reference once");
        assert_eq!(
            r.summary(1),
            "1 rule(s), 6 binding(s) (2 from 2 pattern(s) over the namespaces there now; patterns follow them as they come and go), 2 namespace warning(s): those bindings do not listen now (each warning says when they will), 2 note(s)"
        );
    }

    #[test]
    fn a_pattern_is_never_a_warning() {
        let (r, _) = report(&[]);
        assert!(
            r.findings
                .iter()
                .filter(|f| f.key == "netns[1]" || f.key == "netns[5]")
                .all(|f| f.severity == Severity::Note && f.message.contains("matches no name")),
            "{r:?}"
        );
        assert_eq!(r.from_patterns, 0);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use crate::config::parse_toml_located;
    use proptest::prelude::*;
    use std::path::PathBuf;

    fn reference() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("host".to_owned()),
            "[a-c]{1,2}",
            "/run/netns/[a-c]{1,2}",
            (1u32..4).prop_map(|p| format!("pid:{p}")),
            "[a-c]?\\*",
        ]
    }

    proptest! {
        /// Whatever the namespaces turn out to be: a pattern is never a
        /// warning, every finding is at an entry of its rule, each distinct
        /// reference is looked up once (in one batch), and a warning is exactly a
        /// reference that did not resolve.
        #[test]
        fn prop_check_judges_each_entry_where_it_is(
            rules in prop::collection::vec(
                (prop::collection::btree_set(reference(), 1..5), prop::option::of(reference())),
                1..4,
            ),
            names in prop::collection::vec("[a-c]{1,2}", 0..5),
            // Which references resolve (by a hash of their text) and to what.
            seed in any::<u64>(),
        ) {
            let mut text = String::new();
            for (i, (netns, up)) in rules.iter().enumerate() {
                let list: Vec<String> = netns.iter().map(|n| format!("\"{n}\"")).collect();
                text.push_str(&format!(
                    "[[proxy]]\nname = \"r{i}\"\nprotocol = \"tcp\"\nlisten = \"127.0.0.1:{}\"\nnetns = [{}]\nupstream = \"127.0.0.1:9\"\n",
                    1000 + i,
                    list.join(", ")
                ));
                if let Some(u) = up.as_ref().filter(|u| !u.contains('*')) {
                    text.push_str(&format!("upstream_netns = \"{u}\"\n"));
                }
            }
            let (config, locations) = parse_toml_located(&text, "t.toml")
                .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            // `host` always resolves (it is the switcher's home).
            let fate = |r: &NsRef| {
                if *r == NsRef::Host {
                    return (true, 0);
                }
                let h = r.to_string().bytes().fold(seed, |h, b| h.rotate_left(5) ^ u64::from(b));
                (h % 3 != 0, h % 4)
            };
            let mut lookups: HashMap<NsRef, usize> = HashMap::new();
            let mut calls = 0;
            let report = check_namespaces(&config, &locations, &names, |refs| {
                calls += 1;
                refs.iter().map(|r| {
                    *lookups.entry(r.clone()).or_default() += 1;
                    match fate(r) {
                        (true, ino) => Ok(NsId { dev: 1, ino }),
                        (false, _) => Err(NsError::NotFound {
                            reference: r.clone(),
                            path: r.path().unwrap_or_else(|| PathBuf::from("/x")),
                        }),
                    }
                }).collect()
            });
            prop_assert_eq!(calls, 1);
            prop_assert!(lookups.values().all(|n| *n == 1), "{:?}", lookups);
            let mut warnings = 0;
            for (i, rule) in config.rules.iter().enumerate() {
                let at = &locations[i];
                let mine: Vec<&Finding> = report.findings.iter().filter(|f| f.rule == rule.name).collect();
                for f in &mine {
                    let entry = match f.key.strip_prefix("netns[") {
                        Some(j) => {
                            let j: usize = j.trim_end_matches(']').parse().unwrap();
                            if matches!(rule.netns[j], NsRef::Glob(_)) {
                                prop_assert_eq!(f.severity, Severity::Note);
                            }
                            at.netns.get(j)
                        }
                        None => at.upstream_netns.as_ref(),
                    };
                    prop_assert_eq!(Some(&f.location), entry, "{}", f);
                }
                let unresolved = std::iter::once(&rule.upstream_netns)
                    .chain(&rule.netns)
                    .filter(|r| !matches!(r, NsRef::Glob(_)) && !fate(r).0)
                    .count();
                let warned = mine.iter().filter(|f| f.severity == Severity::Warning).count();
                prop_assert_eq!(warned, unresolved);
                warnings += warned;
            }
            prop_assert_eq!(report.count(Severity::Warning), warnings);
        }
    }
}
