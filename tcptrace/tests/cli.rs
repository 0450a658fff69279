//! The binary's answers to bad input: a clear message naming the offending value, exit 2,
//! never a panic. No root needed (nothing here reaches the kernel).

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tcptrace"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    assert!(!err.contains("stack backtrace"), "{args:?}: {err}");
    (out.status.code(), err)
}

#[test]
fn bad_flags_exit_2_naming_the_value() {
    for (args, needle) in [
        (&["--state", "TIME_WIAT"][..], "did you mean TIME_WAIT?"),
        (&["--port", "70000"], "70000"),
        (&["--lport", "0"], "'0'"),
        (&["--raddr", "10.0.0.0/33"], "10.0.0.0/33"),
        (&["--duration", "soon"], "soon"),
        (&["-4", "-6"], "cannot be used with"),
        (&["--from", "x", "--record", "y"], "cannot be used with"),
        (&["report", "--interval", "0s"], "more than zero"),
        (&["hist", "--by", "colour"], "colour"),
        (&["--port", "80", "report"], "report"),
        (&["serve", "--state", "TIME_WAIT"], "--state does not apply"),
        (&["serve", "--listen", "localhost"], "'localhost'"),
        (&["serve", "--label-port", "80-70"], "80-70"),
        (&["serve", "--max-port-labels", "0"], "'0'"),
        (
            &["--netns", "/nonexistent/ns"],
            "cannot open /nonexistent/ns",
        ),
        (&["--netns", "/proc/self/status"], "not a namespace file"),
        (
            &["report", "--netns", "no-such-ns"],
            "/run/netns/no-such-ns",
        ),
        (&["hist", "--netns", "0"], "'0'"),
        (&["--cgroup", "web app"], "'web app'"),
        (&["timewait", "--cgroup", "/a/../b"], "'..'"),
        // Its output is a pipe here: the view needs a terminal.
        (&["top"], "use `tcptrace report --interval 1s`"),
        (&["top", "--interval", "0s"], "more than zero"),
    ] {
        let (code, err) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?} should name {needle}: {err}");
    }
}

#[test]
fn bad_recordings_exit_2_naming_the_problem() {
    let dir = std::env::temp_dir().join(format!("tcptrace-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p.display().to_string()
    };
    let mut header = b"TCPTRACE".to_vec();
    header.extend_from_slice(&1u32.to_le_bytes());
    header.extend_from_slice(&96u32.to_le_bytes());
    header.extend_from_slice(&[0u8; 16]);
    let mut newer = header.clone();
    newer[8] = 9;
    let mut truncated = header.clone();
    truncated.extend_from_slice(&[0u8; 50]);
    let mut corrupt = header.clone();
    let mut ev = [0u8; 96];
    ev[90] = 1; // a transition…
    ev[88] = 2; // …IPv4…
    ev[91] = 99; // …from a state that does not exist
    corrupt.extend_from_slice(&ev);
    for (path, needle) in [
        (
            file("text", b"hello"),
            "not a tcptrace recording".to_string(),
        ),
        (file("newer", &newer), "format version 9".to_string()),
        (
            file("truncated", &truncated),
            "truncated: 50 stray bytes at byte 32".to_string(),
        ),
        (
            file("corrupt", &corrupt),
            "corrupt at byte 32: unknown TCP state 99".to_string(),
        ),
        (
            dir.join("missing").display().to_string(),
            "No such file".to_string(),
        ),
    ] {
        for view in [&[][..], &["report"][..], &["hist"][..], &["timewait"][..]] {
            let mut args: Vec<&str> = view.to_vec();
            args.extend(["--from", &path]);
            let (code, err) = run(&args);
            assert_eq!(code, Some(2), "{args:?}: {err}");
            assert!(err.contains(&needle), "{args:?} should say {needle}: {err}");
            assert!(err.contains(&path), "{args:?} names the file: {err}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A recording written before namespaces and cgroups (format 1) replays, without them.
#[test]
fn format_1_recordings_replay() {
    let dir = std::env::temp_dir().join(format!("tcptrace-cli-v1-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut bytes = b"TCPTRACE".to_vec();
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes.extend_from_slice(&96u32.to_le_bytes());
    bytes.extend_from_slice(&[0u8; 16]);
    let t = tcptrace::model::event::encode(&tcptrace::model::event::Transition {
        ts_ns: 1,
        skaddr: 2,
        local: "127.0.0.1:5000".parse().unwrap(),
        remote: "127.0.0.1:80".parse().unwrap(),
        from: tcptrace::model::event::State::SynSent,
        to: tcptrace::model::event::State::Established,
        in_from_ns: None,
        owner: None,
        mptcp: false,
        netns: None,
        cgroup: None,
    });
    bytes.extend_from_slice(&bytemuck::bytes_of(&t)[..96]);
    let path = dir.join("v1.tcptrace");
    std::fs::write(&path, &bytes).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tcptrace"))
        .args(["--json", "--from"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.contains(r#""from":"SYN_SENT","to":"ESTABLISHED""#)
            && text.contains(r#""netns":null,"cgroup":null}"#),
        "{text}"
    );
    // A namespace filter matches nothing in it: its sockets' namespaces are unknown.
    let out = Command::new(env!("CARGO_BIN_EXE_tcptrace"))
        .args(["--json", "--netns", "4026531840", "--from"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn help_has_examples_everywhere() {
    for sub in [
        &[][..],
        &["report"],
        &["hist"],
        &["timewait"],
        &["check"],
        &["completions"],
    ] {
        let mut args = sub.to_vec();
        args.push("--help");
        let out = Command::new(env!("CARGO_BIN_EXE_tcptrace"))
            .args(&args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success());
        assert!(text.contains("Examples:"), "{args:?}: {text}");
    }
}
