//! A stage's exit status, reported by the stage itself at the end of its output.
//!
//! Asking the engine for a container's exit status (`/wait`, `/json`) blocks on Podman until
//! its exit cleanup has run (a `podman container cleanup` process that conmon starts, which
//! takes the container's lock): a few hundred milliseconds per container on a small
//! instance. So each stage prints its status as the last line of its stderr from an EXIT
//! trap, and the executor takes that line out of the output and uses it; a stage that ends
//! without it (killed, or a script that replaced the trap) is asked about through `/wait`.
//! A job can fake its own line; it can as well `exit 0`, so nothing is lost.

/// What begins the line; a NUL byte, so no ordinary output looks like it.
const MARKER: &[u8] = b"\0podfleet-exit:";

/// Longest status text after [`MARKER`] (`-2147483648`).
const MAX_CODE_LEN: usize = 11;

/// The first line of a POSIX shell stage script: prints the line on exit, whatever the exit.
pub(crate) const SHELL_TRAP: &str = "trap 'printf \"\\000podfleet-exit:%d\\n\" \"$?\" >&2' EXIT\n";

/// A command that runs `argv` under `sh` with [`SHELL_TRAP`] (for podfleet's own helper
/// image, which has a shell).
pub(crate) fn wrap(argv: &[String]) -> Vec<String> {
    let mut command = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        format!("{SHELL_TRAP}\"$@\""),
        "sh".to_owned(),
    ];
    command.extend(argv.iter().cloned());
    command
}

/// Passes a stage's stderr through, taking out the status line.
#[derive(Debug, Default)]
pub(crate) struct ExitMarker {
    /// Bytes that may begin a status line, held until more arrive.
    held: Vec<u8>,
    code: Option<i32>,
}

impl ExitMarker {
    /// The stderr bytes to show, out of `bytes` and what was held back before.
    pub(crate) fn stderr(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut data = std::mem::take(&mut self.held);
        data.extend_from_slice(bytes);
        let mut shown = Vec::with_capacity(data.len());
        let mut rest = &data[..];
        loop {
            let Some(at) = find(rest, MARKER) else {
                // Hold back the longest end that could begin a status line.
                let keep = (1..MARKER.len().min(rest.len() + 1))
                    .rev()
                    .find(|&n| rest.ends_with(&MARKER[..n]))
                    .unwrap_or(0);
                shown.extend_from_slice(&rest[..rest.len() - keep]);
                self.held = rest[rest.len() - keep..].to_vec();
                return shown;
            };
            shown.extend_from_slice(&rest[..at]);
            let after = &rest[at + MARKER.len()..];
            match after.iter().position(|&b| b == b'\n') {
                Some(end) => match parse(&after[..end]) {
                    Some(code) => {
                        self.code = Some(code);
                        rest = &after[end + 1..];
                    }
                    None => {
                        // Not a status line after all: show it.
                        shown.extend_from_slice(&rest[at..at + MARKER.len()]);
                        rest = after;
                    }
                },
                None if after.len() <= MAX_CODE_LEN
                    && after.iter().all(|b| b.is_ascii_digit() || *b == b'-') =>
                {
                    self.held = rest[at..].to_vec();
                    return shown;
                }
                None => {
                    shown.extend_from_slice(&rest[at..at + MARKER.len()]);
                    rest = after;
                }
            }
        }
    }

    /// The bytes of `output` the trace shows: stderr without the status line.
    pub(crate) fn shown(&mut self, output: bollard::container::LogOutput) -> Vec<u8> {
        use bollard::container::LogOutput;
        match output {
            LogOutput::StdErr { message } => self.stderr(&message),
            LogOutput::StdOut { message } | LogOutput::Console { message } => message.to_vec(),
            LogOutput::StdIn { .. } => Vec::new(),
        }
    }

    /// What is still held back, to show once the output has ended.
    pub(crate) fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }

    /// The status the stage reported, if it did.
    pub(crate) fn code(&self) -> Option<i32> {
        self.code
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse(text: &[u8]) -> Option<i32> {
    if text.len() > MAX_CODE_LEN {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(chunks: &[&[u8]]) -> (Vec<u8>, Option<i32>) {
        let mut marker = ExitMarker::default();
        let mut shown = Vec::new();
        for chunk in chunks {
            shown.extend(marker.stderr(chunk));
        }
        shown.extend(marker.finish());
        (shown, marker.code())
    }

    #[test]
    fn the_status_line_is_taken_out_and_read() {
        assert_eq!(
            run(&[b"warning: x\n\0podfleet-exit:3\n"]),
            (b"warning: x\n".to_vec(), Some(3))
        );
        assert_eq!(run(&[b"\0podfleet-exit:0\n"]), (Vec::new(), Some(0)));
        assert_eq!(run(&[b"no line\n"]), (b"no line\n".to_vec(), None));
    }

    #[test]
    fn what_only_looks_like_it_is_shown() {
        let text: &[u8] = b"a\0podfleet-exit:nope\nb\0podfleet-exit:1";
        assert_eq!(run(&[text]), (text.to_vec(), None));
        let nul_at_end: &[u8] = b"binary \0";
        assert_eq!(run(&[nul_at_end]), (nul_at_end.to_vec(), None));
    }

    proptest! {
        /// Wherever the output is cut into chunks, the same bytes are shown and the same
        /// status is read.
        #[test]
        fn chunking_changes_nothing(
            output in proptest::collection::vec(any::<u8>(), 0..200),
            code in any::<i32>(),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let mut whole = output.clone();
            whole.extend_from_slice(format!("\0podfleet-exit:{code}\n").as_bytes());
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (whole.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for point in points {
                chunks.push(&whole[start..point]);
                start = point;
            }
            chunks.push(&whole[start..]);
            let (shown, read) = run(&chunks);
            let (shown_whole, read_whole) = run(&[&whole]);
            prop_assert_eq!(&shown, &shown_whole);
            prop_assert_eq!(read, read_whole);
            if !output.windows(MARKER.len()).any(|w| w == MARKER) {
                prop_assert_eq!(shown, output);
                prop_assert_eq!(read, Some(code));
            }
        }
    }
}
