//! `packet-inspector-aggregator`: parse flags, bind, run until SIGTERM/SIGINT, drain.

use clap::Parser;
use packet_inspector_aggregator::{config::Args, run, AggregatorError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Exit code for unusable configuration (EX_CONFIG... sysexits' EX_USAGE, as linkerd does).
const EXIT_CONFIG: i32 = 64;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Err(err) = args.validate() {
        eprintln!("packet-inspector-aggregator: {err}");
        std::process::exit(EXIT_CONFIG);
    }
    let listener = match TcpListener::bind(&args.listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("packet-inspector-aggregator: cannot listen on --listen {}: {err}", args.listen);
            std::process::exit(EXIT_CONFIG);
        }
    };
    let admin = if args.admin_listen.is_empty() {
        None
    } else {
        match TcpListener::bind(&args.admin_listen).await {
            Ok(listener) => Some(listener),
            Err(err) => {
                eprintln!("packet-inspector-aggregator: cannot listen on --admin-listen {}: {err}", args.admin_listen);
                std::process::exit(EXIT_CONFIG);
            }
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    match run(args, listener, admin, shutdown).await {
        Ok(()) => {}
        Err(err @ (AggregatorError::Config(_) | AggregatorError::Tls(_))) => {
            eprintln!("packet-inspector-aggregator: {err}");
            std::process::exit(EXIT_CONFIG);
        }
        Err(err) => {
            eprintln!("packet-inspector-aggregator: {err}");
            std::process::exit(1);
        }
    }
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}
