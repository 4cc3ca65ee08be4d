//! The transport thread: the native capture's own gRPC streams to the aggregator, over mTLS.
//!
//! The Wasm filter's streams are Envoy's (`proxy_grpc_*` on a cluster that carries the mTLS).
//! A dynamic module has no per-worker gRPC streams, so this thread runs a small Tokio runtime
//! with one `CaptureService/StreamFrames` stream per Envoy worker, on one TLS connection
//! (`proto::tls`, the same client the aggregator uses upstream, with the certificate the
//! sidecar's secret service pushes, or files reloaded when they change). It carries out the
//! workers' [`Command`]s in order, delivers each stream's readiness, acks and close to its
//! worker's pipeline, and runs the pipelines' flush tick, so batches go out every
//! `flushIntervalMs` even when traffic stops.
//!
//! Batches arrive encoded (the pipeline encodes each frame once, into its batch, and hands the
//! batch's buffer over), and the stream's request body carries them as they are, each behind its
//! gRPC prefix: no codec copies them (at 64 KiB bodies, copies were most of this thread's time).
//! On shutdown every pipeline is flushed, the streams are ended and given [`DRAIN_TIMEOUT`] for
//! their acks.

use std::{
    collections::HashMap,
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use packet_inspector_filter::pipeline::{METHOD, SERVICE};
use packet_inspector_proto::{sds, tls};
use tokio::{
    sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender},
    task::{AbortHandle, JoinSet},
    time::MissedTickBehavior,
};
use tokio_util::sync::CancellationToken;
use tonic::{
    codec::{DecodeBuf, Decoder, Streaming},
    transport::Channel,
    Code, Status,
};
use tower::{Service, ServiceExt};

use crate::{
    core::{Command, Core},
    identity,
    settings::{Aggregator, Credentials},
};

/// How long a clean shutdown waits for the aggregator to acknowledge the last batches.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the certificate files are checked for rotation.
const RELOAD_INTERVAL: Duration = Duration::from_secs(30);

/// The aggregator's channel: connects on first use, reconnects after failures. With the secret
/// service, its follower starts here (so it must run in the transport's runtime) and a
/// connection waits up to [`CONNECT_TIMEOUT`] for the first certificate.
///
/// # Errors
/// When the certificate files cannot be loaded or the server name is neither a DNS name nor an
/// IP address, with the file or name at fault.
pub fn channel(
    aggregator: &Aggregator,
    core: &Arc<Core>,
    shutdown: &CancellationToken,
) -> Result<Channel, tls::TlsError> {
    let check = if aggregator.server_name.is_some() { tls::ServerCheck::Name } else { tls::ServerCheck::ChainOnly };
    let config: tls::ClientTls = match &aggregator.credentials {
        Credentials::Files { ca_file, cert_file, key_file } => {
            let identity = tls::Identity { cert_chain: cert_file.clone(), private_key: key_file.clone() };
            let config = tls::reloading_client_config(ca_file.clone(), Some(identity), check)?;
            config.watch("the aggregator client certificate", RELOAD_INTERVAL, shutdown.clone());
            config.into()
        }
        Credentials::Sds { socket } => {
            let node_id = identity::sds_node_id(&core.node, std::env::var("INSTANCE_IP").ok().as_deref());
            let source = sds::Source { socket: socket.clone(), node_id, check };
            let core = core.clone();
            let warn = Arc::new(move |message: String| core.warn(&format!("packet-inspector: {message}")));
            tls::ClientTls::Pushed(sds::follow(source, warn, shutdown.clone()))
        }
    };
    let server_name = aggregator.server_name.as_deref().unwrap_or(&aggregator.host);
    tls::connect_lazy_as(&aggregator.host, aggregator.port, server_name, config, CONNECT_TIMEOUT)
}

/// Runs until [`Command::Shutdown`] (or every sender is gone), then drains.
pub async fn run(core: Arc<Core>, mut commands: UnboundedReceiver<Command>, channel: Channel) {
    let mut streams: HashMap<u32, (UnboundedSender<Bytes>, AbortHandle)> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(u64::from(core.config.flush_interval_ms.max(1))));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                for worker in 0..core.worker_count() {
                    core.with_pipeline(worker, |pipeline, host| pipeline.on_tick(host));
                    core.publish(worker);
                }
            }
            Some(finished) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                if let Ok((_, token)) = finished {
                    streams.remove(&token);
                }
            }
            command = commands.recv() => match command {
                Some(Command::Shutdown) | None => break,
                Some(command) => carry_out(command, &core, &channel, &mut streams, &mut tasks),
            },
        }
    }
    // A last flush of every worker's buffered frames (its sends are queued behind us).
    for worker in 0..core.worker_count() {
        core.with_pipeline(worker, |pipeline, host| pipeline.flush(host));
    }
    while let Ok(command) = commands.try_recv() {
        if !matches!(command, Command::Shutdown) {
            carry_out(command, &core, &channel, &mut streams, &mut tasks);
        }
    }
    // Ending the request streams lets the aggregator acknowledge what it has and close.
    streams.clear();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        core.warn("packet-inspector: the aggregator did not acknowledge the last batches in time; they may be lost");
    }
    for worker in 0..core.worker_count() {
        core.publish(worker);
    }
}

