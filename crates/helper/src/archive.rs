//! Which files of the project dir go into an artifact or cache archive (`paths` globs,
//! `untracked`, `exclude`), and packing them as zip, gzip members or a raw file.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::process::Command;

use crate::paths::{self, Member, MemberKind};
use crate::zip::ZipWriter;

/// The members selected for an archive, sorted, with a warning per pattern that matched
/// nothing or pointed outside the project dir.
#[derive(Debug, Default)]
pub struct Selection {
    pub members: Vec<Member>,
    pub warnings: Vec<String>,
}

/// Selects members of `project_dir` for `patterns`, `untracked` files and minus `exclude`.
pub fn select(
    project_dir: &Path,
    patterns: &[String],
    exclude: &[String],
    untracked: bool,
) -> io::Result<Selection> {
    let all = paths::walk(project_dir)?;
    let mut selection = Selection::default();
    let mut chosen: BTreeSet<String> = BTreeSet::new();
    for pattern in patterns {
        let Some(relative) = paths::relative_inside(project_dir, pattern) else {
            selection.warnings.push(format!(
                "{pattern}: not inside the project directory {}; skipped",
                project_dir.display()
            ));
            continue;
        };
        let before = chosen.len();
        if relative.is_empty() {
            chosen.extend(all.iter().map(|member| member.relative.clone()));
        } else if paths::is_glob(&relative) {
            for member in &all {
                if paths::glob_match(&relative, &member.relative) {
                    add_with_descendants(&all, member, &mut chosen);
                }
            }
        } else if let Some(member) = all.iter().find(|member| member.relative == relative) {
            add_with_descendants(&all, member, &mut chosen);
        }
        if chosen.len() == before {
            selection
                .warnings
                .push(format!("{pattern}: no matching files"));
        }
    }
    if untracked {
        let output = Command::new("git")
            .args(["ls-files", "-o", "-z"])
            .current_dir(project_dir)
            .env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "safe.directory")
            .env("GIT_CONFIG_VALUE_0", "*")
            .output();
        match output {
            Ok(output) if output.status.success() => {
                for name in output.stdout.split(|byte| *byte == 0) {
                    let name = String::from_utf8_lossy(name);
                    if let Some(member) = all.iter().find(|member| member.relative == name) {
                        add_with_descendants(&all, member, &mut chosen);
                    }
                }
            }
            _ => selection
                .warnings
                .push("untracked: cannot list untracked files (not a git repository?)".to_owned()),
        }
    }
    let excluded = |name: &str| {
        exclude.iter().any(|pattern| {
            let Some(pattern) = paths::relative_inside(project_dir, pattern) else {
                return false;
            };
            // A matching directory excludes everything under it.
            let mut prefix = String::new();
            name.split('/').any(|part| {
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(part);
                paths::glob_match(&pattern, &prefix)
            })
        })
    };
    selection.members = all
        .into_iter()
        .filter(|member| chosen.contains(&member.relative) && !excluded(&member.relative))
        .collect();
    Ok(selection)
}

fn add_with_descendants(all: &[Member], member: &Member, chosen: &mut BTreeSet<String>) {
    chosen.insert(member.relative.clone());
    if member.kind == MemberKind::Directory {
        let prefix = format!("{}/", member.relative);
        chosen.extend(
            all.iter()
                .filter(|other| other.relative.starts_with(&prefix))
                .map(|other| other.relative.clone()),
        );
    }
}

/// Writes `members` of `root` as a zip archive to `output`.
pub fn write_zip(root: &Path, members: &[Member], output: &Path) -> io::Result<()> {
    let file = fs::File::create(output)?;
    let mut zip = ZipWriter::new(io::BufWriter::new(file));
    for member in members {
        zip.add_path(&root.join(&member.relative), &member.relative)?;
    }
    zip.finish()?
        .into_inner()
        .map_err(|error| error.into_error())?
        .sync_all()
}

