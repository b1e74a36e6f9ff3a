//! Hiding credentials in text that reaches a log or an error: URLs with user info or
//! presigned signatures, and any known secret value.

/// `url` with its user info replaced by `[MASKED]` and its query string dropped (presigned
/// URLs carry their signature there).
pub fn url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(at) => (&url[..at + 3], &url[at + 3..]),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let host = match authority.rfind('@') {
        Some(at) => format!("[MASKED]@{}", &authority[at + 1..]),
        None => authority.to_owned(),
    };
    let path = match path.find('?') {
        Some(query) => format!("{}?[MASKED]", &path[..query]),
        None => path.to_owned(),
    };
    format!("{scheme}{host}{path}")
}

/// `text` with every non-empty `secret` replaced by `[MASKED]`.
pub fn secrets(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_owned();
    let mut sorted: Vec<&str> = secrets.iter().copied().filter(|s| !s.is_empty()).collect();
    sorted.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
    for secret in sorted {
        out = out.replace(secret, "[MASKED]");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_and_queries_are_hidden() {
        assert_eq!(
            url("https://gitlab-ci-token:secret@host:8080/g/p.git"),
            "https://[MASKED]@host:8080/g/p.git"
        );
        assert_eq!(
            url("http://s3:9000/b/k?X-Amz-Signature=abc"),
            "http://s3:9000/b/k?[MASKED]"
        );
        assert_eq!(url("http://host/path"), "http://host/path");
    }

    #[test]
    fn secret_values_are_replaced_longest_first() {
        assert_eq!(
            secrets("token abc and abcdef", &["abc", "abcdef", ""]),
            "token [MASKED] and [MASKED]"
        );
    }
}
