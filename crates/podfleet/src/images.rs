//! `podfleet images --config FILE`: which image each instance of each runner's group runs,
//! and whether that is the group's current image (instances marked outdated are replaced
//! after their current job when image maintenance is on).

use std::path::PathBuf;
use std::process::ExitCode;

use podfleet_provider::InstanceImage;

use crate::{EXIT_FAILED, load_config, providers};

#[derive(clap::Args)]
pub struct ImagesArgs {
    /// The gitlab-runner config.toml whose runners' groups to show.
    #[arg(long, short)]
    config: PathBuf,
    /// Only this runner (its `name`).
    #[arg(long)]
    runner: Option<String>,
    /// Print JSON (one object per runner) instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: ImagesArgs) -> ExitCode {
    let config = match load_config(&args.config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let mut failed = false;
    let mut reports = Vec::new();
    for runner in &config.runners {
        if args
            .runner
            .as_ref()
            .is_some_and(|name| *name != runner.name)
        {
            continue;
        }
        if runner.autoscaler.is_none() {
            continue;
        }
        // Errors of provider_for name the runner already.
        let images = match providers::provider_for(runner).await {
            Ok(provider) => {
                let images = provider.instance_images().await;
                provider.shutdown().await;
                images.map_err(|e| anyhow::anyhow!("runner {:?}: {e}", runner.name))
            }
            Err(e) => Err(e),
        };
        match images {
            Ok(images) => reports.push((runner.name.clone(), images)),
            Err(e) => {
                eprintln!("podfleet images: {e:#}");
                failed = true;
            }
        }
    }
    if args.json {
        let value: Vec<serde_json::Value> = reports
            .iter()
            .map(|(runner, images)| serde_json::json!({ "runner": runner, "instances": images }))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    } else if !reports.is_empty() {
        print!("{}", render(&reports));
    }
    if failed {
        ExitCode::from(EXIT_FAILED)
    } else {
        ExitCode::SUCCESS
    }
}

/// One table over every runner: an instance per line.
fn render(reports: &[(String, Vec<InstanceImage>)]) -> String {
    let mut rows = vec![[
        "RUNNER".to_string(),
        "INSTANCE".to_string(),
        "VERSION".to_string(),
        "TARGET".to_string(),
        "LATEST MODEL".to_string(),
        "STATUS".to_string(),
        "IMAGE".to_string(),
    ]];
    for (runner, images) in reports {
        for image in images {
            let dash = || "-".to_string();
            rows.push([
                runner.clone(),
                image.id.0.clone(),
                image.version.clone().unwrap_or_else(dash),
                image.target_version.clone().unwrap_or_else(dash),
                match image.latest_model_applied {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => dash(),
                },
                match image.up_to_date {
                    Some(true) => "current".into(),
                    Some(false) => "outdated: replaced after its job".into(),
                    None => "unknown".into(),
                },
                image.image.clone(),
            ]);
        }
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (index, (cell, width)) in row.iter().zip(widths).enumerate() {
            if index + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if reports.iter().all(|(_, images)| images.is_empty()) {
        out.push_str("(no instances)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use podfleet_provider::InstanceId;

    #[test]
    fn the_table_shows_versions_and_which_instances_are_outdated() {
        let image = |id: &str, version: &str, latest: bool| InstanceImage {
            id: InstanceId(id.into()),
            image: format!(
                "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/galleries/G/images/podman/versions/{version}"
            ),
            version: Some(version.into()),
            latest_model_applied: Some(latest),
            target_version: Some("1.1.0".into()),
            up_to_date: Some(latest && version == "1.1.0"),
        };
        let text = render(&[(
            "Podman Runner (Managed)".into(),
            vec![image("3", "1.0.0", false), image("7", "1.1.0", true)],
        )]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("RUNNER"));
        assert!(
            lines[1].contains(" 3 ") && lines[1].contains("1.0.0") && lines[1].contains("outdated"),
            "{text}"
        );
        assert!(
            lines[2].contains(" 7 ") && lines[2].contains("current"),
            "{text}"
        );
        // Columns line up: the version column starts at the same place on every line.
        let column = lines[0].find("VERSION").unwrap();
        assert_eq!(&lines[1][column..column + 5], "1.0.0");
        assert_eq!(&lines[2][column..column + 5], "1.1.0");
    }

    #[test]
    fn an_empty_group_says_so() {
        assert!(render(&[("r".into(), vec![])]).contains("(no instances)"));
    }
}
