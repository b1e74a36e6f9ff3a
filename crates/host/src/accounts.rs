//! User accounts as `/etc/passwd` lists them.

use std::path::{Path, PathBuf};

/// A user account as `/etc/passwd` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub comment: String,
    pub home: PathBuf,
    pub shell: String,
}

/// Every account of the host.
pub fn accounts() -> std::io::Result<Vec<Account>> {
    accounts_in(Path::new("/etc/passwd"))
}

/// Every account of a passwd file.
pub fn accounts_in(passwd: &Path) -> std::io::Result<Vec<Account>> {
    let text = std::fs::read_to_string(passwd)?;
    Ok(text.lines().filter_map(parse_passwd_line).collect())
}

fn parse_passwd_line(line: &str) -> Option<Account> {
    let fields: Vec<&str> = line.split(':').collect();
    if fields.len() != 7 {
        return None;
    }
    Some(Account {
        name: fields[0].to_string(),
        uid: fields[2].parse().ok()?,
        gid: fields[3].parse().ok()?,
        comment: fields[4].to_string(),
        home: PathBuf::from(fields[5]),
        shell: fields[6].to_string(),
    })
}

pub fn account(name: &str) -> std::io::Result<Option<Account>> {
    Ok(accounts()?.into_iter().find(|a| a.name == name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_passwd_lines() {
        let a = parse_passwd_line("pf-x:x:1001:1001:podfleet:demo:/home/pf-x:/bin/sh");
        assert_eq!(
            a, None,
            "a comment with ':' splits the line and must not parse as a user"
        );
        let a = parse_passwd_line("pf-x:x:1001:1002:podfleet-demo:/home/pf-x:/bin/sh").unwrap();
        assert_eq!(
            (a.uid, a.gid, a.comment.as_str(), a.shell.as_str()),
            (1001, 1002, "podfleet-demo", "/bin/sh")
        );
        assert_eq!(parse_passwd_line("broken"), None);
    }
}
