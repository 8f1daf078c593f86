//! End-to-end tests: the real `c3-agent` binary against the file store, a real S3 server
//! (s3s-fs) and a recording control plane, all on 127.0.0.1.

// Tests fail by panicking: unwrap is the assertion.
#![allow(clippy::unwrap_used)]

mod support;

mod bandwidth;
mod control_plane;
mod dedup;
mod faults;
mod filesystems;
mod input;
mod lifecycle;
mod live;
mod log_reference;
mod logs;
mod lying_store;
mod names;
mod operations;
mod publish;
mod records;
mod resume;
mod schedulers;
mod stores;
