//! The command line: `check` and bad input, with the exact messages users see.

mod common;

use common::*;

const GOOD: &str = r#"
[[proxy]]
name = "hello"
protocol = "tcp"
listen = "[::]:8000"
netns = ["host"]
upstream = "127.0.0.1:9000"
"#;

#[test]
fn check_accepts_a_valid_config() {
    let dir = TempDir::new();
    let f = dir.file("ok.toml", GOOD);
    let (code, out, err) = run_cli(&["check", "--config", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!("{}: OK: 1 rule(s), 1 binding(s)\n", f.display())
    );
}

#[test]
fn check_lists_every_problem_with_file_line_and_key() {
    let dir = TempDir::new();
    let text = r#"workers = 2
colour = "blue"

[[proxy]]
name = "web"
protocol = "tcp"
listen = "0.0.0.0:80:80"
netns = ["host", "ns/1"]
upstream = "db.local:5432"

[[proxy]]
name = "web"
protocol = "tcp"
listen = "0.0.0.0:81"
netns = ["host"]
upstream = "127.0.0.1:0"
"#;
    let f = dir.file("bad.toml", text);
    let p = f.display().to_string();
    let (code, out, err) = run_cli(&["check", "--config", &p]);
    assert_eq!(code, 1);
    assert_eq!(out, "");
    // The second rule is invalid itself, so it is not also reported as a
    // duplicate name (check_reports_duplicate_rule_names covers that).
    assert_eq!(
        err,
        format!(
            "{p}: invalid configuration (5 problems):
  {p}:2:1: unknown key `colour` (expected one of: workers, control_socket, metrics_listen, drain_timeout, user, proxy)
  {p}:7:10: rule web: `listen`: invalid listen address \"0.0.0.0:80:80\": expected IP:PORT, such as 0.0.0.0:8000, 127.0.0.1:8000 or [::]:8000
  {p}:8:18: rule web: `netns[1]`: \"ns/1\" is not a valid namespace name: a name under /run/netns has no '/' and is not \".\" or \"..\" (for a path, start it with '/')
  {p}:9:12: rule web: `upstream`: invalid upstream address \"db.local:5432\": expected IP:PORT such as 127.0.0.1:9000 or [::1]:9000 (host names are not resolved)
  {p}:16:12: rule web: `upstream`: invalid upstream address \"127.0.0.1:0\": port 0 cannot be connected to
"
        )
    );
}

#[test]
fn check_reports_duplicate_rule_names() {
    let dir = TempDir::new();
    let f = dir.file(
        "dup.toml",
        &format!("{GOOD}{}", GOOD.replace("8000", "8001")),
    );
    let p = f.display().to_string();
    let (code, _, err) = run_cli(&["check", "--config", &p]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        format!(
            "{p}: invalid configuration (1 problem):\n  {p}:10:8: rule hello: `name`: duplicate rule name \"hello\" (first used at {p}:2:1)\n"
        )
    );
}

#[test]
fn check_toml_syntax_error_names_the_line() {
    let dir = TempDir::new();
    let f = dir.file("syntax.toml", "[[proxy]]\nname = \"a\nprotocol = \"tcp\"\n");
    let p = f.display().to_string();
    let (code, _, err) = run_cli(&["check", "--config", &p]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("{p}:2:")) && err.contains("TOML syntax error"),
        "{err}"
    );
}

