//! Writes a synthetic recording: SOCKETS client connections that open (CLOSE→SYN_SENT→
//! ESTABLISHED) and stay open, so that replaying it makes tcptrace follow that many sockets
//! at once. `cargo xtask bench` replays it to measure memory per followed socket.
//!
//! Usage: cargo run --release -p tcptrace --example synth -- SOCKETS FILE

use std::{fs::File, io::BufWriter, net::SocketAddr};

use anyhow::{Context as _, Result, bail};
use tcptrace::{
    model::event::{Comm, Owner, RawEvent, State, Transition, encode},
    source::record::Writer,
};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [n, path] = args.as_slice() else {
        bail!("usage: synth SOCKETS FILE");
    };
    let n: u64 = n
        .parse()
        .with_context(|| format!("'{n}' is not a number"))?;
    let file = File::create(path).with_context(|| format!("cannot create {path}"))?;
    let mut w = Writer::new(BufWriter::with_capacity(1 << 20, file), 0, 0)?;
    let server: SocketAddr = "10.1.0.1:443".parse()?;
    let owner = Some(Owner {
        pid: 4242,
        comm: Comm(*b"synth\0\0\0\0\0\0\0\0\0\0\0"),
        from_listener: false,
    });
    let mut batch: Vec<RawEvent> = Vec::with_capacity(8192);
    for i in 0..n {
        // Kernel-like addresses: slab objects 2 KiB apart in the direct map.
        let skaddr = 0xffff_8880_0000_0000 + i * 2048;
        let local = SocketAddr::from((
            [10, 2, (i >> 16) as u8, (i >> 8) as u8],
            1024 + (i & 0xff) as u16,
        ));
        let ts = 1_000_000_000 + i * 1_000;
        for (from, to, dt) in [
            (State::Close, State::SynSent, 0),
            (State::SynSent, State::Established, 50),
        ] {
            batch.push(encode(&Transition {
                ts_ns: ts + dt,
                skaddr,
                local,
                remote: server,
                from,
                to,
                in_from_ns: (dt > 0).then_some(dt),
                owner,
                mptcp: false,
                netns: Some(4_026_531_840),
                cgroup: Some(1),
            }));
        }
        if batch.len() >= 8000 {
            w.write(&batch)?;
            batch.clear();
        }
    }
    w.write(&batch)?;
    w.flush()?;
    Ok(())
}
