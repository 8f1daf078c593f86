//! Dedup without sending: a blob this node knows is stored costs one HEAD, not its body.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::json;

use crate::support::{Harness, S3Server};

/// A TCP proxy on 127.0.0.1 that counts the bytes clients send through it.
fn counting_proxy(target: u16) -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            let pipe = |mut from: TcpStream, mut to: TcpStream, count: Option<Arc<AtomicU64>>| {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64 * 1024];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        if let Some(c) = &count {
                            c.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            };
            pipe(
                client.try_clone().unwrap(),
                server.try_clone().unwrap(),
                Some(counter.clone()),
            );
            pipe(server, client, None);
        }
    });
    (port, sent)
}

const FILES: usize = 30;
const SIZE: usize = 64 * 1024;

fn write_files(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..FILES {
        let data: Vec<u8> = (0..SIZE).map(|j| (j * 31 + i * 7) as u8).collect();
        std::fs::write(dir.join(format!("f{i}")), data).unwrap();
    }
}

#[test]
fn a_rerun_of_the_same_output_sends_no_bodies_again() {
    let s3 = S3Server::start();
    let (port, sent) = counting_proxy(s3.port);
    let mut h = Harness::file();
    h.extra_toml = s3
        .store_toml("pre")
        .replace(&s3.endpoint(), &format!("http://127.0.0.1:{port}"))
        + "[sync]\nlive = false\n";
    let body = (FILES * SIZE) as u64;
    for (job, expect_new) in [("d1", true), ("d2", false)] {
        write_files(&h.workdir(job).join("artifacts"));
        let before = sent.load(Ordering::Relaxed);
        h.run_job(json!({"job_id": job, "command": ["true"]}))
            .assert_code(0);
        let bytes = sent.load(Ordering::Relaxed) - before;
        let ls = h.run(&["ls", job, "--json"]);
        ls.assert_code(0);
        let m: serde_json::Value = serde_json::from_str(ls.stdout.trim()).unwrap();
        assert_eq!(m["complete"], true);
        assert_eq!(m["files"].as_array().unwrap().len(), FILES);
        if expect_new {
            assert!(bytes >= body, "the first run sends the files: {bytes}");
        } else {
            // HEADs, the manifest and the logs: a small fraction of the bodies.
            assert!(
                bytes < body / 10,
                "the rerun sent {bytes} bytes for {body} bytes of known blobs"
            );
        }
    }
}
