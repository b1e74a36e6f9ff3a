//! `podfleet simulate`: a generated trace replayed through the real planner, with the
//! report shape the issue defines, and a bad trace refused with its line.

use std::path::Path;
use std::process::Command;

fn podfleet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_podfleet"))
}

/// `podfleet simulate --trace TRACE --config CONFIG [EXTRA...] --report REPORT`.
fn simulate(trace: &Path, config: &str, extra: &[&str], report: &Path) -> std::process::Output {
    podfleet()
        .args(["simulate", "--trace"])
        .arg(trace)
        .args(["--config", config])
        .args(extra)
        .arg("--report")
        .arg(report)
        .output()
        .unwrap()
}

#[test]
fn a_generated_trace_replays_with_baseline_and_oracle() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let trace = dir.path().join("trace.jsonl");
    let generated = podfleet()
        .args([
            "simulate",
            "generate",
            "--days",
            "2",
            "--pipelines-per-day",
            "20",
            "--out",
        ])
        .arg(&trace)
        .output()
        .unwrap();
    assert!(generated.status.success(), "{generated:?}");
    let lines = std::fs::read_to_string(&trace).unwrap();
    let jobs = lines.lines().count();
    assert!(jobs > 20, "{jobs} jobs");
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert!(first["arrival_s"].is_number() && first["duration_s"].is_number());

    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../bench/traces/config.toml"
    );
    let report = dir.path().join("report.json");
    let run = simulate(&trace, config, &["--compare"], &report);
    assert!(run.status.success(), "{run:?}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    for name in ["podfleet", "baseline", "oracle"] {
        let r = &report["runs"][name];
        assert_eq!(r["jobs"].as_u64(), Some(jobs as u64), "{name}: {report}");
        for key in [
            "p50_wait_s",
            "p95_wait_s",
            "max_wait_s",
            "instance_hours",
            "instances_created",
            "jobs_per_instance",
        ] {
            assert!(r[key].is_number(), "{name}.{key}: {report}");
        }
        assert!(r["p95_wait_s"].as_f64() <= r["max_wait_s"].as_f64());
    }

    // Without --compare only podfleet's run is reported.
    let alone = dir.path().join("alone.json");
    let run = simulate(&trace, config, &[], &alone);
    assert!(run.status.success());
    let single: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&alone).unwrap()).unwrap();
    assert_eq!(single["runs"].as_object().unwrap().len(), 1, "{single}");

    // A broken trace line is refused with its line number.
    std::fs::write(
        &trace,
        "{\"arrival_s\": 1.0, \"duration_s\": 5.0, \"tags\": []}\nnot json\n",
    )
    .unwrap();
    let bad = simulate(&trace, config, &[], &alone);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("line 2"),
        "{bad:?}"
    );
}
