//! Cache key sanitising: a key names a directory under the cache volume or an object under
//! the bucket prefix, so no key may climb out of it (gitlab-runner's `cachekey.Sanitize`).

/// The key made safe as a relative path: `%2f`/`%2e` decoded, `\` as `/`, `.` and `..`
/// resolved inside a virtual root (so `../../etc` becomes `etc`), empty segments dropped,
/// trailing whitespace trimmed. Fails when nothing is left or a segment holds a NUL.
pub fn sanitise(key: &str) -> Result<String, String> {
    let decoded = key
        .replace("%2f", "/")
        .replace("%2F", "/")
        .replace("%2e", ".")
        .replace("%2E", ".")
        .replace('\\', "/");
    let decoded = decoded.trim_end();
    if decoded.contains('\0') {
        return Err("holds a NUL byte".to_owned());
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
    }
    if segments.is_empty() {
        return Err("is empty once sanitised (set cache:key to a name)".to_owned());
    }
    Ok(segments.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_keys_stay_inside() {
        for (key, expected) in [
            ("../../../etc/passwd", "etc/passwd"),
            ("/abs/key", "abs/key"),
            ("a/./b/../c", "a/c"),
            ("%2e%2e%2fup", "up"),
            ("..\\..\\win", "win"),
            ("main ", "main"),
            ("build/main", "build/main"),
        ] {
            assert_eq!(sanitise(key).unwrap(), expected, "{key}");
        }
        assert!(sanitise("../..").is_err());
        assert!(sanitise("a\0b").is_err());
    }
}
