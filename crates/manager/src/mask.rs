//! Masking of secret values in the job log, correct across write boundaries: the tail
//! that could still start a secret is held back until more output (or the end) arrives.

/// Replaces every phrase with `[MASKED]` in a stream of writes.
pub struct Masker {
    phrases: Vec<Vec<u8>>,
    held: Vec<u8>,
}

impl Masker {
    /// Phrases shorter than 1 byte are ignored; longer phrases win over their prefixes.
    pub fn new(phrases: impl IntoIterator<Item = String>) -> Self {
        let mut phrases: Vec<Vec<u8>> = phrases
            .into_iter()
            .filter(|p| !p.is_empty())
            .map(String::into_bytes)
            .collect();
        phrases.sort_by_key(|p| std::cmp::Reverse(p.len()));
        phrases.dedup();
        Self {
            phrases,
            held: Vec::new(),
        }
    }

    /// Takes a chunk of output; returns what can be emitted now.
    pub fn write(&mut self, bytes: &[u8]) -> Vec<u8> {
        if self.phrases.is_empty() {
            return bytes.to_vec();
        }
        self.held.extend_from_slice(bytes);
        let replaced = self.replace_all();
        let keep = self.phrases[0].len() - 1;
        let cut = replaced.len().saturating_sub(keep);
        let (emit, rest) = replaced.split_at(cut);
        self.held = rest.to_vec();
        emit.to_vec()
    }

    /// Emits whatever is held back (the end of the stream).
    pub fn flush(&mut self) -> Vec<u8> {
        let out = self.replace_all();
        self.held.clear();
        out
    }

    fn replace_all(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.held.len());
        let mut i = 0;
        'scan: while i < self.held.len() {
            for phrase in &self.phrases {
                if self.held[i..].starts_with(phrase) {
                    out.extend_from_slice(b"[MASKED]");
                    i += phrase.len();
                    continue 'scan;
                }
            }
            out.push(self.held[i]);
            i += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(phrases: &[&str], chunks: &[&str]) -> String {
        let mut masker = Masker::new(phrases.iter().map(|s| s.to_string()));
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend(masker.write(chunk.as_bytes()));
        }
        out.extend(masker.flush());
        String::from_utf8(out).unwrap()
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
    }
}
