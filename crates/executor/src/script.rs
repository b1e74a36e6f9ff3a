//! Turns a job's commands and variables into the POSIX shell script a build container runs.
//! Every variable value is single-quoted, so no value can inject shell code.

/// A variable as the job container sees it.
#[derive(Clone, PartialEq, Eq)]
pub struct Variable {
    pub key: String,
    pub value: String,
    /// Written to a file; the variable holds the file's path.
    pub file: bool,
}

impl std::fmt::Debug for Variable {
    // Values may be secrets (job token, masked variables): never in Debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Variable")
            .field("key", &self.key)
            .field("file", &self.file)
            .finish()
    }
}

/// Quotes `value` for POSIX sh: `'...'` with embedded quotes as `'\''`.
pub fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

fn valid_name(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The script of one stage: exports, `cd` into the project, then each command echoed in
/// green and run under `errexit`, as gitlab-runner's shell writer does.
pub fn stage_script(project_dir: &str, variables: &[Variable], commands: &[String]) -> String {
    let mut script = String::from(
        "trap 'exit 1' TERM\n\
         case \"$(set -o)\" in *pipefail*) set -o pipefail;; esac\n\
         set -o errexit\nset +o noclobber\n",
    );
    let tmp_dir = format!("{project_dir}.tmp");
    for variable in variables {
        if !valid_name(&variable.key) {
            continue; // not expressible as an environment variable; GitLab skips these too
        }
        if variable.file {
            let path = format!("{tmp_dir}/{}", variable.key);
            script.push_str(&format!(
                "mkdir -p {dir}\nprintf '%s' {value} > {path}\nexport {key}={path}\n",
                dir = quote(&tmp_dir),
                value = quote(&variable.value),
                path = quote(&path),
                key = variable.key,
            ));
        } else {
            script.push_str(&format!(
                "export {}={}\n",
                variable.key,
                quote(&variable.value)
            ));
        }
    }
    script.push_str(&format!(
        "mkdir -p {dir}\ncd {dir}\n",
        dir = quote(project_dir)
    ));
    for command in commands {
        let shown = match command.split_once('\n') {
            Some((first, _)) => format!("$ {first} # collapsed multi-line command"),
            None => format!("$ {command}"),
        };
        script.push_str(&format!(
            "printf '\\033[32;1m%s\\033[0;m\\n' {}\n",
            quote(&shown)
        ));
        script.push_str(command);
        script.push('\n');
    }
    script.push_str("exit 0\n");
    script
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_sh(script: &str) -> std::process::Output {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .output()
            .unwrap()
    }

    #[test]
    fn hostile_values_stay_data() {
        let dir = tempfile_dir();
        let hostile = [
            "'; touch /tmp/podfleet-pwned; '",
            "$(touch /tmp/podfleet-pwned)",
            "`touch /tmp/podfleet-pwned`",
            "a\nb'\"\\$HOME",
            "\u{1b}[31m",
        ];
        for value in hostile {
            let variables = vec![
                Variable {
                    key: "V".into(),
                    value: value.into(),
                    file: false,
                },
                Variable {
                    key: "F".into(),
                    value: value.into(),
                    file: true,
                },
            ];
            let commands = vec!["printf '%s' \"$V\"; printf '|'; cat \"$F\"".to_string()];
            let output = run_sh(&stage_script(&dir, &variables, &commands));
            assert!(output.status.success(), "{output:?}");
            let stdout = String::from_utf8(output.stdout).unwrap();
            let printed = stdout.split_once("\u{1b}[0;m\n").unwrap().1;
            assert_eq!(printed, format!("{value}|{value}"));
            assert!(!std::path::Path::new("/tmp/podfleet-pwned").exists());
        }
    }

    #[test]
    fn failing_command_stops_the_script_with_its_status() {
        let dir = tempfile_dir();
        let commands = vec![
            "echo one".to_string(),
            "exit 7".to_string(),
            "echo never".to_string(),
        ];
        let output = run_sh(&stage_script(&dir, &[], &commands));
        assert_eq!(output.status.code(), Some(7));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("$ echo one") && stdout.contains("one\n"));
        assert!(!stdout.contains("never\n"));
    }

    #[test]
    fn invalid_names_are_skipped() {
        assert!(valid_name("CI_JOB_ID") && valid_name("_x"));
        assert!(!valid_name("1A") && !valid_name("A-B") && !valid_name("A;rm"));
    }

    fn tempfile_dir() -> String {
        let dir = std::env::temp_dir().join(format!("podfleet-script-{}", std::process::id()));
        dir.to_string_lossy().into_owned()
    }
}
