//! `packet-inspector-analysis-emulator`: parse flags, bind, serve until SIGTERM/SIGINT.

use clap::Parser;
use packet_inspector_analysis_emulator::{run, Args, EmulatorError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const EXIT_CONFIG: i32 = 64;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let listener = match TcpListener::bind(&args.listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("packet-inspector-analysis-emulator: cannot listen on --listen {}: {err}", args.listen);
            std::process::exit(EXIT_CONFIG);
        }
    };
    let shutdown = CancellationToken::new();
    let signal_shutdown = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        if let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            tracing::info!("signal received: shutting down");
            signal_shutdown.cancel();
        }
    });
    match run(args, listener, shutdown).await {
        Ok(()) => {}
        Err(err @ (EmulatorError::Tls(_) | EmulatorError::OutputDir { .. })) => {
            eprintln!("packet-inspector-analysis-emulator: {err}");
            std::process::exit(EXIT_CONFIG);
        }
        Err(err) => {
            eprintln!("packet-inspector-analysis-emulator: {err}");
            std::process::exit(1);
        }
    }
}
