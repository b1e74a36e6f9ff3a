//! The limited user the connector logs in as: the account, its credentials, its
//! subordinate id ranges and the environment its SSH commands get.

use async_trait::async_trait;

use super::files::{create_user_dirs, read_optional, write_file};
use super::{Context, Step, StepError};
use crate::Account;

const USER_COMMENT: &str = "podfleet executor";
const SUBID_COUNT: u64 = 65536;
/// Where automatic subordinate ranges start (login.defs' `SUB_UID_MIN` default).
const SUBID_MIN: u64 = 100_000;

pub(crate) fn looks_like_public_key(line: &str) -> bool {
    let mut words = line.split_whitespace();
    let kind = words.next().unwrap_or("");
    let known = kind.starts_with("ssh-")
        || kind.starts_with("ecdsa-sha2-")
        || kind.starts_with("sk-ssh-")
        || kind.starts_with("sk-ecdsa-");
    known && words.next().is_some_and(|blob| blob.starts_with("AAAA"))
}

pub(crate) struct User;

#[async_trait]
impl Step for User {
    fn description(&self, context: &Context) -> String {
        format!("limited user {}", context.options.user)
    }

    async fn check(&self, context: &Context) -> Result<Vec<String>, StepError> {
        Ok(match context.account()? {
            Some(_) => Vec::new(),
            None => vec![format!(
                "create user {} with a home directory and /bin/bash as login shell",
                context.options.user
            )],
        })
    }

    async fn apply(&self, context: &Context) -> Result<(), StepError> {
        let user = &context.options.user;
        crate::run(
            "useradd",
            &["-m", "-s", "/bin/bash", "-c", USER_COMMENT, user],
        )
        .await
        .map_err(|e| {
            StepError::host(
                e,
                format!("check /etc/passwd and /etc/group for a conflicting {user} entry"),
            )
        })?;
        Ok(())
    }
}

/// The user's password field in the shadow file.
fn shadow_field(context: &Context) -> Result<Option<String>, StepError> {
    let path = context.path("/etc/shadow");
    let text = read_optional(&path)?.unwrap_or_default();
    Ok(text.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next() == Some(context.options.user.as_str()))
            .then(|| fields.next().unwrap_or("").to_string())
    }))
}

/// Whether a crypt(3) hash is `password`'s; `None` for schemes this build cannot verify.
fn hash_matches(hash: &str, password: &str) -> Option<bool> {
    if hash.starts_with("$6$") {
        Some(sha_crypt::sha512_check(password, hash).is_ok())
    } else if hash.starts_with("$5$") {
        Some(sha_crypt::sha256_check(password, hash).is_ok())
    } else {
        None
    }
}

pub(crate) struct Credentials;

#[async_trait]
impl Step for Credentials {
    fn description(&self, _: &Context) -> String {
        "login credentials".into()
    }

    async fn check(&self, context: &Context) -> Result<Vec<String>, StepError> {
        let user = &context.options.user;
        let field = shadow_field(context)?;
        match (&context.options.password, field) {
            (Some(_), None) => Ok(vec![format!("set the password of {user}")]),
            // '!', '*' or empty: the account has no password yet.
            (Some(_), Some(field)) if !field.starts_with('$') => {
                Ok(vec![format!("set the password of {user}")])
            }
            (Some(password), Some(hash)) => match hash_matches(&hash, password.expose()) {
                Some(true) => Ok(Vec::new()),
                Some(false) => Ok(vec![format!("set the password of {user} (it differs)")]),
                None => Ok(vec![format!(
                    "set the password of {user} (its current hash scheme cannot be \
                     compared; it is replaced by a SHA-512 crypt hash)"
                )]),
            },
            // sshd refuses a locked account ('!') even for keys; '*' means no password.
            (None, Some(field)) if field.starts_with('!') => {
                Ok(vec![format!("unlock {user} for key login (no password)")])
            }
            (None, Some(_)) => Ok(Vec::new()),
            (None, None) => Ok(vec![format!("unlock {user} for key login (no password)")]),
        }
    }

