//! The in-memory job log: UTF-8 repair across writes, the output limit, and CRC-32 checksums.

/// The trace as accepted so far. Every byte in `bytes` is valid UTF-8 and is exactly what gets
/// uploaded, so checksum and size always describe the uploaded log.
#[derive(Debug)]
pub(crate) struct TraceBuffer {
    bytes: Vec<u8>,
    /// The start of a UTF-8 sequence cut by a write boundary (at most 3 bytes), held until the
    /// next write completes it.
    incomplete: Vec<u8>,
    limit: usize,
    limit_reached: bool,
    /// Every accepted byte is appended here too, before it can be uploaded, so a restarted
    /// manager can resend what the coordinator has not accepted (see `JobTrace::resume`).
    journal: Option<std::fs::File>,
}

const REPLACEMENT: &str = "\u{FFFD}";

/// gitlab-runner's exact notice when the output limit is hit.
pub(crate) fn limit_notice(limit: usize) -> String {
    format!(
        "\n\x1b[33;1mJob's log exceeded limit of {limit} bytes.\n\
         Job execution will continue but no more output will be collected.\x1b[0;m\n"
    )
}

impl TraceBuffer {
    pub(crate) fn new(limit: usize) -> Self {
        TraceBuffer {
            bytes: Vec::new(),
            incomplete: Vec::new(),
            limit,
            limit_reached: false,
            journal: None,
        }
    }

    /// A buffer that already holds `accepted` (a journal read back: valid UTF-8, limit
    /// applied) and journals what follows to `journal`.
    pub(crate) fn resumed(limit: usize, accepted: Vec<u8>, journal: Option<std::fs::File>) -> Self {
        let limit_reached = accepted.len() >= limit;
        TraceBuffer {
            bytes: accepted,
            incomplete: Vec::new(),
            limit,
            limit_reached,
            journal,
        }
    }

    pub(crate) fn set_journal(&mut self, journal: std::fs::File) {
        self.journal = Some(journal);
    }

    /// Appends to the log and to the journal.
    fn append(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
        if let Some(journal) = self.journal.as_mut() {
            use std::io::Write;
            if let Err(error) = journal.write_all(bytes) {
                // The job goes on; only its resumption after a manager restart is lost.
                tracing::warn!(%error, "writing the trace journal failed; this job cannot be resumed after a restart");
                self.journal = None;
            }
        }
    }

    /// Appends output, replacing invalid UTF-8 with U+FFFD and enforcing the limit.
    pub(crate) fn write(&mut self, input: &[u8]) {
        if self.limit_reached || input.is_empty() {
            return;
        }
        let mut data = std::mem::take(&mut self.incomplete);
        data.extend_from_slice(input);
        let mut text = String::with_capacity(data.len());
        let mut rest = data.as_slice();
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    break;
                }
                Err(error) => {
                    let (valid, after) = rest.split_at(error.valid_up_to());
                    // `valid` was just checked by from_utf8.
                    text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match error.error_len() {
                        Some(invalid_len) => {
                            text.push_str(REPLACEMENT);
                            rest = &after[invalid_len..];
                        }
                        None => {
                            self.incomplete = after.to_vec();
                            break;
                        }
                    }
                }
            }
        }
        self.append_limited(&text);
    }

    /// Ends the log: a sequence still incomplete can no longer be completed.
    pub(crate) fn close(&mut self) {
        if !self.incomplete.is_empty() {
            self.incomplete.clear();
            self.append_limited(REPLACEMENT);
        }
    }

    fn append_limited(&mut self, text: &str) {
        if self.limit_reached || text.is_empty() {
            return;
        }
        let room = self.limit.saturating_sub(self.bytes.len());
        if text.len() <= room {
            self.append(text.as_bytes());
            return;
        }
        let mut cut = room;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut limited = text.as_bytes()[..cut].to_vec();
        limited.extend_from_slice(limit_notice(self.limit).as_bytes());
        self.append(&limited);
        self.limit_reached = true;
        self.incomplete.clear();
    }

    pub(crate) fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Up to `max` bytes starting at `offset`.
    pub(crate) fn chunk(&self, offset: u64, max: usize) -> Vec<u8> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.bytes.len());
        let end = start.saturating_add(max).min(self.bytes.len());
        self.bytes[start..end].to_vec()
    }

    /// `crc32:%08x` over the first `len` bytes.
    pub(crate) fn checksum_of_prefix(&self, len: u64) -> String {
        let end = usize::try_from(len)
            .unwrap_or(usize::MAX)
            .min(self.bytes.len());
        format_checksum(crc32fast::hash(&self.bytes[..end]))
    }
}

