//! Masking of the job log as gitlab-runner does it: the values of masked variables become
//! `[MASKED]`; the value of sensitive URL parameters (`?private_token=…`) and the token
//! after a known token prefix (`glpat-…`) become `[MASKED]` with the key or prefix kept.
//!
//! It is a stream filter: a secret split across writes is still masked, because the tail that
//! could start one is held back until more output (or the end) decides it, and a token or
//! parameter value that continues into the next write keeps being dropped. Memory is bounded
//! by the longest pattern, whatever the job prints. Matching uses Aho-Corasick automata
//! (leftmost-longest, so the longest of overlapping secrets wins).

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, AhoCorasickKind, MatchKind};

const MASK: &[u8] = b"[MASKED]";

/// Token prefixes masked by default (gitlab-runner with `FF_MASK_ALL_DEFAULT_TOKENS`).
pub const DEFAULT_TOKEN_PREFIXES: [&str; 15] = [
    "glpat-",
    "gloas-",
    "gldt-",
    "glrt-",
    "glcbt-",
    "glrtr-",
    "glptt-",
    "glft-",
    "glimt-",
    "glagent-",
    "glsoat-",
    "glffct-",
    "_gitlab_session=",
    "gltok-",
    "GR1348941",
];

/// At most this many token prefixes are used, as in gitlab-runner.
const MAX_TOKEN_PREFIXES: usize = 15;

/// URL query parameters whose values are masked (case-insensitive keys).
const SENSITIVE_PARAMS: [&str; 6] = [
    "private_token",
    "authenticity_token",
    "rss_token",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// A masked variable's value: replaced whole.
    Phrase,
    /// A token prefix: kept, the token characters after it are masked.
    Token,
    /// `?key=` or `&key=`: kept, the value after it is masked.
    Param,
}

impl Kind {
    /// Whether `byte` still belongs to the value being masked after a prefix or key.
    fn continues(self, byte: u8) -> bool {
        match self {
            Kind::Phrase => false,
            Kind::Token => byte.is_ascii_alphanumeric() || b"._=-".contains(&byte),
            Kind::Param => !byte.is_ascii_whitespace() && !b"&#\"'<>".contains(&byte),
        }
    }
}

/// A match: absolute start, end, and the kind of pattern.
type Found = (usize, usize, Kind);

/// A value being dropped after a token prefix or parameter key.
#[derive(Clone, Copy, Debug)]
struct Skipping {
    kind: Kind,
    /// `[MASKED]` was written for it (only once a value byte is seen).
    masked: bool,
}

/// One automaton and the kind of each of its patterns.
struct Patterns {
    automaton: AhoCorasick,
    kinds: Vec<Kind>,
}

impl Patterns {
    fn build(patterns: Vec<(Vec<u8>, Kind)>, case_insensitive: bool) -> Option<Self> {
        if patterns.is_empty() {
            return None;
        }
        let automaton = AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .ascii_case_insensitive(case_insensitive)
            // Measured with `cargo bench --bench mask`: up to a few dozen patterns the
            // default choice is fastest; beyond, a full DFA is about 2.5 times faster.
            .kind((patterns.len() > 48).then_some(AhoCorasickKind::DFA))
            .build(patterns.iter().map(|(p, _)| p))
            .ok()?;
        Some(Self {
            automaton,
            kinds: patterns.into_iter().map(|(_, k)| k).collect(),
        })
    }

    /// The leftmost (then longest) match in `haystack`: (start, end, kind).
    fn find(&self, haystack: &[u8]) -> Option<(usize, usize, Kind)> {
        self.automaton
            .find(haystack)
            .map(|m| (m.start(), m.end(), self.kinds[m.pattern().as_usize()]))
    }
}

/// Masks secrets in a stream of writes.
pub struct Masker {
    exact: Option<Patterns>,
    params: Option<Patterns>,
    /// Length of the longest pattern: a match starting closer than this to the end of what
    /// has arrived may still grow.
    longest: usize,
    held: Vec<u8>,
    skipping: Option<Skipping>,
}

impl Masker {
    /// Masks `phrases` only (no token prefixes, no URL parameters).
    pub fn new(phrases: impl IntoIterator<Item = String>) -> Self {
        Self::with_rules(phrases, std::iter::empty::<String>(), false)
    }

