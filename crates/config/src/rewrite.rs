//! Writing a rotated runner token back into `config.toml`, as gitlab-runner does when it resets
//! a token before it expires: only the runner's `token`, `token_obtained_at` and
//! `token_expires_at` change; every other byte (comments, order, formatting) stays.

use std::io::Write;
use std::path::Path;

use chrono::{DateTime, SecondsFormat, Utc};

/// A runner token the coordinator just issued.
pub struct RotatedToken<'a> {
    pub token: &'a str,
    pub obtained_at: DateTime<Utc>,
    /// `None`: the new token does not expire (written as gitlab-runner writes it, the zero time).
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot write config file {path}: {source}; the new runner token is not saved, so fix the \
         file's permissions (podfleet writes a temporary file beside it and renames it)"
    )]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML any more ({message}); fix it and reload")]
    Syntax { path: String, message: String },
    #[error(
        "config file {path} has no [[runners]] entry with the runner token in use (edited since \
         start-up?); the new token was not saved: put it in by hand (see the manager's log for \
         the runner name)"
    )]
    RunnerNotFound { path: String },
}

/// Replaces the token of the `[[runners]]` entry whose token is `old_token` in the file at
/// `path`, atomically (temporary file, fsync, rename) and keeping the file's permissions.
pub fn store_rotated_token(
    path: &Path,
    old_token: &str,
    new: &RotatedToken<'_>,
) -> Result<(), RewriteError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| RewriteError::Read {
        path: shown.clone(),
        source,
    })?;
    let rewritten = rotate_in_text(&text, old_token, new).map_err(|e| match e {
        TextError::Syntax(message) => RewriteError::Syntax {
            path: shown.clone(),
            message,
        },
        TextError::NotFound => RewriteError::RunnerNotFound {
            path: shown.clone(),
        },
    })?;
    let write_error = |source| RewriteError::Write {
        path: shown.clone(),
        source,
    };
    let permissions = std::fs::metadata(path).map_err(write_error)?.permissions();
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config.toml".into());
    let temporary = path.with_file_name(format!(".{file_name}.podfleet-{}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        file.set_permissions(permissions)?;
        file.write_all(rewritten.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if let Err(source) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(write_error(source));
    }
    Ok(())
}

enum TextError {
    Syntax(String),
    NotFound,
}

fn rotate_in_text(
    text: &str,
    old_token: &str,
    new: &RotatedToken<'_>,
) -> Result<String, TextError> {
    let mut document = text
        .parse::<toml_edit::DocumentMut>()
        .map_err(|e| TextError::Syntax(e.message().lines().collect::<Vec<_>>().join("; ")))?;
    let runners = document
        .get_mut("runners")
        .and_then(|item| item.as_array_of_tables_mut())
        .ok_or(TextError::NotFound)?;
    let runner = runners
        .iter_mut()
        .find(|table| table.get("token").and_then(|t| t.as_str()) == Some(old_token))
        .ok_or(TextError::NotFound)?;
    let datetime = |at: DateTime<Utc>| {
        at.to_rfc3339_opts(SecondsFormat::Secs, true)
            .parse::<toml_edit::Datetime>()
            .expect("an RFC 3339 date-time is a TOML date-time")
    };
    set_keeping_decor(runner, "token", toml_edit::Value::from(new.token));
    set_keeping_decor(
        runner,
        "token_obtained_at",
        toml_edit::Value::from(datetime(new.obtained_at)),
    );
    let expires = match new.expires_at {
        Some(at) => datetime(at),
        None => "0001-01-01T00:00:00Z"
            .parse::<toml_edit::Datetime>()
            .expect("the zero time is a TOML date-time"),
    };
    set_keeping_decor(runner, "token_expires_at", toml_edit::Value::from(expires));
    Ok(document.to_string())
}

/// Sets `key` to `value`, keeping the indentation and comments around the old key and value
/// (a new key is indented like `token`).
fn set_keeping_decor(table: &mut toml_edit::Table, key: &str, mut value: toml_edit::Value) {
    if let Some(item) = table.get_mut(key) {
        if let Some(old) = item.as_value() {
            *value.decor_mut() = old.decor().clone();
        }
        *item = toml_edit::Item::Value(value);
        return;
    }
    let mut new_key = toml_edit::Key::new(key);
    if let Some(token_key) = table.key("token") {
        *new_key.leaf_decor_mut() = token_key.leaf_decor().clone();
    }
    value.decor_mut().set_prefix(" ");
    table.insert_formatted(&new_key, toml_edit::Item::Value(value));
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"# fleet config
concurrent = 4

[[runners]]
  name = "first"   # the small one
  url = "https://gitlab.example.com/"
  token = "glrt-first-old"  # do not share
  token_obtained_at = 2026-01-01T00:00:00Z
  token_expires_at = 2026-02-01T00:00:00Z
  executor = "docker-autoscaler"
  [runners.autoscaler]
    plugin = "local"
    max_instances = 1

[[runners]]
  name = "second"
  url = "https://gitlab.example.com/"
  token = "glrt-second"
  executor = "docker-autoscaler"
  [runners.autoscaler]
    plugin = "local"
    max_instances = 1
"#;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn only_the_runners_token_lines_change() {
        let rotated = RotatedToken {
            token: "glrt-first-new",
            obtained_at: at("2026-01-24T06:00:00Z"),
            expires_at: Some(at("2026-03-01T00:00:00Z")),
        };
        let text = rotate_in_text(CONFIG, "glrt-first-old", &rotated)
            .ok()
            .unwrap();
        let expected = CONFIG
            .replace("glrt-first-old\"", "glrt-first-new\"")
            .replace(
                "token_obtained_at = 2026-01-01T00:00:00Z",
                "token_obtained_at = 2026-01-24T06:00:00Z",
            )
            .replace(
                "token_expires_at = 2026-02-01T00:00:00Z",
                "token_expires_at = 2026-03-01T00:00:00Z",
            );
        assert_eq!(text, expected);
        let loaded = crate::parse(&text, "config.toml").unwrap();
        assert_eq!(loaded.config.runners[0].token.expose(), "glrt-first-new");
        assert_eq!(loaded.config.runners[1].token.expose(), "glrt-second");
    }

    #[test]
    fn a_token_without_expiry_gets_the_zero_time_and_new_keys_are_added() {
        let rotated = RotatedToken {
            token: "glrt-second-new",
            obtained_at: at("2026-01-24T06:00:00Z"),
            expires_at: None,
        };
        let text = rotate_in_text(CONFIG, "glrt-second", &rotated)
            .ok()
            .unwrap();
        assert!(text.contains("token = \"glrt-second-new\""), "{text}");
        assert!(
            text.contains("token_expires_at = 0001-01-01T00:00:00Z"),
            "{text}"
        );
        if let Err(e) = crate::parse(&text, "config.toml") {
            panic!("{e}\n{text}");
        }
    }

    #[test]
    fn an_unknown_token_is_an_error_naming_the_file_and_not_the_token() {
        let dir = std::env::temp_dir().join(format!("podfleet-rewrite-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        std::fs::write(&path, CONFIG).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let rotated = RotatedToken {
            token: "glrt-secret-new",
            obtained_at: at("2026-01-24T06:00:00Z"),
            expires_at: None,
        };
        let error = store_rotated_token(&path, "glrt-gone", &rotated).unwrap_err();
        let text = error.to_string();
        assert!(text.contains("config.toml") && text.contains("no [[runners]] entry"));
        assert!(!text.contains("glrt-secret-new") && !text.contains("glrt-gone"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), CONFIG);

        store_rotated_token(&path, "glrt-first-old", &rotated).unwrap();
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("glrt-secret-new")
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the file's permissions are kept");
        let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