    async fn apply(&self, context: &Context) -> Result<(), StepError> {
        let user = &context.options.user;
        let fix = "check that /etc/shadow is writable and not locked by another tool";
        match &context.options.password {
            Some(password) => {
                let params = sha_crypt::Sha512Params::new(sha_crypt::ROUNDS_DEFAULT)
                    .map_err(|e| StepError::new(format!("hash parameters: {e:?}"), fix))?;
                let hash = sha_crypt::sha512_simple(password.expose(), &params)
                    .map_err(|e| StepError::new(format!("hash the password: {e:?}"), fix))?;
                // The hash goes through stdin: neither it nor the password is in argv.
                let line = format!("{user}:{hash}\n");
                crate::run_with_input("chpasswd", &["-e"], Some(line.as_bytes()))
                    .await
                    .map_err(|e| StepError::host(e, fix))?;
            }
            None => {
                let field = shadow_field(context)?.unwrap_or_default();
                let locked_hash = field.trim_start_matches('!');
                if locked_hash.len() > 1 {
                    crate::run("usermod", &["-U", user])
                        .await
                        .map_err(|e| StepError::host(e, fix))?;
                } else {
                    crate::run("usermod", &["-p", "*", user])
                        .await
                        .map_err(|e| StepError::host(e, fix))?;
                }
            }
        }
        Ok(())
    }
}

pub(crate) struct AuthorizedKeys;

fn authorized_keys_path(context: &Context, account: &Account) -> std::path::PathBuf {
    context.path(account.home.join(".ssh/authorized_keys"))
}

#[async_trait]
impl Step for AuthorizedKeys {
    fn description(&self, _: &Context) -> String {
        "authorized SSH keys".into()
    }

    async fn check(&self, context: &Context) -> Result<Vec<String>, StepError> {
        use std::os::unix::fs::MetadataExt;
        let keys = &context.options.authorized_keys;
        let Some(account) = context.account()? else {
            return Ok(vec![format!(
                "authorize {} key(s) in ~{}/.ssh/authorized_keys",
                keys.len(),
                context.options.user
            )]);
        };
        let path = authorized_keys_path(context, &account);
        let text = read_optional(&path)?.unwrap_or_default();
        let present: Vec<&str> = text.lines().map(str::trim).collect();
        let missing = keys.iter().filter(|k| !present.contains(&k.trim())).count();
        let mut changes = Vec::new();
        if missing > 0 {
            changes.push(format!("authorize {missing} key(s) in {}", path.display()));
        }
        // sshd's StrictModes ignores keys in a file others may write.
        if let Ok(meta) = std::fs::metadata(&path)
            && (meta.uid() != account.uid || meta.mode() & 0o022 != 0)
        {
            changes.push(format!(
                "make {} owned by {} and writable only by it",
                path.display(),
                account.name
            ));
        }
        Ok(changes)
    }

    async fn apply(&self, context: &Context) -> Result<(), StepError> {
        let account = context.existing_account()?;
        create_user_dirs(&account, ".ssh", 0o700)?;
        let path = authorized_keys_path(context, &account);
        let mut text = read_optional(&path)?.unwrap_or_default();
        for key in &context.options.authorized_keys {
            if !text.lines().any(|l| l.trim() == key.trim()) {
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                text.push_str(key.trim());
                text.push('\n');
            }
        }
        write_file(&path, &text, 0o600, Some((account.uid, account.gid)))
    }
}

/// The first range of `count` ids at or above [`SUBID_MIN`] that no line of the given
/// subuid/subgid files uses.
pub(crate) fn next_free_range(files: &[&str], count: u64) -> u64 {
    let end_of_used = files
        .iter()
        .flat_map(|text| text.lines())
        .filter_map(|line| {
            let mut fields = line.split(':').skip(1);
            let start: u64 = fields.next()?.parse().ok()?;
            let length: u64 = fields.next()?.trim().parse().ok()?;
            Some(start + length)
        })
        .max()
        .unwrap_or(SUBID_MIN);
    let start = end_of_used.max(SUBID_MIN);
    // Align to the range size, as useradd does, so ranges stay easy to read.
    start.div_ceil(count) * count
}

