//! `packet-inspector-analysis-emulator`: parse flags, bind, serve until SIGTERM/SIGINT.

use clap::Parser;
use packet_inspector_analysis_emulator::{run, Args, EmulatorError};
use packet_inspector_proto::daemon;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Exit code for unusable configuration (sysexits' EX_USAGE).
const EXIT_CONFIG: i32 = 64;

fn main() {
    // Before the runtime's threads: this may re-execute the binary.
    let copies = daemon::tune_copies();
    serve(copies);
}

#[tokio::main]
async fn serve(copies: daemon::CopyTuning) {
    daemon::init_logging();
    copies.log();
    let args = Args::parse();
    let listener = match TcpListener::bind(&args.listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("packet-inspector-analysis-emulator: cannot listen on --listen {}: {err}", args.listen);
            std::process::exit(EXIT_CONFIG);
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(daemon::cancel_on_signal(shutdown.clone()));
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
