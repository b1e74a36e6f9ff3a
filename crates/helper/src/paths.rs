//! Paths under a root (the project dir or the cache dir): glob matching as gitlab-runner's
//! doublestar does, the walk that collects archive members, and the checks that keep every
//! write inside the root whatever an archive, a pattern or a symlink says.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

/// `path` made relative to `root` and normalised lexically (`.` dropped, `..` resolved), or
/// `None` when it leaves `root`. Absolute paths must lie under `root`.
pub fn relative_inside(root: &Path, path: &str) -> Option<String> {
    let path = Path::new(path);
    let relative = if path.is_absolute() {
        path.strip_prefix(root).ok()?
    } else {
        path
    };
    let mut parts: Vec<String> = Vec::new();
    for component in relative.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_str()?.to_owned()),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}

/// An archive member name checked for extraction: relative, no `..`, no NUL, no empty
/// name. Returns the normalised parts.
pub fn member_parts(name: &str) -> Result<Vec<&str>, String> {
    if name.starts_with('/') || name.starts_with('\\') || name.contains('\0') {
        return Err(format!(
            "archive member {name:?} has an absolute or invalid path"
        ));
    }
    let mut parts = Vec::new();
    for part in name.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." => return Err(format!("archive member {name:?} climbs out with '..'")),
            other => parts.push(other),
        }
    }
    if parts.is_empty() {
        return Err(format!("archive member {name:?} has an empty path"));
    }
    Ok(parts)
}

/// Creates the directories of `parts[..parts.len()-1]` under `root`, refusing to pass
/// through a symlink (which could point anywhere), and returns the member's full path. An
/// existing non-directory at the member's own path is removed (a symlink there is replaced,
/// never followed).
pub fn prepare_member(root: &Path, parts: &[&str], is_dir: bool) -> io::Result<PathBuf> {
    let mut path = root.to_path_buf();
    let (last, parents) = parts
        .split_last()
        .expect("member_parts never returns an empty list");
    for part in parents {
        path.push(part);
        ensure_real_directory(&path)?;
    }
    path.push(last);
    match fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_dir() && !meta.file_type().is_symlink() => {
            if !is_dir {
                fs::remove_dir_all(&path)?;
            }
        }
        Ok(_) => fs::remove_file(&path)?,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    if is_dir {
        ensure_real_directory(&path)?;
    }
    Ok(path)
}

fn ensure_real_directory(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is a symlink; refusing to extract through it (it could lead outside the build directory)",
                path.display()
            ),
        )),
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => {
            fs::remove_file(path)?;
            fs::create_dir(path)
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => fs::create_dir(path),
        Err(error) => Err(error),
    }
}

/// Whether a symlink at member `parts` pointing to `target` stays inside the root.
pub fn symlink_stays_inside(parts: &[&str], target: &str) -> bool {
    if target.starts_with('/') || target.is_empty() {
        return false;
    }
    let mut depth = parts.len() as i64 - 1;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => depth += 1,
        }
    }
    true
}

/// One file system entry under a root, by relative path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub relative: String,
    pub kind: MemberKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberKind {
    File,
    Directory,
    Symlink,
}

/// Every entry under `root`, depth first, sorted by name; symlinks are listed, not followed.
pub fn walk(root: &Path) -> io::Result<Vec<Member>> {
    let mut out = Vec::new();
    walk_into(root, "", &mut out)?;
    Ok(out)
}

fn walk_into(dir: &Path, prefix: &str, out: &mut Vec<Member>) -> io::Result<()> {
    let mut names: Vec<_> = fs::read_dir(dir)?
        .map(|entry| entry.map(|entry| entry.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let Some(name) = name.to_str() else {
            continue;
        };
        let relative = if prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{prefix}/{name}")
        };
        let path = dir.join(name);
        let meta = fs::symlink_metadata(&path)?;
        let kind = if meta.file_type().is_symlink() {
            MemberKind::Symlink
        } else if meta.is_dir() {
            MemberKind::Directory
        } else {
            MemberKind::File
        };
        out.push(Member {
            relative: relative.clone(),
            kind,
        });
        if kind == MemberKind::Directory {
            walk_into(&path, &relative, out)?;
        }
    }
    Ok(())
}

/// Whether `path` (relative, `/`-separated) matches `pattern`: `*` and `?` within a segment,
/// `[...]` classes, `{a,b}` alternatives, `**` as any number of segments.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    expand_braces(pattern).iter().any(|pattern| {
        let pattern: Vec<&str> = pattern.split('/').filter(|part| !part.is_empty()).collect();
        let path: Vec<&str> = path.split('/').filter(|part| !part.is_empty()).collect();
        match_segments(&pattern, &path)
    })
}