fn has_subid_line(text: &str, account_name: &str, uid: Option<u32>) -> bool {
    text.lines().any(|line| {
        let owner = line.split(':').next().unwrap_or("");
        owner == account_name || uid.is_some_and(|uid| owner == uid.to_string())
    })
}

pub(crate) struct SubordinateIds;

#[async_trait]
impl Step for SubordinateIds {
    fn description(&self, _: &Context) -> String {
        "subordinate uid/gid ranges (rootless Podman's user namespace)".into()
    }

    async fn check(&self, context: &Context) -> Result<Vec<String>, StepError> {
        let user = &context.options.user;
        let account = context.account()?;
        if account.is_none() {
            return Ok(vec![format!(
                "assign {SUBID_COUNT} subordinate uids and gids to {user} (useradd does so \
                 itself on most hosts)"
            )]);
        }
        let uid = account.map(|a| a.uid);
        let mut changes = Vec::new();
        for file in ["/etc/subuid", "/etc/subgid"] {
            let path = context.path(file);
            let text = read_optional(&path)?.unwrap_or_default();
            if !has_subid_line(&text, user, uid) {
                changes.push(format!(
                    "add a range of {SUBID_COUNT} ids for {user} to {file}"
                ));
            }
        }
        Ok(changes)
    }

    async fn apply(&self, context: &Context) -> Result<(), StepError> {
        let subuid = read_optional(&context.path("/etc/subuid"))?.unwrap_or_default();
        let subgid = read_optional(&context.path("/etc/subgid"))?.unwrap_or_default();
        let start = next_free_range(&[&subuid, &subgid], SUBID_COUNT);
        let range = format!("{start}-{}", start + SUBID_COUNT - 1);
        let user = &context.options.user;
        let uid = context.account()?.map(|a| a.uid);
        let mut args = vec!["usermod"];
        if !has_subid_line(&subuid, user, uid) {
            args.extend(["--add-subuids", &range]);
        }
        if !has_subid_line(&subgid, user, uid) {
            args.extend(["--add-subgids", &range]);
        }
        args.push(user);
        crate::run(args[0], &args[1..]).await.map_err(|e| {
            StepError::host(e, "add the ranges by hand to /etc/subuid and /etc/subgid")
        })?;
        Ok(())
    }
}

const BLOCK_START: &str = "# >>> podfleet connector environment";
const BLOCK_END: &str = "# <<< podfleet connector environment <<<";

/// The lines that give SSH commands the user's runtime directory and API socket.
pub(crate) fn environment_block(uid: u32) -> String {
    format!(
        "{BLOCK_START} (podfleet host prepare): first, so that non-interactive SSH \
         commands get it too >>>\n\
         export XDG_RUNTIME_DIR=/run/user/{uid}\n\
         export DOCKER_HOST=unix:///run/user/{uid}/podman/podman.sock\n\
         {BLOCK_END}\n"
    )
}

/// `bashrc` with `block` as its first lines and no other copy of it. Debian's and
/// Ubuntu's default `.bashrc` return early for non-interactive shells, so anything after
/// that guard never reaches `ssh host command`.
pub(crate) fn with_environment_block(bashrc: &str, block: &str) -> String {
    let mut rest = String::new();
    let mut inside = false;
    for line in bashrc.split_inclusive('\n') {
        if line.starts_with(BLOCK_START) {
            inside = true;
        } else if inside && line.trim_end() == BLOCK_END {
            inside = false;
        } else if !inside {
            rest.push_str(line);
        }
    }
    format!("{block}{rest}")
}

pub(crate) struct ConnectorEnvironment;

#[async_trait]
impl Step for ConnectorEnvironment {
    fn description(&self, _: &Context) -> String {
        "connector environment (XDG_RUNTIME_DIR, DOCKER_HOST in ~/.bashrc)".into()
    }