/// Renders a CRC-32 (IEEE) the way GitLab expects it.
pub fn format_checksum(crc: u32) -> String {
    format!("crc32:{crc:08x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(buffer: &TraceBuffer) -> Vec<u8> {
        buffer.chunk(0, usize::MAX)
    }

    #[test]
    fn utf8_split_across_writes_is_reassembled() {
        let mut buffer = TraceBuffer::new(1024);
        let text = "héllo €uro";
        let bytes = text.as_bytes();
        for byte in bytes {
            buffer.write(std::slice::from_ref(byte));
        }
        buffer.close();
        assert_eq!(contents(&buffer), bytes);
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let mut buffer = TraceBuffer::new(1024);
        buffer.write(b"a\xffb\xe2\x82");
        buffer.close();
        assert_eq!(
            String::from_utf8(contents(&buffer)).expect("utf8"),
            "a\u{FFFD}b\u{FFFD}"
        );
    }

    #[test]
    fn output_limit_appends_the_notice_once_and_never_splits_a_character() {
        let mut buffer = TraceBuffer::new(10);
        buffer.write("12345678€€".as_bytes()); // '€' is 3 bytes: the first would end at 11
        buffer.write(b"more output");
        let text = String::from_utf8(contents(&buffer)).expect("stays valid utf8");
        assert_eq!(text, format!("12345678{}", limit_notice(10)));
        assert!(text.contains("Job's log exceeded limit of 10 bytes."));
        assert!(text.ends_with(
            "Job execution will continue but no more output will be collected.\x1b[0;m\n"
        ));
    }

    #[test]
    fn the_journal_holds_exactly_the_accepted_bytes() {
        let path = std::env::temp_dir().join(format!(
            "podfleet-trace-journal-{}-{:?}.trace",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut buffer = TraceBuffer::new(20);
        buffer.set_journal(std::fs::File::create(&path).expect("create"));
        buffer.write(b"ab\xe2\x82");
        buffer.write(b"\xacc\xff");
        buffer.write(b"0123456789012345");
        let journal = std::fs::read(&path).expect("read");
        assert_eq!(journal, contents(&buffer));
        let resumed = TraceBuffer::resumed(20, journal.clone(), None);
        assert_eq!(contents(&resumed), journal);
        assert!(
            resumed.limit_reached,
            "a journal past the limit stays limited"
        );
        std::fs::remove_file(&path).expect("remove");
    }

    #[test]
    fn checksum_is_crc32_ieee_in_lower_hex() {
        let mut buffer = TraceBuffer::new(1024);
        buffer.write(b"123456789");
        // The CRC-32/IEEE check value.
        assert_eq!(buffer.checksum_of_prefix(9), "crc32:cbf43926");
        assert_eq!(buffer.checksum_of_prefix(0), "crc32:00000000");
    }

    #[test]
    fn chunks_respect_offset_and_size() {
        let mut buffer = TraceBuffer::new(1024);
        buffer.write(b"abcdef");
        assert_eq!(buffer.chunk(2, 3), b"cde");
        assert_eq!(buffer.chunk(5, 3), b"f");
        assert!(buffer.chunk(9, 3).is_empty());
    }
}