/// Whether `pattern` has glob syntax at all.
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '[', '{'])
}

fn expand_braces(pattern: &str) -> Vec<String> {
    let Some(open) = pattern.find('{') else {
        return vec![pattern.to_owned()];
    };
    let mut depth = 0;
    let mut close = None;
    for (at, c) in pattern[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(open + at);
                    break;
                }
            }
            _ => {}
        }
    }
    let Some(close) = close else {
        return vec![pattern.to_owned()];
    };
    let (head, body, tail) = (
        &pattern[..open],
        &pattern[open + 1..close],
        &pattern[close + 1..],
    );
    let mut alternatives = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (at, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                alternatives.push(&body[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    alternatives.push(&body[start..]);
    alternatives
        .into_iter()
        .flat_map(|alternative| expand_braces(&format!("{head}{alternative}{tail}")))
        .collect()
}

fn match_segments(pattern: &[&str], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((&"**", rest)) => (0..=path.len()).any(|skip| match_segments(rest, &path[skip..])),
        Some((first, rest)) => match path.split_first() {
            Some((segment, path_rest)) => {
                match_segment(first.as_bytes(), segment.as_bytes())
                    && match_segments(rest, path_rest)
            }
            None => false,
        },
    }
}

fn match_segment(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.first() {
        None => text.is_empty(),
        Some(b'*') => (0..=text.len()).any(|skip| match_segment(&pattern[1..], &text[skip..])),
        Some(b'?') => !text.is_empty() && match_segment(&pattern[1..], &text[1..]),
        Some(b'[') => {
            let Some(end) = pattern[1..]
                .iter()
                .position(|c| *c == b']')
                .map(|at| at + 1)
            else {
                return text.first() == Some(&b'[') && match_segment(&pattern[1..], &text[1..]);
            };
            let Some(&c) = text.first() else {
                return false;
            };
            let class = &pattern[1..end];
            let (negated, class) = match class.first() {
                Some(b'!' | b'^') => (true, &class[1..]),
                _ => (false, class),
            };
            let mut found = false;
            let mut at = 0;
            while at < class.len() {
                if at + 2 < class.len() && class[at + 1] == b'-' {
                    found |= class[at] <= c && c <= class[at + 2];
                    at += 3;
                } else {
                    found |= class[at] == c;
                    at += 1;
                }
            }
            found != negated && match_segment(&pattern[end + 1..], &text[1..])
        }
        Some(b'\\') if pattern.len() > 1 => {
            text.first() == Some(&pattern[1]) && match_segment(&pattern[2..], &text[1..])
        }
        Some(c) => text.first() == Some(c) && match_segment(&pattern[1..], &text[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_doublestar() {
        for (pattern, path, expected) in [
            ("*.txt", "a.txt", true),
            ("*.txt", "dir/a.txt", false),
            ("**/*.txt", "a.txt", true),
            ("**/*.txt", "x/y/a.txt", true),
            ("out/**", "out/a/b", true),
            ("out/**", "out", true),
            ("out/**/b", "out/b", true),
            ("file?.log", "file1.log", true),
            ("file[0-9].log", "fileA.log", false),
            ("file[!0-9].log", "fileA.log", true),
            ("{bin,lib}/*", "lib/x", true),
            ("{bin,lib}/*", "src/x", false),
            ("a/b", "a/b", true),
        ] {
            assert_eq!(glob_match(pattern, path), expected, "{pattern} vs {path}");
        }
    }

    #[test]
    fn relative_inside_refuses_escapes() {
        let root = Path::new("/builds/p");
        assert_eq!(relative_inside(root, "./a/../b").as_deref(), Some("b"));
        assert_eq!(relative_inside(root, "/builds/p/x").as_deref(), Some("x"));
        assert_eq!(relative_inside(root, "../other"), None);
        assert_eq!(relative_inside(root, "/etc/passwd"), None);
    }

    #[test]
    fn member_names_that_escape_are_refused() {
        assert!(member_parts("../evil").is_err());
        assert!(member_parts("a/../../evil").is_err());
        assert!(member_parts("/etc/passwd").is_err());
        assert!(member_parts("..\\evil").is_err());
        assert_eq!(member_parts("./a//b/").unwrap(), ["a", "b"]);
    }

    #[test]
    fn symlink_targets_are_checked_lexically() {
        assert!(symlink_stays_inside(&["a", "link"], "../b"));
        assert!(!symlink_stays_inside(&["link"], "../b"));
        assert!(!symlink_stays_inside(&["a", "link"], "/etc"));
        assert!(!symlink_stays_inside(&["a", "link"], "x/../../../y"));
    }
}