#[test]
fn check_warns_about_namespaces_that_are_not_there() {
    let dir = TempDir::new();
    let text = GOOD.replace(
        "netns = [\"host\"]",
        "netns = [\"host\", \"nspt-never-created\", \"/etc/hostname\", \"/proc/self/ns/uts\"]",
    );
    let f = dir.file("ns.toml", &text);
    let p = f.display().to_string();
    let (code, out, err) = run_cli(&["check", "--config", &p]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("OK: 1 rule(s), 4 binding(s), 3 namespace warning(s)"),
        "{out}"
    );
    // Each at its own entry of the list, and saying what the daemon does:
    // a missing name is followed live, a path is looked at on (re)load.
    assert!(err.contains(&format!("warning: {p}:6:18: rule hello: `netns[1]`: namespace \"nspt-never-created\" not found: /run/netns/nspt-never-created does not exist (create it with `ip netns add nspt-never-created`); its binding waits, and opens when the name appears\n")), "{err}");
    assert!(
        err.contains(&format!("warning: {p}:6:40: rule hello: `netns[2]`: \"/etc/hostname\" is not a network namespace: /etc/hostname is on ")),
        "{err}"
    );
    assert!(err.contains(&format!("warning: {p}:6:57: rule hello: `netns[3]`: \"/proc/self/ns/uts\" is a uts namespace (/proc/self/ns/uts), not a network namespace; its binding does not listen until this is fixed and the config is reloaded\n")), "{err}");
    assert!(
        !err.contains("restarted") && !out.contains("restarted"),
        "{out}{err}"
    );

    let (code, _, err) = run_cli(&["check", "--strict", "--config", &p]);
    assert_eq!(code, 1);
    assert!(
        err.contains("error: ") && err.contains("3 namespace problem(s)"),
        "{err}"
    );
}

#[test]
fn check_takes_a_pattern_that_matches_nothing_as_a_note() {
    let dir = TempDir::new();
    let pattern = format!("nspt-{}-nothing-*", std::process::id());
    let text = GOOD.replace(
        "netns = [\"host\"]",
        &format!("netns = [\n  \"host\",\n  \"{pattern}\",\n]"),
    );
    let f = dir.file("glob.toml", &text);
    let p = f.display().to_string();
    for args in [
        &["check", "--config", &p][..],
        &["check", "--strict", "--config", &p],
    ] {
        let (code, out, err) = run_cli(args);
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        assert_eq!(
            err,
            format!(
                "note: {p}:8:3: rule hello: `netns[1]`: \"{pattern}\" matches no name under /run/netns now; the rule listens in each matching namespace as it appears\n"
            ),
            "{args:?}"
        );
        assert!(!err.contains("warning") && !err.contains("error"), "{err}");
        assert_eq!(
            out,
            format!(
                "{p}: OK: 1 rule(s), 1 binding(s) (0 from 1 pattern(s) over the namespaces there now; patterns follow them as they come and go), 1 note(s)\n"
            ),
            "{args:?}"
        );
    }
}

#[test]
fn check_counts_what_a_pattern_matches_in_real_namespaces() {
    as_root(|| {
        let a = TestNs::new("ckglob");
        let b = TestNs::new("ckglob");
        // Matches both, and no namespace another test makes (their tags differ).
        let pattern = format!("nspt-{}-*-ckglob", std::process::id());
        let dir = TempDir::new();
        let text = GOOD.replace(
            "netns = [\"host\"]",
            &format!(
                "netns = [\"{}\", \"{pattern}\"]\nupstream_netns = \"{}\"",
                a.name(),
                b.name()
            ),
        );
        let f = dir.file("glob.toml", &text);
        let p = f.display().to_string();
        let (code, out, err) = run_cli(&["check", "--strict", "--config", &p]);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(
            err, "",
            "a pattern that matches is neither a warning nor a note"
        );
        // a.name() listed exactly, and b.name() through the pattern (a's match
        // of the pattern is the same binding as its exact entry).
        assert!(
        out.ends_with(": OK: 1 rule(s), 2 binding(s) (1 from 1 pattern(s) over the namespaces there now; patterns follow them as they come and go)\n"),
        "{out}"
    );
    })
}