fn carry_out(
    command: Command,
    core: &Arc<Core>,
    channel: &Channel,
    streams: &mut HashMap<u32, (UnboundedSender<Bytes>, AbortHandle)>,
    tasks: &mut JoinSet<u32>,
) {
    match command {
        Command::Open { token, worker } => {
            let (batches, queued) = unbounded_channel();
            let task = tasks.spawn(stream(core.clone(), channel.clone(), token, worker, queued));
            streams.insert(token, (batches, task));
        }
        // A batch for a stream that is gone is lost with it; the pipeline counts it when it
        // hears of the close.
        Command::Send { token, batch } => {
            if let Some((batches, _)) = streams.get(&token) {
                // The worker refused to send a batch too large for a gRPC message.
                if let Ok(len) = u32::try_from(batch.len()) {
                    let _ = batches.send(message_prefix(len));
                    let _ = batches.send(batch);
                }
            }
        }
        Command::Cancel { token } => {
            if let Some((_, task)) = streams.remove(&token) {
                task.abort();
            }
        }
        Command::Shutdown => {}
    }
}

/// One worker's capture stream, from open to close; returns its token.
async fn stream(
    core: Arc<Core>,
    channel: Channel,
    token: u32,
    worker: usize,
    batches: UnboundedReceiver<Bytes>,
) -> u32 {
    let status = match exchange(&core, channel, token, worker, batches).await {
        Ok(()) => 0,
        Err(status) => status.code() as u32,
    };
    core.with_pipeline(worker, |pipeline, host| pipeline.on_stream_closed(host, token, status));
    token
}

async fn exchange(
    core: &Core,
    mut channel: Channel,
    token: u32,
    worker: usize,
    batches: UnboundedReceiver<Bytes>,
) -> Result<(), Status> {
    channel.ready().await.map_err(|err| Status::unavailable(format!("the aggregator's channel: {err}")))?;
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("/{SERVICE}/{METHOD}"))
        .version(http::Version::HTTP_2)
        .header(http::header::TE, "trailers")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(tonic::body::Body::new(Batches(batches)))
        .map_err(|err| Status::internal(format!("the capture stream's request: {err}")))?;
    let response = channel.call(request).await.map_err(|err| Status::from_error(Box::new(err)))?;
    let (head, body) = response.into_parts();
    // A trailers-only answer: the aggregator refused the stream (or ended it at once). It is
    // never taken for readiness (see `stream_accepted`).
    if let Some(status) = Status::from_header_map(&head.headers) {
        return if status.code() == Code::Ok { Ok(()) } else { Err(status) };
    }
    let status = head.status.as_str().as_bytes();
    core.with_pipeline(worker, |pipeline, host| pipeline.on_stream_headers(host, token, &[(b":status", status)]));
    let mut acks = Streaming::new_response(AckDecoder, body, head.status, None, None);
    while let Some(ack) = acks.message().await? {
        core.with_pipeline(worker, |pipeline, host| pipeline.on_stream_message(host, token, &ack));
    }
    Ok(())
}

/// gRPC's prefix of a message of `len` bytes: not compressed, then the length, big-endian.
fn message_prefix(len: u32) -> Bytes {
    let mut prefix = Vec::with_capacity(5);
    prefix.push(0);
    prefix.extend_from_slice(&len.to_be_bytes());
    Bytes::from(prefix)
}

/// The capture stream's request body: each batch goes out as it was encoded, behind its gRPC
/// prefix as a DATA frame of its own (gRPC messages may span frames), so no codec copies it.
struct Batches(UnboundedReceiver<Bytes>);

impl http_body::Body for Batches {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|bytes| bytes.map(|bytes| Ok(http_body::Frame::data(bytes))))
    }
}

/// The aggregator's acks, as bytes for the pipeline to decode (as the Wasm filter hands them
/// over).
#[derive(Debug)]
struct AckDecoder;

impl Decoder for AckDecoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut ack = vec![0; src.remaining()];
        src.copy_to_slice(&mut ack);
        Ok(Some(ack))
    }
}
