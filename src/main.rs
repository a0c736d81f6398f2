//! flags -> telemetry -> Config::load -> App::start -> signal -> drain.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use zkroute::config::LogFormat;
use zkroute::{App, Config, ConfigArgs};

/// A sidecar routing proxy driven by ZooKeeper naming and rule nodes.
#[derive(Parser)]
#[command(name = "zkroute", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy (the default).
    Run,
    /// Validate a configuration file and exit: 0 when valid, 2 with the file, key and reason.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Read and change what is in ZooKeeper (same settings as the proxy). Exit codes: 0 done,
    /// 1 not found or refused, 2 usage or connection.
    Ctl {
        /// Print JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: zkroute::ctl::Command,
    },
}

/// jemalloc, with its background thread: memory a burst of connections used goes back to the
/// system after they close (glibc's malloc keeps most of it), at no cost per request;
/// docs/PERFORMANCE.md has the figures.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for a bad configuration or bad usage.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::CheckConfig { file }) => {
            let args = cli.config.with_file(file);
            match Config::load(&args) {
                Ok(c) => {
                    println!(
                        "{}: valid ({} listeners, {} registrations)",
                        c.source_name(),
                        c.listeners.len(),
                        c.registrations.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("zkroute: invalid configuration: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Some(Cmd::Ctl { json, command }) => ctl(cli.config, command, json),
        None | Some(Cmd::Run) => run(cli.config),
    }
}

fn ctl(args: ConfigArgs, command: zkroute::ctl::Command, json: bool) -> ExitCode {
    let config = match Config::load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("zkroute ctl: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let settings = match zkroute::zookeeper::ZkSettings::from_config(&config.zookeeper) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("zkroute ctl: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("zkroute ctl: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match runtime.block_on(zkroute::ctl::run(&config, &settings, command, json)) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!("zkroute ctl: {}", f.message());
            ExitCode::from(f.exit_code())
        }
    }
}

fn run(args: ConfigArgs) -> ExitCode {
    let config = match Config::load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("zkroute: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_tracing(config.log.format);
    let runtime = match config.proxy.workers {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        0 => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("zkroute: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Before anything else: SIGHUP's default action ends the process.
        let mut signals = Signals::new();
        let mut app = match App::start(config).await {
            Ok(app) => app,
            Err(e) => {
                tracing::error!("cannot start: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        loop {
            tokio::select! {
                signal = signals.next() => match signal {
                    Signal::Reload => {
                        tracing::info!("SIGHUP: reloading the configuration");
                        app.reload(&args).await;
                    }
                    Signal::Stop => break,
                },
                Some(reply) = app.drain_request() => {
                    let _ = reply.send(app.drain().await);
                }
            }
        }
        tracing::info!(drain_timeout = ?app.config().proxy.drain_timeout.0, "shutting down: draining");
        app.stop_as_configured().await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

/// Without `RUST_LOG`: `info`, but rustls at `error`: it warns on every handshake from a client
/// that sends an IP address as SNI (which it ignores, as RFC 6066 asks), a client's quirk that
/// would otherwise flood the log of a busy TLS listener.
const DEFAULT_LOG_FILTER: &str = "info,rustls=error";

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

#[derive(PartialEq, Eq)]
enum Signal {
    /// SIGHUP: read the configuration again.
    Reload,
    /// SIGTERM or SIGINT: drain and exit.
    Stop,
}

/// The signals zkroute acts on, listened to from creation on: none is missed while a reload runs.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        // Installing a handler cannot fail on Linux in practice; without one the signal keeps its
        // default action, which for each of these ends the process.
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
            hup: signal(SignalKind::hangup()).ok(),
        }
    }

    async fn next(&mut self) -> Signal {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.term) => Signal::Stop,
            _ = recv(&mut self.int) => Signal::Stop,
            _ = recv(&mut self.hup) => Signal::Reload,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
