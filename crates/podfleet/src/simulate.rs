//! `podfleet simulate`: replays a job-arrival trace through the autoscaler's planner on a
//! virtual clock (`podfleet_autoscaler::sim`) and writes the report; `simulate generate`
//! writes a trace of realistic workdays.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use podfleet_autoscaler::ScalerSettings;
use podfleet_autoscaler::sim::{
    self, GeneratorSettings, ProviderModel, RunReport, SimRunner, Strategy,
};
use serde::Serialize;

use crate::{EXIT_BAD_INPUT, EXIT_FAILED};

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SimulateArgs {
    #[command(subcommand)]
    command: Option<SimulateCommand>,
    #[command(flatten)]
    replay: ReplayArgs,
}

#[derive(clap::Subcommand)]
enum SimulateCommand {
    /// Write a trace of workdays with bursts of pipelines (JSON lines).
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// Job-arrival trace: JSON lines {"arrival_s": 12.5, "duration_s": 340.0, "tags": ["podman"]}.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// The config.toml whose runners, tags and [runners.autoscaler] settings are simulated.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where to write the JSON report.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Also run the incumbent's rule (baseline) and the clairvoyant lower bound (oracle).
    #[arg(long)]
    compare: bool,
    /// Shortest instance boot (request to ready), seconds.
    #[arg(long, default_value_t = 60.0)]
    boot_min_s: f64,
    /// Longest instance boot, seconds (boot times are uniform in between).
    #[arg(long, default_value_t = 150.0)]
    boot_max_s: f64,
    /// Share of instances that fail to come up.
    #[arg(long, default_value_t = 0.02)]
    failure_rate: f64,
    /// Seed of the provider model's random draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Wall-clock time of the trace's second 0 (policy periods and the hour-of-week model
    /// read it); generated traces start on a Monday at 00:00.
    #[arg(long, default_value = "2026-01-05T00:00:00Z")]
    start: DateTime<Utc>,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Days to generate (Monday first; days 6 and 7 of each week are a weekend).
    #[arg(long, default_value_t = 10)]
    days: u32,
    /// Pipelines started on an average workday.
    #[arg(long, default_value_t = 120.0)]
    pipelines_per_day: f64,
    /// Share of pipelines with a privileged stage.
    #[arg(long, default_value_t = 0.2)]
    privileged_share: f64,
    /// Tag of the privileged jobs.
    #[arg(long, default_value = "pinp")]
    privileged_tag: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Serialize)]
struct Report {
    runs: Runs,
}

#[derive(Serialize)]
struct Runs {
    podfleet: RunReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline: Option<RunReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    oracle: Option<RunReport>,
}

pub async fn run(args: SimulateArgs) -> ExitCode {
    match args.command {
        Some(SimulateCommand::Generate(generate)) => run_generate(&generate),
        None => run_replay(&args.replay),
    }
}

fn run_generate(args: &GenerateArgs) -> ExitCode {
    if args.pipelines_per_day < 0.0 || !(0.0..=1.0).contains(&args.privileged_share) {
        eprintln!(
            "podfleet simulate generate: --pipelines-per-day must be 0 or more and --privileged-share between 0 and 1"
        );
        return ExitCode::from(EXIT_BAD_INPUT);
    }
    let trace = sim::generate(&GeneratorSettings {
        days: args.days,
        pipelines_per_day: args.pipelines_per_day,
        privileged_share: args.privileged_share,
        privileged_tag: args.privileged_tag.clone(),
        seed: args.seed,
    });
    let mut text = String::new();
    for job in &trace {
        text.push_str(&serde_json::to_string(job).expect("a trace line serializes"));
        text.push('\n');
    }
    if let Err(e) = std::fs::write(&args.out, text) {
        eprintln!(
            "podfleet simulate generate: cannot write {}: {e}",
            args.out.display()
        );
        return ExitCode::from(EXIT_FAILED);
    }
    println!(
        "podfleet: wrote {} jobs over {} days to {}",
        trace.len(),
        args.days,
        args.out.display()
    );
    ExitCode::SUCCESS
}

