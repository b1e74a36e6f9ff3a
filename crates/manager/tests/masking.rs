//! Masking over a real GitLab.com job log (2.8 MB): secrets taken from the log itself, so
//! that they really occur, never survive whatever the write size, and the result does not
//! depend on how the log was cut.

use podfleet_manager::mask::{DEFAULT_TOKEN_PREFIXES, Masker};

fn log() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/gitlab_com.raw.log"
    ))
    .unwrap()
}

/// Distinct 8-to-24-byte printable, single-line substrings of the log at spread-out offsets.
fn secrets_from(log: &[u8]) -> Vec<String> {
    let mut secrets: Vec<String> = Vec::new();
    let mut offset = 1_000;
    let mut length = 8;
    while secrets.len() < 12 && offset < log.len() - 64 {
        let candidate = &log[offset..offset + length];
        if candidate.iter().all(|b| b.is_ascii_graphic()) {
            let text = String::from_utf8(candidate.to_vec()).unwrap();
            if !secrets.contains(&text) {
                secrets.push(text);
                length = 8 + (length + 5) % 17;
            }
        }
        offset += 211_517;
        if offset >= log.len() - 64 {
            offset = offset % 97_001 + 1;
        }
    }
    secrets
}

fn mask(log: &[u8], secrets: &[String], chunk: usize) -> Vec<u8> {
    let mut masker = Masker::with_rules(
        secrets.to_vec(),
        DEFAULT_TOKEN_PREFIXES.map(String::from),
        true,
    );
    let mut out = Vec::with_capacity(log.len());
    for piece in log.chunks(chunk) {
        out.extend(masker.write(piece));
    }
    out.extend(masker.flush());
    out
}

fn occurrences(haystack: &[u8], needle: &[u8]) -> usize {
    aho_corasick::AhoCorasick::new([needle])
        .unwrap()
        .find_iter(haystack)
        .count()
}

#[test]
fn no_masked_value_survives_in_the_real_log_at_any_chunk_size() {
    let log = log();
    let secrets = secrets_from(&log);
    assert_eq!(secrets.len(), 12, "{secrets:?}");
    for secret in &secrets {
        assert!(occurrences(&log, secret.as_bytes()) > 0);
    }
    let whole = mask(&log, &secrets, log.len());
    for secret in &secrets {
        assert_eq!(
            occurrences(&whole, secret.as_bytes()),
            0,
            "{secret:?} survived"
        );
    }
    assert!(occurrences(&whole, b"[MASKED]") >= secrets.len());
    for chunk in [13, 509, 4096, 65_536] {
        assert!(
            mask(&log, &secrets, chunk) == whole,
            "chunk size {chunk} changes the result"
        );
    }
    // Byte by byte over the first 64 KiB (the whole log would only repeat the same cuts).
    let head = &log[..65_536];
    assert!(mask(head, &secrets, 1) == mask(head, &secrets, head.len()));
}