    /// Masks `phrases`, the tokens after `token_prefixes` (at most 15 are used; duplicates
    /// removed) and, when `url_params` is set, sensitive URL parameter values.
    pub fn with_rules(
        phrases: impl IntoIterator<Item = String>,
        token_prefixes: impl IntoIterator<Item = String>,
        url_params: bool,
    ) -> Self {
        let mut exact: Vec<(Vec<u8>, Kind)> = phrases
            .into_iter()
            .filter(|p| !p.is_empty())
            .map(|p| (p.into_bytes(), Kind::Phrase))
            .collect();
        exact.sort();
        exact.dedup();
        let mut prefixes: Vec<String> = Vec::new();
        for prefix in token_prefixes {
            if !prefix.is_empty() && !prefixes.contains(&prefix) {
                prefixes.push(prefix);
            }
        }
        prefixes.truncate(MAX_TOKEN_PREFIXES);
        exact.extend(prefixes.into_iter().map(|p| (p.into_bytes(), Kind::Token)));
        let params: Vec<(Vec<u8>, Kind)> = if url_params {
            SENSITIVE_PARAMS
                .iter()
                .flat_map(|key| {
                    [b'?', b'&'].map(|sep| {
                        let mut pattern = vec![sep];
                        pattern.extend_from_slice(key.as_bytes());
                        pattern.push(b'=');
                        (pattern, Kind::Param)
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        let longest = exact
            .iter()
            .chain(&params)
            .map(|(p, _)| p.len())
            .max()
            .unwrap_or(1);
        Self {
            exact: Patterns::build(exact, false),
            params: Patterns::build(params, true),
            longest,
            held: Vec::new(),
            skipping: None,
        }
    }

    /// Takes a chunk of output; returns what can be emitted now.
    pub fn write(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(bytes.len() + self.held.len());
        if self.held.is_empty() {
            let kept = self.process(bytes, &mut out, false);
            self.held.extend_from_slice(&bytes[kept..]);
        } else {
            let mut buffer = std::mem::take(&mut self.held);
            buffer.extend_from_slice(bytes);
            let kept = self.process(&buffer, &mut out, false);
            buffer.drain(..kept);
            self.held = buffer;
        }
        out
    }

    /// Emits whatever is held back (the end of the stream).
    pub fn flush(&mut self) -> Vec<u8> {
        let buffer = std::mem::take(&mut self.held);
        let mut out = Vec::with_capacity(buffer.len());
        self.process(&buffer, &mut out, true);
        self.skipping = None;
        out
    }

    /// The earliest match at or after `pos` over both automata (on a tie the longer wins),
    /// in absolute positions. Each automaton's next match is remembered in `cache` until
    /// `pos` passes its start, so a buffer is scanned about once per automaton.
    fn next_match(
        &self,
        buffer: &[u8],
        pos: usize,
        cache: &mut [Option<Option<Found>>; 2],
    ) -> Option<(usize, usize, Kind)> {
        let mut lookup = |slot: usize, patterns: Option<&Patterns>| {
            let stale = match cache[slot] {
                None => true,
                Some(Some((start, _, _))) => start < pos,
                Some(None) => false,
            };
            if stale {
                cache[slot] = Some(
                    patterns
                        .and_then(|p| p.find(&buffer[pos..]))
                        .map(|(start, end, kind)| (pos + start, pos + end, kind)),
                );
            }
            cache[slot].flatten()
        };
        let exact = lookup(0, self.exact.as_ref());
        let params = lookup(1, self.params.as_ref());
        match (exact, params) {
            (Some(a), Some(b)) => Some(
                if (b.0, std::cmp::Reverse(b.1)) < (a.0, std::cmp::Reverse(a.1)) {
                    b
                } else {
                    a
                },
            ),
            (a, b) => a.or(b),
        }
    }

    /// Masks `buffer` into `out`; returns how many bytes were consumed (the rest is held).
    fn process(&mut self, buffer: &[u8], out: &mut Vec<u8>, last: bool) -> usize {
        let mut pos = 0;
        let mut cache = [None, None];
        loop {
            if let Some(skipping) = &mut self.skipping {
                let value = buffer[pos..]
                    .iter()
                    .take_while(|b| skipping.kind.continues(**b))
                    .count();
                if value > 0 && !skipping.masked {
                    out.extend_from_slice(MASK);
                    skipping.masked = true;
                }
                pos += value;
                if pos == buffer.len() {
                    return pos;
                }
                self.skipping = None;
            }
            let undecided_from = buffer.len().saturating_sub(self.longest - 1).max(pos);
            match self.next_match(buffer, pos, &mut cache) {
                Some((start, end, kind)) if last || start + self.longest <= buffer.len() => {
                    out.extend_from_slice(&buffer[pos..start]);
                    match kind {
                        Kind::Phrase => out.extend_from_slice(MASK),
                        Kind::Token | Kind::Param => {
                            out.extend_from_slice(&buffer[start..end]);
                            self.skipping = Some(Skipping {
                                kind,
                                masked: false,
                            });
                        }
                    }
                    pos = end;
                }
                Some((start, _, _)) => {
                    let hold = start.min(undecided_from);
                    out.extend_from_slice(&buffer[pos..hold]);
                    return hold;
                }
                None => {
                    let hold = if last { buffer.len() } else { undecided_from };
                    out.extend_from_slice(&buffer[pos..hold]);
                    return hold;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run_with(masker: &mut Masker, chunks: &[&[u8]]) -> String {
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend(masker.write(chunk));
        }
        out.extend(masker.flush());
        String::from_utf8(out).unwrap()
    }

    fn run(phrases: &[&str], chunks: &[&str]) -> String {
        let mut masker = Masker::new(phrases.iter().map(|s| s.to_string()));
        let chunks: Vec<&[u8]> = chunks.iter().map(|c| c.as_bytes()).collect();
        run_with(&mut masker, &chunks)
    }

    fn gitlab(text: &str, split: usize) -> String {
        let mut masker = Masker::with_rules(
            ["s3cret-value".to_string()],
            DEFAULT_TOKEN_PREFIXES.map(String::from),
            true,
        );
        let (a, b) = text.as_bytes().split_at(split.min(text.len()));
        run_with(&mut masker, &[a, b])
    }

    #[test]
    fn masks_across_chunk_boundaries() {
        assert_eq!(
            run(&["s3cret-value"], &["a s3c", "ret-va", "lue b"]),
            "a [MASKED] b"
        );
        assert_eq!(run(&["s3cret-value"], &["s3cret-valu"]), "s3cret-valu");
        for split in 0..=20 {
            let text = "xx topsecret123 yy topsecret123";
            let (a, b) = text.split_at(split.min(text.len()));
            assert_eq!(run(&["topsecret123"], &[a, b]), "xx [MASKED] yy [MASKED]");
        }
    }

    #[test]
    fn longest_phrase_first() {
        assert_eq!(
            run(&["abc", "abcdef"], &["xabcdefx abcx"]),
            "x[MASKED]x [MASKED]x"
        );
        // The longer phrase is still decided correctly when the write ends inside it.
        assert_eq!(run(&["abc", "abcdef"], &["xabcd", "efx"]), "x[MASKED]x");
        assert_eq!(run(&["abc", "abcdef"], &["xabcd", "x"]), "x[MASKED]dx");
    }

    #[test]
    fn token_prefixes_keep_the_prefix_and_mask_the_token() {
        let text = "token glpat-AbC_123.x=y-z end, runner glrt-t2_xyz\nnone glpat- here";
        for split in 0..=text.len() {
            assert_eq!(
                gitlab(text, split),
                "token glpat-[MASKED] end, runner glrt-[MASKED]\nnone glpat- here",
                "split at {split}"
            );
        }
    }

    #[test]
    fn sensitive_url_parameters_are_masked_case_insensitively() {
        let text = "GET https://x/api?private_token=abc123&page=2 and https://s3/o?X-Amz-Signature=f00d#frag ok";
        for split in 0..=text.len() {
            assert_eq!(
                gitlab(text, split),
                "GET https://x/api?private_token=[MASKED]&page=2 and https://s3/o?X-Amz-Signature=[MASKED]#frag ok",
                "split at {split}"
            );
        }
    }

    #[test]
    fn at_most_fifteen_prefixes_and_no_duplicates() {
        let many = (0..40).map(|i| format!("p{i:02}-"));
        let masker = Masker::with_rules(Vec::<String>::new(), many, false);
        assert_eq!(
            masker.exact.as_ref().unwrap().kinds.len(),
            MAX_TOKEN_PREFIXES
        );
    }

    #[test]
    fn memory_stays_bounded_by_the_longest_pattern() {
        let mut masker = Masker::new(["a-much-longer-secret-value".to_string()]);
        for _ in 0..10_000 {
            masker.write(&[b'x'; 1000]);
            assert!(masker.held.len() < 26);
        }
    }

    proptest! {
        /// Whatever the secrets, the text and the chunking, no secret survives and text
        /// without secrets passes unchanged.
        #[test]
        fn no_secret_survives_any_chunking(
            secrets in proptest::collection::vec("[a-zA-Z0-9+/=@:.~_-]{8,20}", 1..4),
            filler in proptest::collection::vec("[ -~\n]{0,30}", 1..6),
            cuts in proptest::collection::vec(0usize..400, 0..8),
        ) {
            let mut text = String::new();
            for (i, part) in filler.iter().enumerate() {
                text.push_str(part);
                text.push_str(&secrets[i % secrets.len()]);
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (text.len() + 1)).collect();
            cuts.sort();
            let mut chunks = Vec::new();
            let mut last = 0;
            for cut in cuts {
                chunks.push(&text.as_bytes()[last..cut]);
                last = cut;
            }
            chunks.push(&text.as_bytes()[last..]);
            let mut masker = Masker::new(secrets.clone());
            let out = run_with(&mut masker, &chunks);
            for secret in &secrets {
                prop_assert!(!out.contains(secret.as_str()), "{secret} in {out}");
            }
            let mut whole = Masker::new(secrets.clone());
            prop_assert_eq!(out, run_with(&mut whole, &[text.as_bytes()]));
        }
    }
}
