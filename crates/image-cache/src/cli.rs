//! `podfleet cache ...`: the command-line surface, exported so the `podfleet` binary (and
//! `podfleet-cache`) embed it; they pass the shutdown signal in.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::config::{Config, ConfigError, Overrides};
use crate::server::{App, serve};

const EXIT_FAILED: u8 = 1;
const EXIT_BAD_INPUT: u8 = 2;

#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Run the pull-through registry cache.
    Serve(ServeArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML config file (see docs/image-cache.md); flags below override its values.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:5000.
    #[arg(long)]
    pub listen: Option<String>,
    /// Directory for cached content.
    #[arg(long)]
    pub storage: Option<PathBuf>,
    /// PREFIX=URL: clients reach URL under /v2/PREFIX/..., e.g. quay.io=https://quay.io (repeatable).
    #[arg(long = "upstream", value_name = "PREFIX=URL")]
    pub upstreams: Vec<String>,
    /// Docker Hub (or a stand-in) served at the root and under docker.io/.
    #[arg(long, value_name = "URL")]
    pub docker_hub: Option<String>,
    /// Disk quota, e.g. 20GiB; least recently used content is evicted above it.
    #[arg(long)]
    pub max_size: Option<String>,
    /// How long a tag is served without revalidation, e.g. 5m.
    #[arg(long)]
    pub tag_ttl: Option<String>,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
}

impl ServeArgs {
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        let overrides = Overrides {
            listen: self.listen.clone(),
            storage: self.storage.clone(),
            max_size: self.max_size.clone(),
            tag_ttl: self.tag_ttl.clone(),
            upstreams: self.upstreams.clone(),
            docker_hub: self.docker_hub.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
        };
        match &self.config {
            Some(path) => Config::load(path, &overrides),
            None => Config::from_overrides(&overrides),
        }
    }
}

/// Runs a cache command until `shutdown` completes: 0 ok, 1 failed, 2 bad configuration.
pub async fn run(args: CacheArgs, shutdown: impl Future<Output = ()> + Send + 'static) -> ExitCode {
    match args.command {
        CacheCommand::Serve(serve_args) => run_serve(&serve_args, shutdown).await,
    }
}

pub async fn run_serve(
    args: &ServeArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> ExitCode {
    let config = match args.load_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let tls = match config.tls.as_ref().map(crate::tls::acceptor).transpose() {
        Ok(tls) => tls,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let app = match App::new(&config) {
        Ok(app) => app,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!(
                "error: cannot listen on {}: {error} (is another process using the port?)",
                config.listen
            );
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let served = match tls {
        Some(acceptor) => crate::tls::serve(app, listener, acceptor, shutdown).await,
        None => serve(app, listener, shutdown).await,
    };
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}
