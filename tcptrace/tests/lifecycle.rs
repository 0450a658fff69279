//! Root-only, in a test binary of its own so that no other probe loads meanwhile: however
//! tcptrace ends, nothing it loaded stays in the kernel.

mod common;

use std::{
    collections::HashSet,
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::root_or_skip;

/// Ids of the loaded BPF programs whose names are tcptrace's (the kernel keeps 15 chars).
fn ours() -> HashSet<u32> {
    const NAMES: [&str; 12] = [
        // The kernel keeps 15 characters: `btf_set_state` covers its nested copy too.
        "inet_sock_set_s",
        "tcp_send_reset",
        "tcp_receive_res",
        "timer_start",
        "timer_cancel",
        "timer_expire_en",
        "btf_set_state",
        "btf_send_reset",
        "btf_receive_res",
        "btf_timer_start",
        "btf_timer_cance",
        "btf_timer_expir",
    ];
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| {
            p.name_as_str()
                .is_some_and(|n| NAMES.iter().any(|x| n.starts_with(x)))
        })
        .map(|p| p.id())
        .collect()
}

/// Our loaded programs once none of `mine` is left, or after 10 s.
fn unloaded(mine: &HashSet<u32>) -> HashSet<u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = ours();
        if mine.is_disjoint(&now) || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start(args: &[&str], stdout: Stdio) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tcptrace"))
        .args(args)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    common::wait_tracing(&mut child);
    child
}

/// One connection on `port`, so the tracer has something to print.
fn poke(port: u16) {
    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
    drop(TcpStream::connect(("127.0.0.1", port)).unwrap());
    drop(l.accept().unwrap());
}

fn wait(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "tcptrace did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn nothing_stays_loaded_after_any_exit() {
    if !root_or_skip("nothing_stays_loaded_after_any_exit") {
        return;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let p = port.to_string();
    let before = ours();
    type Ending = (&'static str, Box<dyn Fn(&mut Child)>);
    let signal = |sig: i32| -> Box<dyn Fn(&mut Child)> {
        // SAFETY: signalling our own child.
        Box::new(move |c: &mut Child| unsafe {
            libc::kill(c.id() as i32, sig);
        })
    };
    let endings: Vec<(Ending, Vec<&str>, bool)> = vec![
        (("SIGINT", signal(libc::SIGINT)), vec!["--port", &p], true),
        (("SIGTERM", signal(libc::SIGTERM)), vec!["--port", &p], true),
        (
            ("--count reached", Box::new(move |_: &mut Child| poke(port))),
            vec!["--port", &p, "--count", "1"],
            true,
        ),
        (
            (
                "two Ctrl-C",
                // SAFETY: signalling our own child process.
                Box::new(|c: &mut Child| unsafe {
                    libc::kill(c.id() as i32, libc::SIGINT);
                    libc::kill(c.id() as i32, libc::SIGINT);
                }),
            ),
            vec!["--port", &p],
            false,
        ),
    ];
    for ((what, end), args, clean_exit) in endings {
        let mut child = start(&args, Stdio::null());
        let during = ours();
        let mine: HashSet<u32> = during.difference(&before).copied().collect();
        assert!(
            !mine.is_empty(),
            "{what}: its programs are loaded while it runs"
        );
        end(&mut child);
        let st = wait(&mut child);
        if clean_exit {
            assert!(st.success(), "{what}: {st:?}");
        }
        // The kernel frees a detached program after an RCU grace period: give it a moment.
        let after = unloaded(&mine);
        assert!(
            mine.is_disjoint(&after),
            "{what}: still loaded: {:?}",
            mine.intersection(&after)
        );
    }
    // A closed pipe (`| head`): the write fails, tcptrace ends quietly with 0.
    let mut child = start(&["--port", &p], Stdio::piped());
    let mine: HashSet<u32> = ours().difference(&before).copied().collect();
    drop(child.stdout.take());
    poke(port);
    let st = wait(&mut child);
    assert!(st.success(), "a closed pipe ends quietly: {st:?}");
    assert!(
        mine.is_disjoint(&unloaded(&mine)),
        "closed pipe: still loaded"
    );
}