    async fn check(&self, context: &Context) -> Result<Vec<String>, StepError> {
        let Some(account) = context.account()? else {
            return Ok(vec![format!(
                "export XDG_RUNTIME_DIR and DOCKER_HOST at the top of ~{}/.bashrc",
                context.options.user
            )]);
        };
        if !account.shell.ends_with("/bash") {
            return Err(StepError::new(
                format!(
                    "the login shell of {} is {}; only bash reads ~/.bashrc for SSH commands",
                    account.name, account.shell
                ),
                format!("usermod -s /bin/bash {}", account.name),
            ));
        }
        let path = context.path(account.home.join(".bashrc"));
        let text = read_optional(&path)?.unwrap_or_default();
        if text.starts_with(&environment_block(account.uid)) {
            Ok(Vec::new())
        } else {
            Ok(vec![format!(
                "put XDG_RUNTIME_DIR=/run/user/{uid} and DOCKER_HOST at the top of {}",
                path.display(),
                uid = account.uid
            )])
        }
    }

    async fn apply(&self, context: &Context) -> Result<(), StepError> {
        let account = context.existing_account()?;
        let path = context.path(account.home.join(".bashrc"));
        let text = read_optional(&path)?.unwrap_or_default();
        let updated = with_environment_block(&text, &environment_block(account.uid));
        write_file(&path, &updated, 0o644, Some((account.uid, account.gid)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_block_goes_first_once() {
        let skel =
            "# ~/.bashrc\ncase $- in\n    *i*) ;;\n      *) return;;\nesac\nalias ll='ls -l'\n";
        let block = environment_block(1042);
        let once = with_environment_block(skel, &block);
        assert!(once.starts_with(&block), "{once}");
        assert!(once.ends_with(skel), "the rest is kept as it was: {once}");
        // An older block elsewhere (another uid, placed after the guard) is replaced.
        let moved = with_environment_block(&format!("{skel}{}", environment_block(7)), &block);
        assert_eq!(moved, once);
        assert_eq!(with_environment_block(&once, &block), once);
        assert!(block.contains("DOCKER_HOST=unix:///run/user/1042/podman/podman.sock"));
    }

    #[test]
    fn subordinate_ranges_start_after_every_used_one() {
        assert_eq!(next_free_range(&["", ""], 65536), 131072);
        let subuid = "a:100000:65536\nb:165536:65536\n";
        let subgid = "a:100000:65536\nc:400000:1000\n";
        assert_eq!(next_free_range(&[subuid, subgid], 65536), 458752);
        assert!(has_subid_line(subuid, "b", None));
        assert!(has_subid_line("1005:200000:65536\n", "z", Some(1005)));
        assert!(!has_subid_line(subuid, "bb", Some(1)));
    }

    #[test]
    fn public_keys_are_told_from_other_text() {
        assert!(looks_like_public_key(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB7 ci@host"
        ));
        assert!(looks_like_public_key("ecdsa-sha2-nistp256 AAAAE2VjZHNh"));
        assert!(!looks_like_public_key(
            "-----BEGIN OPENSSH PRIVATE KEY-----"
        ));
        assert!(!looks_like_public_key("ssh-ed25519"));
    }

    #[test]
    fn password_hashes_are_compared_not_recomputed() {
        let params = sha_crypt::Sha512Params::new(sha_crypt::ROUNDS_DEFAULT).unwrap();
        let hash = sha_crypt::sha512_simple("right", &params).unwrap();
        assert_eq!(hash_matches(&hash, "right"), Some(true));
        assert_eq!(hash_matches(&hash, "wrong"), Some(false));
        // A hash as glibc/chpasswd writes it, with the default rounds left implicit
        // (made with `openssl passwd -6 -salt saltsalt right`).
        let glibc = "$6$saltsalt$gzY3OAolfMFSB9Ld7iMdOQlViFqO3IOPeU0zkHsD.58tcMxRAFD0Qjfi2sjus3i.8aqWarEvFPREqzp18Jm291";
        assert_eq!(hash_matches(glibc, "right"), Some(true));
        assert_eq!(hash_matches("$y$j9T$abc$def", "right"), None);
    }
}
