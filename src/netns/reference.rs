//! How a namespace is named ([`NsRef`]) and what it is ([`NsId`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where `ip netns add NAME` pins named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// A reference to a network namespace, as an operator writes it.
///
/// A reference is only a way to find a namespace: two references can name the
/// same namespace (`ns1` and `/run/netns/ns1`), and a name can point at a
/// different namespace tomorrow. What a reference resolves to is an [`NsId`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NsRef {
    /// `host`: the namespace nsproxy started in.
    Host,
    /// `NAME`: a namespace pinned under `/run/netns/NAME` (what `ip netns add` makes).
    Named(String),
    /// An absolute path to any nsfs file: a CNI bind mount, `/proc/PID/ns/net`, ...
    Path(PathBuf),
    /// `pid:PID`: the namespace of a running process (`/proc/PID/ns/net`).
    Pid(u32),
    /// A shell-style pattern over the names in `/run/netns` (`tenant-*`,
    /// `*`), or, absolute, over the files of a directory
    /// (`/var/run/docker/netns/*`; wildcards in the last component only):
    /// every matching namespace, as files come and go. Only valid where a
    /// rule listens, never as an upstream namespace.
    Glob(String),
}

/// Why a namespace reference could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NsRefError {
    #[error(
        "empty namespace reference: use \"host\", a name under /run/netns, an absolute path or \"pid:PID\""
    )]
    Empty,
    #[error(
        "\"{0}\" is not a valid pid: expected \"pid:\" followed by a process id such as pid:1234"
    )]
    BadPid(String),
    #[error("\"{0}\" is not a valid pattern: a '[' has no closing ']'")]
    BadGlob(String),
    #[error(
        "\"{0}\" is not a valid namespace name: a name under /run/netns has no '/' and is not \".\" or \"..\" (for a path, start it with '/')"
    )]
    BadName(String),
}

impl NsRef {
    /// The file that holds this namespace, or `None` for [`NsRef::Host`]
    /// (the home namespace is captured when the switcher starts).
    pub fn path(&self) -> Option<PathBuf> {
        match self {
            NsRef::Host | NsRef::Glob(_) => None,
            NsRef::Named(name) => Some(Path::new(NETNS_RUN_DIR).join(name)),
            NsRef::Path(p) => Some(p.clone()),
            NsRef::Pid(pid) => Some(PathBuf::from(format!("/proc/{pid}/ns/net"))),
        }
    }
}

impl FromStr for NsRef {
    type Err = NsRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(NsRefError::Empty);
        }
        if s == "host" {
            return Ok(NsRef::Host);
        }
        if let Some(pid) = s.strip_prefix("pid:") {
            return match pid.parse::<u32>() {
                Ok(p) if p > 0 => Ok(NsRef::Pid(p)),
                _ => Err(NsRefError::BadPid(s.to_owned())),
            };
        }
        if s.starts_with('/') {
            if s.contains(['*', '?', '[']) {
                // Per component: a wildcard never matches a '/'.
                return s
                    .split('/')
                    .all(glob_is_valid)
                    .then(|| NsRef::Glob(s.to_owned()))
                    .ok_or_else(|| NsRefError::BadGlob(s.to_owned()));
            }
            return Ok(NsRef::Path(PathBuf::from(s)));
        }
        if s.contains('/') || s.contains('\0') || s == "." || s == ".." {
            return Err(NsRefError::BadName(s.to_owned()));
        }
        if s.contains(['*', '?', '[']) {
            return glob_is_valid(s)
                .then(|| NsRef::Glob(s.to_owned()))
                .ok_or_else(|| NsRefError::BadGlob(s.to_owned()));
        }
        Ok(NsRef::Named(s.to_owned()))
    }
}

impl fmt::Display for NsRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NsRef::Host => f.write_str("host"),
            NsRef::Named(n) => f.write_str(n),
            NsRef::Path(p) => write!(f, "{}", p.display()),
            NsRef::Pid(p) => write!(f, "pid:{p}"),
            NsRef::Glob(g) => f.write_str(g),
        }
    }
}

