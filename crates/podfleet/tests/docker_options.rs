//! `[runners.docker]` container options reach the job's container on real rootless Podman:
//! tmpfs mounts, sysctls, devices. (Memory and CPU limits are sent too, but this host's
//! hybrid cgroups do not enforce them rootless, and Podman 4.3's Docker-compatible API
//! drops `Ulimits` for rootless containers; the mapping of those is unit-tested.)

use std::path::Path;
use std::process::Command;

#[test]
fn docker_options_reach_the_job_container() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let template =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/docker-options-config.toml");
    let config = std::fs::read_to_string(template)
        .unwrap()
        .replace(
            "@STATE_DIR@",
            &dir.path().join("state").display().to_string(),
        )
        .replace("@GROUP@", "dopt");
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config).unwrap();
    let pipeline = dir.path().join("pipeline.yml");
    std::fs::write(
        &pipeline,
        r#"options:
  script:
    - grep " /scratch " /proc/mounts
    - echo "port_start=$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start)"
    - test -c /dev/fuse && echo fuse-device-present
"#,
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_podfleet"))
        .args(["pipeline", "--file"])
        .arg(&pipeline)
        .arg("--config")
        .arg(&config_path)
        .arg("--status-socket")
        .arg(dir.path().join("status.sock"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let all = format!("{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{all}");
    let job_line = |needle: &str| {
        stdout
            .lines()
            .any(|l| l.contains("options |") && l.contains(needle) && !l.contains("$ "))
    };
    assert!(
        job_line("tmpfs /scratch tmpfs") && job_line("size=16384k"),
        "{all}"
    );
    assert!(job_line("port_start=80"), "{all}");
    assert!(job_line("fuse-device-present"), "{all}");
}
