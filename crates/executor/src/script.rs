//! Turns a job's commands and variables into the POSIX shell scripts the containers run, and
//! expands `$VAR` references in variable values the way gitlab-runner does. Every variable
//! value is single-quoted, so no value can inject shell code.

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

/// Expands `$NAME`, `${NAME}` and `$$` in `value` as gitlab-runner does (Go's `os.Expand`
/// with the runner's mapping): a name that `lookup` does not know expands to nothing, `$$` is
/// a literal `$`, and a `$` followed by nothing that can start a name stays as it is.
pub fn expand(value: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let bytes = value.as_bytes();
    let mut out = String::with_capacity(value.len());
    let mut i = 0;
    let mut literal_start = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' || i + 1 >= bytes.len() {
            i += 1;
            continue;
        }
        let rest = &value[i + 1..];
        let (name, width): (Option<&str>, usize) = match rest.as_bytes()[0] {
            b'$' => {
                out.push_str(&value[literal_start..i]);
                out.push('$');
                i += 2;
                literal_start = i;
                continue;
            }
            b'{' => match rest.find('}') {
                None => (None, 1),
                Some(1) => (None, 2),
                Some(end) => (Some(&rest[1..end]), end + 1),
            },
            c if c.is_ascii_alphanumeric() || c == b'_' => {
                let end = rest
                    .bytes()
                    .position(|c| !(c.is_ascii_alphanumeric() || c == b'_'))
                    .unwrap_or(rest.len());
                (Some(&rest[..end]), end)
            }
            b'*' | b'#' | b'@' | b'!' | b'?' | b'-' => (Some(&rest[..1]), 1),
            _ => {
                // `$` not followed by a name: kept.
                i += 1;
                continue;
            }
        };
        out.push_str(&value[literal_start..i]);
        if let Some(name) = name {
            out.push_str(&lookup(name).unwrap_or_default());
        }
        // Bad syntax (`${`, `${}`) eats the characters, as os.Expand does.
        i += 1 + width;
        literal_start = i;
    }
    out.push_str(&value[literal_start..]);
    out
}

/// How a stage script is written.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScriptOptions {
    /// `FF_SCRIPT_SECTIONS`: each command in its own collapsed section.
    pub command_sections: bool,
}

/// The preamble of every stage: a TERM trap, pipefail where the shell has it, errexit.
const PREAMBLE: &str = "trap 'exit 1' TERM\n\
     case \"$(set -o)\" in *pipefail*) set -o pipefail;; esac\n\
     set -o errexit\nset +o noclobber\n";

