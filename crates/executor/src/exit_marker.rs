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

/// What a stage's output turns into for the trace.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Bytes to show.
    Shown(Vec<u8>),
    /// One of several helper stages in the container ended with this status (see
    /// `HelperBatch`): what follows is the next stage's output.
    StageEnd(i32),
}

/// Finds the lines that begin with `marker` and end in a status, in a stream cut anywhere.
#[derive(Debug)]
struct StatusLines {
    marker: &'static [u8],
    /// Bytes that may begin a status line, held until more arrive.
    held: Vec<u8>,
}

impl StatusLines {
    fn new(marker: &'static [u8]) -> Self {
        Self {
            marker,
            held: Vec::new(),
        }
    }

    /// `bytes` (after what was held back) as text to show and statuses (as
    /// [`Piece::StageEnd`]), in stream order.
    fn scan(&mut self, bytes: &[u8]) -> Vec<Piece> {
        let mut pieces = Vec::new();
        let marker = self.marker;
        let mut data = std::mem::take(&mut self.held);
        data.extend_from_slice(bytes);
        let mut shown = Vec::with_capacity(data.len());
        let mut rest = &data[..];
        let held = loop {
            let Some(at) = find(rest, marker) else {
                // Hold back the longest end that could begin a status line.
                let keep = (1..marker.len().min(rest.len() + 1))
                    .rev()
                    .find(|&n| rest.ends_with(&marker[..n]))
                    .unwrap_or(0);
                shown.extend_from_slice(&rest[..rest.len() - keep]);
                break rest[rest.len() - keep..].to_vec();
            };
            shown.extend_from_slice(&rest[..at]);
            let after = &rest[at + marker.len()..];
            match after.iter().position(|&b| b == b'\n') {
                Some(end) => match parse(&after[..end]) {
                    Some(code) => {
                        if !shown.is_empty() {
                            pieces.push(Piece::Shown(std::mem::take(&mut shown)));
                        }
                        pieces.push(Piece::StageEnd(code));
                        rest = &after[end + 1..];
                    }
                    None => {
                        // Not a status line after all: show it.
                        shown.extend_from_slice(&rest[at..at + marker.len()]);
                        rest = after;
                    }
                },
                None if after.len() <= MAX_CODE_LEN
                    && after.iter().all(|b| b.is_ascii_digit() || *b == b'-') =>
                {
                    break rest[at..].to_vec();
                }
                None => {
                    shown.extend_from_slice(&rest[at..at + marker.len()]);
                    rest = after;
                }
            }
        };
        self.held = held;
        if !shown.is_empty() {
            pieces.push(Piece::Shown(shown));
        }
        pieces
    }
}

/// Passes a stage's output through, taking out its exit status line (stderr) and, for
/// several helper stages in one container, the lines that end each stage (stdout).
#[derive(Debug)]
pub(crate) struct ExitMarker {
    exit: StatusLines,
    stage_ends: Option<StatusLines>,
    code: Option<i32>,
}

impl Default for ExitMarker {
    fn default() -> Self {
        Self {
            exit: StatusLines::new(MARKER),
            stage_ends: None,
            code: None,
        }
    }
}

impl ExitMarker {
    /// Also reads stage ends: lines on stdout beginning with `marker`, then the status.
    pub(crate) fn with_stage_ends(marker: &'static str) -> Self {
        Self {
            stage_ends: Some(StatusLines::new(marker.as_bytes())),
            ..Self::default()
        }
    }

    /// The stderr bytes to show, out of `bytes` and what was held back before.
    pub(crate) fn stderr(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut shown = Vec::new();
        for piece in self.exit.scan(bytes) {
            match piece {
                Piece::Shown(bytes) => shown.extend(bytes),
                // On stderr, the status is the container's exit status.
                Piece::StageEnd(code) => self.code = Some(code),
            }
        }
        shown
    }

    /// What `output` shows in the trace, and the stage ends in it, in order.
    pub(crate) fn pieces(&mut self, output: bollard::container::LogOutput) -> Vec<Piece> {
        use bollard::container::LogOutput;
        match output {
            LogOutput::StdErr { message } => vec![Piece::Shown(self.stderr(&message))],
            LogOutput::StdOut { message } | LogOutput::Console { message } => {
                match self.stage_ends.as_mut() {
                    Some(lines) => lines.scan(&message),
                    None => vec![Piece::Shown(message.to_vec())],
                }
            }
            LogOutput::StdIn { .. } => Vec::new(),
        }
    }

    /// The bytes of `output` the trace shows (stage ends dropped).
    pub(crate) fn shown(&mut self, output: bollard::container::LogOutput) -> Vec<u8> {
        self.pieces(output)
            .into_iter()
            .flat_map(|piece| match piece {
                Piece::Shown(bytes) => bytes,
                Piece::StageEnd(_) => Vec::new(),
            })
            .collect()
    }

    /// What is still held back, to show once the output has ended.
    pub(crate) fn finish(&mut self) -> Vec<u8> {
        let mut held = self
            .stage_ends
            .as_mut()
            .map(|lines| std::mem::take(&mut lines.held))
            .unwrap_or_default();
        held.append(&mut self.exit.held);
        held
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

    #[test]
    fn stage_ends_on_stdout_come_out_in_order_with_the_output() {
        use bollard::container::LogOutput;
        let mut marker = ExitMarker::with_stage_ends("\0podfleet-stage-end:");
        let out = |text: &'static [u8]| LogOutput::StdOut {
            message: text.into(),
        };
        let mut pieces = marker.pieces(out(b"cache restored\n\0podfleet-stage"));
        pieces.extend(marker.pieces(out(b"-end:0\nartifacts\n")));
        pieces.extend(marker.pieces(LogOutput::StdErr {
            message: b"\0podfleet-exit:1\n"[..].into(),
        }));
        assert_eq!(
            pieces,
            [
                Piece::Shown(b"cache restored\n".to_vec()),
                Piece::StageEnd(0),
                Piece::Shown(b"artifacts\n".to_vec()),
                Piece::Shown(Vec::new()),
            ]
        );
        assert_eq!(marker.code(), Some(1));
        // Without stage ends, the same line on stdout is ordinary output.
        let mut plain = ExitMarker::default();
        assert_eq!(
            plain.shown(out(b"\0podfleet-stage-end:0\n")),
            b"\0podfleet-stage-end:0\n"
        );
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
