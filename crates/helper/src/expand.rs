//! `$VAR` / `${VAR}` expansion of cache keys and artifact paths, as gitlab-runner's
//! `os.Expand` does (unknown variables expand to nothing; `$$` is a literal `$`).

/// Expands `$NAME` and `${NAME}` in `text` with `lookup`.
pub fn expand(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => {
                    out.push_str(&lookup(&braced[..end]).unwrap_or_default());
                    rest = &braced[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            if end == 0 {
                out.push('$');
            } else {
                out.push_str(&lookup(&after[..end]).unwrap_or_default());
            }
            rest = &after[end..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_both_forms_and_keeps_lone_dollars() {
        let lookup = |key: &str| (key == "REF").then(|| "main".to_owned());
        assert_eq!(
            expand("a-$REF-${REF}-$MISSING-$$-$", &lookup),
            "a-main-main--$-$"
        );
        assert_eq!(expand("${REF", &lookup), "${REF");
        assert_eq!(expand("x/$REF/y", &lookup), "x/main/y");
    }
}