/// The environment part of a stage: one `export` per variable, file variables written to
/// `<project dir>.tmp/<KEY>` (mode 0600) with the variable holding the path.
fn exports(project_dir: &str, variables: &[Variable]) -> String {
    let tmp_dir = format!("{project_dir}.tmp");
    let mut script = format!(
        "export RUNNER_TEMP_PROJECT_DIR={dir}\n",
        dir = quote(&tmp_dir)
    );
    for variable in variables {
        if !valid_name(&variable.key) {
            continue; // not expressible as an environment variable; GitLab skips these too
        }
        if variable.file {
            let path = format!("{tmp_dir}/{}", variable.key);
            script.push_str(&format!(
                "mkdir -p {dir}\n(umask 077; printf '%s' {value} > {path})\nexport {key}={path}\n",
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
    script
}

/// The script of one user stage (step_script or after_script): exports, `cd` into the
/// project, then each command echoed in green and run under `errexit`, as gitlab-runner's
/// shell writer does.
pub fn stage_script(
    project_dir: &str,
    variables: &[Variable],
    commands: &[String],
    options: ScriptOptions,
) -> String {
    let mut script = String::from(PREAMBLE);
    script.push_str(&exports(project_dir, variables));
    script.push_str(&format!(
        "mkdir -p {dir}\ncd {dir}\n",
        dir = quote(project_dir)
    ));
    for (index, command) in commands.iter().enumerate() {
        let section = format!("section_script_step_{index}");
        if options.command_sections {
            script.push_str(&format!(
                "printf 'section_start:%s:{section}[hide_duration=true,collapsed=true]\\r\\033[0K' \"$(date +%s)\"\n"
            ));
        }
        let shown = match command.split_once('\n') {
            Some((first, _)) if !options.command_sections => {
                format!("$ {first} # collapsed multi-line command")
            }
            _ => format!("$ {command}"),
        };
        script.push_str(&format!(
            "printf '\\033[32;1m%s\\033[0;m\\n' {}\n",
            quote(&shown)
        ));
        script.push_str(command);
        script.push('\n');
        if options.command_sections {
            script.push_str(&format!(
                "printf 'section_end:%s:{section}\\r\\033[0K' \"$(date +%s)\"\n"
            ));
        }
    }
    script.push_str("exit 0\n");
    script
}

/// `cleanup_file_variables`: removes every file variable's file and the temporary directory
/// (and, with `FF_ENABLE_JOB_CLEANUP`, the project directory).
pub fn cleanup_script(project_dir: &str, variables: &[Variable], remove_project: bool) -> String {
    let tmp_dir = format!("{project_dir}.tmp");
    let mut script = String::from(PREAMBLE);
    for variable in variables.iter().filter(|v| v.file && valid_name(&v.key)) {
        script.push_str(&format!(
            "rm -f {}\n",
            quote(&format!("{tmp_dir}/{}", variable.key))
        ));
    }
    script.push_str(&format!("rm -rf {}\n", quote(&tmp_dir)));
    if remove_project {
        script.push_str(&format!("rm -rf {}\n", quote(project_dir)));
    }
    script.push_str("exit 0\n");
    script
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(shell: &str, script: &str) -> std::process::Output {
        std::process::Command::new(shell)
            .arg("-c")
            .arg(script)
            .output()
            .unwrap()
    }

    fn scratch(name: &str) -> String {
        let dir =
            std::env::temp_dir().join(format!("podfleet-script-{name}-{}", std::process::id()));
        dir.to_string_lossy().into_owned()
    }

    /// What the commands printed, after the echoed command line.
    fn printed(stdout: &[u8]) -> &[u8] {
        let marker = b"\x1b[0;m\n";
        let at = stdout
            .windows(marker.len())
            .position(|w| w == marker)
            .expect("the echoed command");
        &stdout[at + marker.len()..]
    }

    fn echo_back(shell: &str, dir: &str, value: &str) -> std::process::Output {
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
        run(
            shell,
            &stage_script(dir, &variables, &commands, ScriptOptions::default()),
        )
    }

    #[test]
    fn hostile_values_stay_data() {
        let dir = scratch("hostile");
        let hostile = [
            "'; touch /tmp/podfleet-pwned; '",
            "$(touch /tmp/podfleet-pwned)",
            "`touch /tmp/podfleet-pwned`",
            "a\nb'\"\\$HOME",
            "\u{1b}[31m",
            "",
        ];
        for shell in ["sh", "bash"] {
            for value in hostile {
                let output = echo_back(shell, &dir, value);
                assert!(output.status.success(), "{shell}: {output:?}");
                assert_eq!(
                    printed(&output.stdout),
                    format!("{value}|{value}").as_bytes(),
                    "{shell}"
                );
                assert!(!std::path::Path::new("/tmp/podfleet-pwned").exists());
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Any NUL-free value, shell metacharacters and control bytes included, comes back
        /// byte for byte under dash and bash, both as a variable and as a file variable.
        #[test]
        fn any_value_echoes_back_byte_for_byte(
            value in proptest::string::string_regex(
                "([\\x01-\\x7f]|[$`'\"\\\\(){};&|<>*?!#~\n\r\t ]|[é€\u{1F600}\u{7ff}])*"
            ).unwrap().prop_filter("short", |v| v.len() < 400)
        ) {
            let dir = scratch("prop");
            for shell in ["sh", "bash"] {
                let output = echo_back(shell, &dir, &value);
                prop_assert!(output.status.success(), "{}: {:?}", shell, output);
                let expected = format!("{value}|{value}");
                prop_assert_eq!(printed(&output.stdout), expected.as_bytes());
            }
        }
    }

    #[test]
    fn failing_command_stops_the_script_with_its_status() {
        let dir = scratch("fail");
        let commands = vec![
            "echo one".to_string(),
            "exit 7".to_string(),
            "echo never".to_string(),
        ];
        let output = run(
            "sh",
            &stage_script(&dir, &[], &commands, ScriptOptions::default()),
        );
        assert_eq!(output.status.code(), Some(7));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("$ echo one") && stdout.contains("one\n"));
        assert!(!stdout.contains("never\n"));
    }

    #[test]
    fn command_sections_wrap_each_command() {
        let dir = scratch("sections");
        let commands = vec!["echo one".to_string(), "echo two".to_string()];
        let script = stage_script(
            &dir,
            &[],
            &commands,
            ScriptOptions {
                command_sections: true,
            },
        );
        let output = run("sh", &script);
        assert!(output.status.success());
        let stdout = String::from_utf8_lossy(&output.stdout);
        let start = stdout.find("section_start:").expect("a section start");
        let rest = &stdout[start + "section_start:".len()..];
        let (timestamp, rest) = rest.split_once(':').unwrap();
        assert!(
            timestamp.parse::<u64>().unwrap() > 1_600_000_000,
            "{stdout}"
        );
        assert!(
            rest.starts_with("section_script_step_0[hide_duration=true,collapsed=true]\r\x1b[0K"),
            "{stdout}"
        );
        assert!(
            stdout.contains(":section_script_step_1\r\x1b[0K"),
            "{stdout}"
        );
        assert_eq!(stdout.matches("section_end:").count(), 2, "{stdout}");
    }

    #[test]
    fn cleanup_removes_file_variables_and_optionally_the_project() {
        let dir = scratch("cleanup");
        let variables = vec![Variable {
            key: "F".into(),
            value: "secret".into(),
            file: true,
        }];
        let wrote = run(
            "sh",
            &stage_script(
                &dir,
                &variables,
                &["test -f \"$F\"".into()],
                ScriptOptions::default(),
            ),
        );
        assert!(wrote.status.success(), "{wrote:?}");
        let tmp = format!("{dir}.tmp");
        assert!(std::path::Path::new(&format!("{tmp}/F")).exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(format!("{tmp}/F"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o077,
            0,
            "file variable readable by others: {mode:o}"
        );
        assert!(
            run("sh", &cleanup_script(&dir, &variables, false))
                .status
                .success()
        );
        assert!(!std::path::Path::new(&tmp).exists());
        assert!(std::path::Path::new(&dir).exists());
        assert!(
            run("sh", &cleanup_script(&dir, &variables, true))
                .status
                .success()
        );
        assert!(!std::path::Path::new(&dir).exists());
    }

    #[test]
    fn expansion_follows_gitlab_runner() {
        let lookup = |name: &str| match name {
            "A" => Some("alpha".to_string()),
            "B_2" => Some("$A".to_string()),
            _ => None,
        };
        assert_eq!(expand("x$A-${A}y", &lookup), "xalpha-alphay");
        assert_eq!(expand("$B_2", &lookup), "$A", "one level only");
        assert_eq!(expand("cost $$5 $UNKNOWN.", &lookup), "cost $5 .");
        assert_eq!(
            expand("$ and $/ and trailing $", &lookup),
            "$ and $/ and trailing $"
        );
        assert_eq!(expand("${}x ${A", &lookup), "x A");
        assert_eq!(expand("é$A€", &lookup), "éalpha€");
    }

    #[test]
    fn invalid_names_are_skipped() {
        assert!(valid_name("CI_JOB_ID") && valid_name("_x"));
        assert!(!valid_name("1A") && !valid_name("A-B") && !valid_name("A;rm"));
    }
}
