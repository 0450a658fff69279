//! Host-side stub: the eBPF programs themselves are the `tcptrace` binary of this crate,
//! built for `bpfel-unknown-none` by `tcptrace/build.rs`. This empty library only exists so
//! the userspace crate can list the eBPF crate as a build-dependency (and be rebuilt when it
//! changes).
#![no_std]
