//! Masking throughput on a real 2.8 MB GitLab.com job log: `cargo bench -p podfleet-manager
//! --bench mask`. Prints MB/s on one core for several write sizes and numbers of masked
//! values (plus gitlab-runner's default token prefixes and URL parameters). Not a test: it
//! asserts nothing.

use std::time::Instant;

use podfleet_manager::mask::{DEFAULT_TOKEN_PREFIXES, Masker};

fn main() {
    let log = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/gitlab_com.raw.log"
    ))
    .expect("the log fixture");
    // `cargo bench` passes --bench; under `cargo test` one round checks that it runs.
    let rounds = if std::env::args().any(|a| a == "--bench") {
        20
    } else {
        1
    };
    println!("masking {} bytes x {rounds} rounds, one thread", log.len());
    println!("{:>9} {:>8} {:>10}", "secrets", "write", "MB/s");
    for secrets in [0usize, 10, 100] {
        let phrases: Vec<String> = (0..secrets)
            .map(|i| format!("s3cr3t-{i:04}-value-xyz"))
            .collect();
        for chunk in [4096usize, 65_536] {
            let mut masker = Masker::with_rules(
                phrases.clone(),
                DEFAULT_TOKEN_PREFIXES.map(String::from),
                true,
            );
            let started = Instant::now();
            let mut bytes_out = 0;
            for _ in 0..rounds {
                for piece in log.chunks(chunk) {
                    bytes_out += masker.write(piece).len();
                }
                bytes_out += masker.flush().len();
            }
            let seconds = started.elapsed().as_secs_f64();
            let mb_per_s = (log.len() * rounds) as f64 / seconds / 1e6;
            println!("{secrets:>9} {chunk:>8} {mb_per_s:>10.0}");
            std::hint::black_box(bytes_out);
        }
    }
}