impl NsRef {
    /// For a [`NsRef::Glob`] over `/run/netns` names, whether `name`
    /// matches it; other references never match by pattern.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NsRef::Glob(p) if !p.starts_with('/') => glob_match(p.as_bytes(), name.as_bytes()),
            _ => false,
        }
    }

    /// For a [`NsRef::Glob`], whether `r` is one of the namespaces it
    /// stands for: a `/run/netns` name for a pattern over names, a path
    /// in its directory whose file name matches for an absolute one.
    pub fn matches_ref(&self, r: &NsRef) -> bool {
        match (self, r) {
            (NsRef::Glob(_), NsRef::Named(n)) => self.matches(n),
            (NsRef::Glob(p), NsRef::Path(path)) if p.starts_with('/') => {
                // Component by component, as the shell matches a path.
                let mut want = p.split('/');
                let mut have = path.as_os_str().as_encoded_bytes().split(|b| *b == b'/');
                loop {
                    match (want.next(), have.next()) {
                        (None, None) => return true,
                        (Some(w), Some(h)) if glob_match(w.as_bytes(), h) => {}
                        _ => return false,
                    }
                }
            }
            _ => false,
        }
    }

    /// For an absolute [`NsRef::Glob`], its directory (which may hold
    /// wildcards too: `/run/user/*/netns`) and the pattern over the file
    /// names in it.
    pub fn glob_dir(&self) -> Option<(&Path, &str)> {
        match self {
            NsRef::Glob(p) if p.starts_with('/') => {
                let (dir, last) = p.rsplit_once('/')?;
                Some((Path::new(if dir.is_empty() { "/" } else { dir }), last))
            }
            _ => None,
        }
    }
}

/// Whether the file name `name` matches the pattern `pattern` (fnmatch(3)
/// without flags, as globs over `/run/netns` names).
pub(crate) fn name_matches(pattern: &str, name: &str) -> bool {
    glob_match(pattern.as_bytes(), name.as_bytes())
}

/// Whether every `[` of `p` opens a class that [`class`] finds the end of,
/// scanning as [`glob_match`] does: a pattern is accepted exactly when the
/// matcher can read all of it (`[!]` is refused, not accepted and then never
/// matched: its `]` is a member, so the class has no end).
fn glob_is_valid(p: &str) -> bool {
    let b = p.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'[' {
            match class(&b[i..], 0) {
                Some((_, len)) => i += len,
                None => return false,
            }
        } else {
            i += 1;
        }
    }
    true
}