#[test]
fn check_looks_at_more_namespaces_than_it_has_fds() {
    as_root(|| {
        // 60 namespaces under a limit of 32 fds: each is closed once looked at.
        let many = TestNs::many("ckfd", 60);
        let list: Vec<String> = many.iter().map(|n| format!("\"{}\"", n.name())).collect();
        let dir = TempDir::new();
        let text = GOOD.replace(
            "netns = [\"host\"]",
            &format!("netns = [{}]", list.join(", ")),
        );
        let f = dir.file("many.toml", &text);
        let p = f.display().to_string();
        let out = std::process::Command::new("sh")
            .args([
                "-c",
                "ulimit -n 32 && exec \"$0\" check --strict --config \"$1\"",
                bin(),
                &p,
            ])
            .output()
            .expect("run nsproxy check under ulimit");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
        assert_eq!(stderr, "");
        assert!(
            stdout.ends_with(": OK: 1 rule(s), 60 binding(s)\n"),
            "{stdout}"
        );
    })
}

#[test]
fn missing_config_file_is_named() {
    let (code, _, err) = run_cli(&["check", "--config", "/nonexistent/nsproxy.toml"]);
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "cannot read config file /nonexistent/nsproxy.toml: No such file or directory"
        ),
        "{err}"
    );
    let (code, _, err) = run_cli(&["run", "--config", "/nonexistent/nsproxy.toml"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("cannot read config file /nonexistent/nsproxy.toml"),
        "{err}"
    );
}

#[test]
fn a_config_path_that_is_a_fifo_is_refused_without_waiting() {
    let dir = TempDir::new();
    let fifo = dir.file("placeholder", "").with_file_name("config.fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo {}", fifo.display());
    let fifo = fifo.to_str().unwrap();
    for (args, want_code) in [
        (["check", "--config", fifo], 1),
        (["run", "--config", fifo], 2),
    ] {
        let mut child = std::process::Command::new(bin())
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Bounded: a daemon that opened the FIFO for reading would wait for
        // a writer for ever.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{args:?} still waiting on the FIFO after 20 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(want_code), "{args:?}: {err}");
        assert!(
            err.contains(&format!(
                "cannot read config file {fifo}: it is a FIFO, not a regular file"
            )),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn forward_rejects_bad_specs_with_the_argument_named() {
    let (code, _, err) = run_cli(&[
        "forward",
        "tcp:[::]:8000@ns1",
        "tcp:127.0.0.1:1=[::1]:2@pid:zero",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("argument 1 (\"tcp:[::]:8000@ns1\"): no '=' between listen and upstream"),
        "{err}"
    );
    assert!(err.contains("argument 2 (\"tcp:127.0.0.1:1=[::1]:2@pid:zero\"): rule forward-2: `upstream_netns`: \"pid:zero\" is not a valid pid"), "{err}");
}

/// The Debian package's man pages and completions
/// (`scripts/package-deb.sh`): one page per visible subcommand, none for
/// the hidden ones, and completions that do not offer them either.
#[test]
fn generate_writes_man_pages_and_completions_without_hidden_subcommands() {
    let dir = TempDir::new();
    let d = dir.0.to_str().unwrap();
    let (code, _, err) = run_cli(&["__generate", "man", d]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run_cli(&["__generate", "completions", d]);
    assert_eq!(code, 0, "{err}");
    let mut names: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "_nsproxy",
            "nsproxy-check.1",
            "nsproxy-forward.1",
            "nsproxy-reload.1",
            "nsproxy-run.1",
            "nsproxy-status.1",
            "nsproxy.1",
            "nsproxy.bash",
            "nsproxy.fish",
        ]
    );
    let run = std::fs::read_to_string(format!("{d}/nsproxy-run.1")).unwrap();
    assert!(run.contains(r"\fB\-\-config\fR"), "{run}");
    assert!(run.contains("The TOML config file"), "{run}");
    for f in ["_nsproxy", "nsproxy.bash", "nsproxy.fish"] {
        let text = std::fs::read_to_string(format!("{d}/{f}")).unwrap();
        assert!(text.contains("forward"), "{f} has no `forward`");
        assert!(
            !text.contains("__broker") && !text.contains("__generate"),
            "{f} offers a hidden subcommand"
        );
    }
    let (code, _, err) = run_cli(&["__generate", "man", "/nonexistent/nsproxy-test"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot write into /nonexistent/nsproxy-test: No such file or directory"),
        "{err}"
    );
}
