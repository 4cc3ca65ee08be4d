//! `packet-inspector-aggregator`: parse flags, bind, run until SIGTERM/SIGINT, drain.

use clap::Parser;
use packet_inspector_aggregator::{config::Args, run, AggregatorError};
use packet_inspector_proto::daemon;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The daemon allocates and frees a buffer per packet, frame and message at hundreds of
/// thousands a second from several threads; mimalloc's thread-local free lists keep that off
/// glibc's arenas (interleaved ingest A/B, 1 KiB bodies: more frames per core in each pair).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    tokio::spawn(daemon::cancel_on_signal(shutdown.clone()));
    match run(args, listener, admin, shutdown).await {
        Ok(()) => {}
        Err(err @ (AggregatorError::Config(_) | AggregatorError::Tls(_) | AggregatorError::FilterModule { .. })) => {
            eprintln!("packet-inspector-aggregator: {err}");
            std::process::exit(EXIT_CONFIG);
        }
        Err(err) => {
            eprintln!("packet-inspector-aggregator: {err}");
            std::process::exit(1);
        }
    }
}
