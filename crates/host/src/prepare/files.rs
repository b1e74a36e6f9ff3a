//! Writing the host's files the way the steps need: whole files replaced atomically,
//! system files owned by root, user files owned by the user.

use std::path::Path;

use super::StepError;
use crate::{Account, set_mode};

/// The file's text, `None` when it does not exist.
pub fn read_optional(path: &Path) -> Result<Option<String>, StepError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StepError::io(format!("read {}", path.display()), e)),
    }
}

/// Whether `path` holds exactly `content`.
pub fn has_content(path: &Path, content: &str) -> Result<bool, StepError> {
    Ok(read_optional(path)?.as_deref() == Some(content))
}

/// Replaces `path` with `content` (through a temporary file and a rename, so a reader never
/// sees half a file), creating missing parent directories; `owner` is `(uid, gid)`.
pub fn write_file(
    path: &Path,
    content: &str,
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), StepError> {
    let parent = path.parent().ok_or_else(|| {
        StepError::new(
            format!("{} has no parent directory", path.display()),
            "report a bug in podfleet",
        )
    })?;
    std::fs::create_dir_all(parent)
        .map_err(|e| StepError::io(format!("create {}", parent.display()), e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = parent.join(format!(".{name}.podfleet-new"));
    let write = || -> std::io::Result<()> {
        std::fs::write(&temporary, content)?;
        set_mode(&temporary, mode)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&temporary, Some(uid), Some(gid))?;
        }
        std::fs::rename(&temporary, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        StepError::io(format!("write {}", path.display()), e)
    })
}

/// Creates `relative` below the user's home, each missing directory owned by the user.
pub fn create_user_dirs(account: &Account, relative: &str, mode: u32) -> Result<(), StepError> {
    let mut dir = account.home.clone();
    for part in relative.split('/').filter(|p| !p.is_empty()) {
        dir.push(part);
        if !dir.is_dir() {
            let made = std::fs::create_dir(&dir)
                .and_then(|()| set_mode(&dir, mode))
                .and_then(|()| {
                    std::os::unix::fs::chown(&dir, Some(account.uid), Some(account.gid))
                });
            made.map_err(|e| StepError::io(format!("create {}", dir.display()), e))?;
        }
    }
    Ok(())
}