/// Writes the regular files among `members` as concatenated gzip members, each named after
/// its file (gitlab-runner's `gzip` artifact format, used by reports such as junit).
pub fn write_gzip(root: &Path, members: &[Member], output: &Path) -> io::Result<()> {
    let mut out = io::BufWriter::new(fs::File::create(output)?);
    for member in members
        .iter()
        .filter(|member| member.kind == MemberKind::File)
    {
        let mut encoder = flate2::GzBuilder::new()
            .filename(member.relative.as_bytes())
            .write(&mut out, flate2::Compression::default());
        io::copy(
            &mut fs::File::open(root.join(&member.relative))?,
            &mut encoder,
        )?;
        encoder.finish()?;
    }
    out.flush()
}

/// Copies the one regular file among `members` (gitlab-runner's `raw` format); more than
/// one is an error.
pub fn write_raw(root: &Path, members: &[Member], output: &Path) -> io::Result<()> {
    let files: Vec<&Member> = members
        .iter()
        .filter(|member| member.kind == MemberKind::File)
        .collect();
    match files.as_slice() {
        [file] => fs::copy(root.join(&file.relative), output).map(|_| ()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the raw artifact format takes exactly one file, but the paths match {}",
                files.len()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(selection: &Selection) -> Vec<&str> {
        selection
            .members
            .iter()
            .map(|member| member.relative.as_str())
            .collect()
    }

    #[test]
    fn paths_globs_and_excludes_select_members() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("out/sub")).unwrap();
        fs::write(root.join("out/a.bin"), "a").unwrap();
        fs::write(root.join("out/sub/b.log"), "b").unwrap();
        fs::write(root.join("out/sub/c.bin"), "c").unwrap();
        fs::write(root.join("top.txt"), "t").unwrap();

        let selection =
            select(root, &["out/".to_owned()], &["**/*.log".to_owned()], false).unwrap();
        assert_eq!(
            names(&selection),
            ["out", "out/a.bin", "out/sub", "out/sub/c.bin"]
        );

        let selection = select(
            root,
            &[
                "**/*.bin".to_owned(),
                "missing".to_owned(),
                "../escape".to_owned(),
            ],
            &[],
            false,
        )
        .unwrap();
        assert_eq!(names(&selection), ["out/a.bin", "out/sub/c.bin"]);
        assert_eq!(selection.warnings.len(), 2, "{:?}", selection.warnings);

        let selection = select(root, &["out".to_owned()], &["out/sub".to_owned()], false).unwrap();
        assert_eq!(names(&selection), ["out", "out/a.bin"]);
    }

    #[test]
    fn untracked_adds_files_git_does_not_track_even_if_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let git = |args: &[&str]| {
            let status = Command::new("git")
                .args(args)
                .current_dir(root)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("HOME", root)
                .status()
                .unwrap();
            assert!(status.success(), "git {args:?}");
        };
        git(&["init", "-q"]);
        fs::write(root.join("tracked.txt"), "t").unwrap();
        fs::write(root.join(".gitignore"), "*.o\n").unwrap();
        git(&["add", "tracked.txt", ".gitignore"]);
        fs::create_dir(root.join("build")).unwrap();
        fs::write(root.join("build/out.o"), "o").unwrap();
        fs::write(root.join("new.txt"), "n").unwrap();
        let selection = select(root, &[], &["new.txt".to_owned()], true).unwrap();
        assert_eq!(names(&selection), ["build/out.o"]);
    }

    #[test]
    fn raw_takes_exactly_one_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), "a").unwrap();
        fs::write(dir.path().join("b"), "b").unwrap();
        let all = select(dir.path(), &["*".to_owned()], &[], false).unwrap();
        let out = dir.path().join("out");
        assert!(write_raw(dir.path(), &all.members, &out).is_err());
        write_raw(dir.path(), &all.members[..1], &out).unwrap();
        assert_eq!(fs::read_to_string(out).unwrap(), "a");
    }
}