fn required<'a>(value: &'a Option<PathBuf>, flag: &str) -> Result<&'a Path, ExitCode> {
    value.as_deref().ok_or_else(|| {
        eprintln!(
            "podfleet simulate: {flag} FILE is required (usage: podfleet simulate --trace FILE --config FILE --report OUT.json [--compare])"
        );
        ExitCode::from(EXIT_BAD_INPUT)
    })
}

fn run_replay(args: &ReplayArgs) -> ExitCode {
    let paths = (|| {
        Ok::<_, ExitCode>((
            required(&args.trace, "--trace")?,
            required(&args.config, "--config")?,
            required(&args.report, "--report")?,
        ))
    })();
    let (trace_path, config_path, report_path) = match paths {
        Ok(paths) => paths,
        Err(code) => return code,
    };
    let model_ok = args.boot_min_s >= 0.0
        && args.boot_max_s >= args.boot_min_s
        && (0.0..1.0).contains(&args.failure_rate);
    if !model_ok {
        eprintln!(
            "podfleet simulate: need 0 <= --boot-min-s <= --boot-max-s and 0 <= --failure-rate < 1"
        );
        return ExitCode::from(EXIT_BAD_INPUT);
    }
    let config = match crate::load_config(config_path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let text = match std::fs::read_to_string(trace_path) {
        Ok(text) => text,
        Err(e) => {
            eprintln!(
                "podfleet simulate: cannot read trace {}: {e}",
                trace_path.display()
            );
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let trace = match sim::read_trace(&text) {
        Ok(trace) => trace,
        Err(e) => {
            eprintln!("podfleet simulate: {}: {e}", trace_path.display());
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let state_dir = config.state_dir();
    let runners: Vec<SimRunner> = config
        .runners
        .iter()
        .filter_map(|runner| {
            let autoscaler = runner.autoscaler.as_ref()?;
            Some(SimRunner {
                name: runner.name.clone(),
                tags: runner.tag_list.clone(),
                run_untagged: runner.run_untagged,
                // The simulated provider has no cap of its own beyond max_instances.
                settings: ScalerSettings::from_config(
                    &runner.name,
                    autoscaler,
                    usize::MAX,
                    &state_dir,
                ),
            })
        })
        .collect();
    let model = ProviderModel {
        boot_min_s: args.boot_min_s,
        boot_max_s: args.boot_max_s,
        failure_rate: args.failure_rate,
        seed: args.seed,
    };
    let run = |strategy| sim::simulate(&runners, &trace, &model, strategy, args.start);
    let result = (|| {
        let podfleet = run(Strategy::Podfleet)?;
        let (baseline, oracle) = if args.compare {
            (Some(run(Strategy::Baseline)?), Some(run(Strategy::Oracle)?))
        } else {
            (None, None)
        };
        Ok::<_, sim::SimError>(Runs {
            podfleet,
            baseline,
            oracle,
        })
    })();
    let runs = match result {
        Ok(runs) => runs,
        Err(e) => {
            eprintln!("podfleet simulate: {}: {e}", trace_path.display());
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    print_table(&runs);
    let json = serde_json::to_string_pretty(&Report { runs }).expect("a report serializes");
    if let Err(e) = std::fs::write(report_path, json + "\n") {
        eprintln!(
            "podfleet simulate: cannot write report {}: {e}",
            report_path.display()
        );
        return ExitCode::from(EXIT_FAILED);
    }
    ExitCode::SUCCESS
}

fn print_table(runs: &Runs) {
    println!(
        "{:<10} {:>6} {:>11} {:>11} {:>11} {:>15} {:>18} {:>18}",
        "run",
        "jobs",
        "p50_wait_s",
        "p95_wait_s",
        "max_wait_s",
        "instance_hours",
        "instances_created",
        "jobs_per_instance"
    );
    let rows = [
        ("podfleet", Some(&runs.podfleet)),
        ("baseline", runs.baseline.as_ref()),
        ("oracle", runs.oracle.as_ref()),
    ];
    for (name, report) in rows {
        let Some(r) = report else { continue };
        println!(
            "{:<10} {:>6} {:>11.1} {:>11.1} {:>11.1} {:>15.2} {:>18} {:>18.2}",
            name,
            r.jobs,
            r.p50_wait_s,
            r.p95_wait_s,
            r.max_wait_s,
            r.instance_hours,
            r.instances_created,
            r.jobs_per_instance
        );
    }
}
