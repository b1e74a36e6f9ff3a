//! The daemon's local API and `podfleet status`. The running manager serves its live view as
//! JSON on a Unix socket whose file permissions (owner only) are the access control, and its
//! Prometheus metrics on `listen_address`. `podfleet status` reads the socket.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use podfleet_manager::{StatusReport, Telemetry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::EXIT_FAILED;

/// Environment variable naming the status socket, for daemon and client alike.
const SOCKET_ENV: &str = "PODFLEET_STATUS_SOCKET";

#[derive(Args)]
pub struct StatusArgs {
    /// The daemon's status socket [default: $PODFLEET_STATUS_SOCKET, or
    /// /run/podfleet/podfleet.sock as root, $XDG_RUNTIME_DIR/podfleet/podfleet.sock otherwise].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Print the raw JSON report.
    #[arg(long)]
    json: bool,
    /// Refresh every N seconds until interrupted.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
    watch: Option<u64>,
}

/// Where the status socket is when neither a flag nor the environment says.
pub fn default_socket() -> PathBuf {
    if let Some(path) = std::env::var_os(SOCKET_ENV) {
        return PathBuf::from(path);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/run/podfleet/podfleet.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => Path::new(&dir).join("podfleet/podfleet.sock"),
        // SAFETY: as above.
        None => std::env::temp_dir().join(format!("podfleet-{}/podfleet.sock", unsafe {
            libc::geteuid()
        })),
    }
}

pub async fn run(args: StatusArgs) -> ExitCode {
    let socket = args.socket.unwrap_or_else(default_socket);
    loop {
        let report = match fetch(&socket).await {
            Ok(report) => report,
            Err(e) => {
                eprintln!("podfleet status: {e:#}");
                return ExitCode::from(EXIT_FAILED);
            }
        };
        let text = if args.json {
            serde_json::to_string_pretty(&report).unwrap_or_default() + "\n"
        } else {
            render(&report)
        };
        let mut stdout = std::io::stdout().lock();
        if args.watch.is_some() {
            // Clear the terminal and home the cursor before each refresh.
            let _ = write!(stdout, "\x1b[2J\x1b[H");
        }
        let _ = stdout.write_all(text.as_bytes());
        let _ = stdout.flush();
        drop(stdout);
        match args.watch {
            Some(seconds) => tokio::time::sleep(Duration::from_secs(seconds.max(1))).await,
            None => return ExitCode::SUCCESS,
        }
    }
}

/// Reads the report from a running daemon; a daemon that is not running is one clear line.
async fn fetch(socket: &Path) -> anyhow::Result<StatusReport> {
    let mut stream = match UnixStream::connect(socket).await {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            bail!(
                "no podfleet daemon is running (nothing answers on {}); start it with `podfleet run`, or pass --socket",
                socket.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", socket.display())),
    };
    stream
        .write_all(b"GET /status HTTP/1.0\r\nHost: podfleet\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .context("the daemon did not answer within 10 s")??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the daemon's answer is not HTTP")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!(
            "the daemon answered {}",
            head.lines().next().unwrap_or_default()
        );
    }
    serde_json::from_str(body).context("the daemon's status report does not parse")
}

/// The one-shot table.
fn render(report: &StatusReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "podfleet {} (pid {}), {}, up since {}",
        report.version,
        report.pid,
        report.mode,
        report.started_at.format("%Y-%m-%d %H:%M:%S UTC")
    );
    let wait = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{s:.1}s"));
    let _ = writeln!(
        out,
        "queue wait over the last {} jobs: p50 {}, p95 {}, max {}",
        report.queue_wait.samples,
        wait(report.queue_wait.p50_s),
        wait(report.queue_wait.p95_s),
        wait(report.queue_wait.max_s)
    );
    let _ = writeln!(out, "\nRUNNER                 REQUESTED  RUNNING  FINISHED");
    for r in &report.runners {
        let _ = writeln!(
            out,
            "{:<22} {:>9}  {:>7}  {:>8}",
            r.name, r.instances_requested, r.jobs_running, r.jobs_finished
        );
    }
    let _ = writeln!(
        out,
        "\nINSTANCE                  RUNNER           STATE      AGE      USES  IMAGE         JOBS"
    );
    for i in &report.instances {
        let jobs: Vec<String> = i.jobs.iter().map(u64::to_string).collect();
        let _ = writeln!(
            out,
            "{:<25} {:<16} {:<10} {:<8} {:>4}  {:<13} {}",
            i.id,
            i.runner,
            i.state,
            age(i.age_s),
            i.uses,
            match (&i.image, i.image_up_to_date) {
                (Some(image), Some(false)) => format!("{image} (old)"),
                (Some(image), _) => image.clone(),
                (None, _) => "-".to_string(),
            },
            if jobs.is_empty() {
                "-".to_string()
            } else {
                jobs.join(",")
            }
        );
    }
    let _ = writeln!(
        out,
        "\nJOB        NAME                   RUNNER           PHASE                 DURATION  INSTANCE"
    );
    for j in &report.jobs {
        let _ = writeln!(
            out,
            "{:<10} {:<22} {:<16} {:<21} {:<9} {}",
            j.id,
            j.name,
            j.runner,
            format!("{:?}", j.phase),
            age(j.duration_s),
            j.instance.as_deref().unwrap_or("-")
        );
    }
    out
}

fn age(seconds: f64) -> String {
    let s = seconds as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Binds the status socket. An existing socket that answers belongs to another podfleet and
/// is an error; one that does not is left over from a crash and is replaced.
pub async fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    if socket.exists() {
        if UnixStream::connect(socket).await.is_ok() {
            bail!(
                "another podfleet serves status on {}; stop it, or give this one its own --status-socket",
                socket.display()
            );
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing the stale socket {}", socket.display()))?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    // The socket's permissions are the access control: only its owner may read the status.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", socket.display()))?;
    Ok(listener)
}

/// Serves `GET /status` on the socket until the process ends.
pub fn serve_status(listener: UnixListener, telemetry: Arc<Telemetry>) {
    let app = axum::Router::new().route(
        "/status",
        axum::routing::get(move || {
            let telemetry = telemetry.clone();
            async move { axum::Json(telemetry.status()) }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "status socket stopped");
        }
    });
}

/// Serves `GET /metrics` (Prometheus text) on `listen_address`.
pub async fn serve_metrics(address: &str, telemetry: Arc<Telemetry>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("listen_address {address}: cannot listen"))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let telemetry = telemetry.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    telemetry.prometheus(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics listener stopped");
        }
    });
    Ok(())
}
