//! Clients that talk to the local mesh as a meshed app would: a raw h2c client (the `h2`
//! crate, so requests carry exactly the headers, body and trailers given) and the sample gRPC
//! service's tonic client. Both block on a runtime of their own, so sync tests and the demo can
//! call them.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use bytes::Bytes;
use packet_inspector_sample_grpc::pb::{echo_client::EchoClient, CountRequest, EchoRequest};

/// An HTTP/2 response: status, headers and the whole body.
#[derive(Debug)]
pub struct H2Response {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

/// One h2c request (prior knowledge) on a new connection to `to`.
pub fn h2_request(
    to: SocketAddr,
    request: http::Request<()>,
    body: &[u8],
    trailers: Option<http::HeaderMap>,
) -> Result<H2Response> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(to).await.with_context(|| format!("connecting to {to}"))?;
        let (client, connection) = h2::client::handshake(tcp).await?;
        tokio::spawn(connection);
        let mut client = client.ready().await?;
        let end_of_stream = body.is_empty() && trailers.is_none();
        let (response, mut stream) = client.send_request(request, end_of_stream)?;
        if !body.is_empty() {
            stream.send_data(Bytes::copy_from_slice(body), trailers.is_none())?;
        }
        if let Some(trailers) = trailers {
            stream.send_trailers(trailers)?;
        }
        let response = response.await?;
        let (parts, mut received) = response.into_parts();
        let mut body = Vec::new();
        while let Some(chunk) = received.data().await {
            let chunk = chunk?;
            received.flow_control().release_capacity(chunk.len())?;
            body.extend_from_slice(&chunk);
        }
        Ok(H2Response { status: parts.status.as_u16(), headers: parts.headers, body })
    })
}

/// The `x-request-id` the client sidecar answered with.
fn request_id(metadata: &tonic::metadata::MetadataMap) -> String {
    metadata.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

/// Calls the sample gRPC service through the sidecar listening at `to`: a unary call, a server
/// stream of `streamed` replies and a bidirectional chat. Returns (call, request id) pairs.
pub fn grpc_demo_calls(to: SocketAddr, streamed: u32) -> Result<Vec<(String, String)>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut client = EchoClient::connect(format!("http://{to}")).await?;
        let mut calls = Vec::new();
        let reply = client.say(EchoRequest { text: "hello, mesh".into() }).await?;
        calls.push(("Say (unary)".to_owned(), request_id(reply.metadata())));
        let count = CountRequest { count: streamed, interval_ms: 100, text: "tick".into() };
        let response = client.count(count).await?;
        let id = request_id(response.metadata());
        let mut replies = response.into_inner();
        while replies.message().await?.is_some() {}
        calls.push(("Count (server streaming)".to_owned(), id));
        let texts = ["ping", "pong", "again"].map(|t| EchoRequest { text: t.into() });
        let response = client.chat(tokio_stream::iter(texts.to_vec())).await?;
        let id = request_id(response.metadata());
        let mut answers = response.into_inner();
        while answers.message().await?.is_some() {}
        calls.push(("Chat (bidirectional)".to_owned(), id));
        Ok(calls)
    })
}