/// fnmatch(3) without flags: `*`, `?`, `[abc]`, `[a-z]`, `[!x]`.
fn glob_match(p: &[u8], s: &[u8]) -> bool {
    // Iterative with one backtrack point for the last `*`: linear enough for
    // namespace names, and no recursion blow-up on `*****`.
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() {
            match p[pi] {
                b'*' => {
                    star = Some((pi, si));
                    pi += 1;
                    continue;
                }
                b'?' => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = class(&p[pi..], s[si]) {
                        if matched {
                            pi += next;
                            si += 1;
                            continue;
                        }
                    }
                }
                c if c == s[si] => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, ss)) => {
                pi = sp + 1;
                si = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

/// Matches `c` against the class at the start of `p` (which starts with
/// `[`); returns (matched, length of the class) or None if unterminated.
fn class(p: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(i), Some(b'!' | b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < p.len() && (p[i] != b']' || first) {
        first = false;
        if i + 2 < p.len() && p[i + 1] == b'-' && p[i + 2] != b']' {
            matched |= p[i] <= c && c <= p[i + 2];
            i += 3;
        } else {
            matched |= p[i] == c;
            i += 1;
        }
    }
    (i < p.len()).then_some((matched != negate, i + 1))
}

/// The identity of a network namespace: the device and inode of its nsfs file.
///
/// Two references that resolve to the same `NsId` are the same namespace. The
/// inode is what `ip netns identify`, `lsns` and `/proc/PID/ns/net`'s link
/// text (`net:[4026531840]`) show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
}

impl fmt::Display for NsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "net:[{}]", self.ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!("host".parse(), Ok(NsRef::Host));
        assert_eq!("ns1".parse(), Ok(NsRef::Named("ns1".into())));
        assert_eq!(
            "/proc/1/ns/net".parse(),
            Ok(NsRef::Path("/proc/1/ns/net".into()))
        );
        assert_eq!("pid:42".parse(), Ok(NsRef::Pid(42)));
    }

    #[test]
    fn rejects_bad_references() {
        assert_eq!("".parse::<NsRef>(), Err(NsRefError::Empty));
        assert_eq!(
            "pid:x".parse::<NsRef>(),
            Err(NsRefError::BadPid("pid:x".into()))
        );
        assert_eq!(
            "pid:0".parse::<NsRef>(),
            Err(NsRefError::BadPid("pid:0".into()))
        );
        assert_eq!(
            "a/b".parse::<NsRef>(),
            Err(NsRefError::BadName("a/b".into()))
        );
        assert_eq!("..".parse::<NsRef>(), Err(NsRefError::BadName("..".into())));
    }

    #[test]
    fn globs() {
        let g = |p: &str| p.parse::<NsRef>().unwrap();
        assert_eq!(g("tenant-*"), NsRef::Glob("tenant-*".into()));
        assert!(g("tenant-*").matches("tenant-1"));
        assert!(g("tenant-*").matches("tenant-"));
        assert!(!g("tenant-*").matches("tenant"));
        assert!(g("*").matches("anything"));
        assert!(g("a?c").matches("abc") && !g("a?c").matches("ac"));
        assert!(g("ns[0-9]").matches("ns7") && !g("ns[0-9]").matches("nsx"));
        assert!(g("ns[!0-9]").matches("nsx") && !g("ns[!0-9]").matches("ns1"));
        assert!(g("*-*-x").matches("a-b-c-x"));
        assert!(!g("**a").matches("bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"));
        assert!(!NsRef::Named("x".into()).matches("x"));
        assert_eq!(
            "ns[0-".parse::<NsRef>(),
            Err(NsRefError::BadGlob("ns[0-".into()))
        );
        assert_eq!(g("t*").to_string(), "t*");
    }

    #[test]
    fn absolute_globs_match_the_files_of_their_directory() {
        let g: NsRef = "/var/run/docker/netns/*".parse().unwrap();
        assert_eq!(g, NsRef::Glob("/var/run/docker/netns/*".into()));
        assert_eq!(g.to_string(), "/var/run/docker/netns/*");
        let p = |s: &str| NsRef::Path(s.into());
        assert!(g.matches_ref(&p("/var/run/docker/netns/abc")));
        assert!(!g.matches_ref(&p("/var/run/docker/netns/a/b")));
        assert!(!g.matches_ref(&p("/var/run/docker/abc")));
        assert!(!g.matches_ref(&NsRef::Named("abc".into())));
        assert!(!g.matches("abc"), "not a pattern over /run/netns names");
        assert_eq!(
            g.glob_dir(),
            Some((Path::new("/var/run/docker/netns"), "*"))
        );
        let cni: NsRef = "/var/run/netns/cni-*".parse().unwrap();
        assert!(cni.matches_ref(&p("/var/run/netns/cni-1234")));
        assert!(!cni.matches_ref(&p("/var/run/netns/other")));
        assert!(
            "tenant-*"
                .parse::<NsRef>()
                .unwrap()
                .matches_ref(&NsRef::Named("tenant-1".into()))
        );
        let users: NsRef = "/run/user/*/netns/*".parse().unwrap();
        assert!(users.matches_ref(&p("/run/user/1000/netns/a")));
        assert!(!users.matches_ref(&p("/run/user/1000/x/netns/a")));
        assert!(!users.matches_ref(&p("/run/user/netns/a")));
        assert_eq!(
            users.glob_dir(),
            Some((Path::new("/run/user/*/netns"), "*"))
        );
        assert_eq!(
            "/x[/y".parse::<NsRef>(),
            Err(NsRefError::BadGlob("/x[/y".into()))
        );
        assert_eq!(
            "/x/ns[0-".parse::<NsRef>(),
            Err(NsRefError::BadGlob("/x/ns[0-".into()))
        );
    }

    #[test]
    fn a_class_without_its_end_is_refused() {
        for p in ["[!]", "[^]", "ns[]", "a[!]b", "[a-"] {
            assert_eq!(
                p.parse::<NsRef>(),
                Err(NsRefError::BadGlob(p.into())),
                "{p}"
            );
        }
        let g = |p: &str| p.parse::<NsRef>().unwrap();
        assert!(g("[!]]").matches("x") && !g("[!]]").matches("]"));
        assert!(g("[]]").matches("]") && g("x[[]").matches("x["));
    }

    #[test]
    fn paths_and_display_round_trip() {
        for s in ["host", "ns1", "/var/run/netns/x", "pid:7"] {
            let r: NsRef = s.parse().unwrap();
            assert_eq!(r.to_string(), s);
        }
        assert_eq!(
            NsRef::Named("a".into()).path(),
            Some(PathBuf::from("/run/netns/a"))
        );
        assert_eq!(NsRef::Pid(9).path(), Some(PathBuf::from("/proc/9/ns/net")));
        assert_eq!(NsRef::Host.path(), None);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// A pattern token, read the way fnmatch(3) without flags reads one.
    #[derive(Debug)]
    enum Tok {
        Star,
        Any,
        Lit(u8),
        /// Members as inclusive ranges; `negate` for `[!...]` and `[^...]`.
        Class {
            negate: bool,
            items: Vec<(u8, u8)>,
        },
    }

    /// The reference reader: `None` for a class with no closing `]` (a `]`
    /// right after `[` or `[!` is a member, not the end).
    fn tokens(p: &[u8]) -> Option<Vec<Tok>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < p.len() {
            match p[i] {
                b'*' => out.push(Tok::Star),
                b'?' => out.push(Tok::Any),
                b'[' => {
                    let mut j = i + 1;
                    let negate = matches!(p.get(j), Some(b'!' | b'^'));
                    if negate {
                        j += 1;
                    }
                    let first = j;
                    let mut items = Vec::new();
                    loop {
                        match p.get(j) {
                            None => return None,
                            Some(b']') if j > first => break,
                            Some(&lo) => match (p.get(j + 1), p.get(j + 2)) {
                                (Some(b'-'), Some(&hi)) if hi != b']' => {
                                    items.push((lo, hi));
                                    j += 3;
                                }
                                _ => {
                                    items.push((lo, lo));
                                    j += 1;
                                }
                            },
                        }
                    }
                    out.push(Tok::Class { negate, items });
                    i = j;
                }
                c => out.push(Tok::Lit(c)),
            }
            i += 1;
        }
        Some(out)
    }

    /// Plain backtracking over the tokens: exponential, fine for short inputs.
    fn reference_match(t: &[Tok], s: &[u8]) -> bool {
        match t.split_first() {
            None => s.is_empty(),
            Some((Tok::Star, rest)) => (0..=s.len()).any(|k| reference_match(rest, &s[k..])),
            Some((tok, rest)) => {
                let Some((&c, tail)) = s.split_first() else {
                    return false;
                };
                let one = match tok {
                    Tok::Any => true,
                    Tok::Lit(l) => *l == c,
                    Tok::Class { negate, items } => {
                        items.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negate
                    }
                    Tok::Star => unreachable!(),
                };
                one && reference_match(rest, tail)
            }
        }
    }

    /// A name the matcher must accept for the pattern `toks` describes, built
    /// by choosing, per token, one byte it matches (`picks` steer the choice).
    fn name_for(toks: &[Tok], picks: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        for (k, t) in toks.iter().enumerate() {
            let pick = picks.get(k).copied().unwrap_or(0);
            match t {
                Tok::Star => out.extend(std::iter::repeat_n(b'z', (pick % 3) as usize)),
                Tok::Any => out.push(b'a' + pick % 26),
                Tok::Lit(c) => out.push(*c),
                Tok::Class { negate, items } => {
                    let hit = |c: u8| items.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negate;
                    let c = (0..=255u8)
                        .cycle()
                        .skip(pick as usize)
                        .take(256)
                        .find(|c| hit(*c))?;
                    out.push(c);
                }
            }
        }
        Some(out)
    }

    fn ns_name() -> impl Strategy<Value = String> {
        "[a-z0-9._-]{1,12}".prop_filter("not a reserved form", |n| {
            n != "host" && n != "." && n != ".."
        })
    }

    fn ns_ref() -> impl Strategy<Value = NsRef> {
        prop_oneof![
            Just(NsRef::Host),
            ns_name().prop_map(NsRef::Named),
            "(/[a-z0-9._-]{1,8}){1,4}".prop_map(|p| NsRef::Path(PathBuf::from(p))),
            (1u32..).prop_map(NsRef::Pid),
            "[a-z0-9-]{0,5}[*?][a-z0-9-]{0,5}".prop_map(NsRef::Glob),
        ]
    }

    proptest! {
        #[test]
        fn prop_nsref_parse_never_panics_and_reparses(s in any::<String>()) {
            if let Ok(r) = s.parse::<NsRef>() {
                prop_assert_eq!(r.to_string().parse::<NsRef>(), Ok(r.clone()));
                if let NsRef::Named(n) = &r {
                    prop_assert!(!n.contains('/') && !n.contains('\0') && n != "." && n != "..");
                    prop_assert_eq!(r.path(), Some(Path::new(NETNS_RUN_DIR).join(n)));
                }
            }
        }

        #[test]
        fn prop_nsref_display_round_trips(r in ns_ref()) {
            prop_assert_eq!(r.to_string().parse::<NsRef>(), Ok(r.clone()));
        }

        #[test]
        fn prop_glob_agrees_with_a_reference_matcher(
            p in "[ab*?!^\\]\\[-]{0,8}",
            names in prop::collection::vec("[ab!^\\]\\[-]{0,8}", 1..8),
        ) {
            let toks = tokens(p.as_bytes());
            prop_assert_eq!(glob_is_valid(&p), toks.is_some(), "validity of {:?}", p);
            if let Some(toks) = toks {
                for n in &names {
                    prop_assert_eq!(
                        glob_match(p.as_bytes(), n.as_bytes()),
                        reference_match(&toks, n.as_bytes()),
                        "{:?} against {:?}", p, n
                    );
                }
            }
        }

        #[test]
        fn prop_glob_matches_names_built_for_it(
            p in "([a-c*?-]|\\[!?[a-c\\]-]{1,4}\\]){0,8}",
            picks in prop::collection::vec(any::<u8>(), 8),
        ) {
            let toks = tokens(p.as_bytes());
            prop_assert!(toks.is_some(), "{:?} is a well-formed pattern", p);
            let toks = toks.unwrap();
            if let Some(name) = name_for(&toks, &picks) {
                prop_assert!(reference_match(&toks, &name));
                prop_assert!(glob_match(p.as_bytes(), &name), "{:?} must match {:?}", p, name);
            }
        }
    }
}
