//! The sample gRPC service (see `proto/echo.proto`) and its generated client.

use std::{pin::Pin, time::Duration};

use tokio::net::TcpListener;
use tokio_stream::{wrappers::TcpListenerStream, Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};

/// Generated messages, client and server.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/packetinspector.sample.v1.rs"));
}

use pb::{echo_server::EchoServer, CountRequest, EchoReply, EchoRequest, FailRequest};

/// The gRPC path prefix of the service (the demo routes it to this app).
pub const PATH_PREFIX: &str = "/packetinspector.sample.v1.Echo/";

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[derive(Default)]
pub struct Echo;

#[tonic::async_trait]
impl pb::echo_server::Echo for Echo {
    async fn say(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Ok(Response::new(EchoReply { text: request.into_inner().text, index: 0 }))
    }

    async fn fail(&self, request: Request<FailRequest>) -> Result<Response<EchoReply>, Status> {
        let request = request.into_inner();
        Err(Status::new(Code::from(i32::try_from(request.code).unwrap_or(2)), request.message))
    }

    type CountStream = ReplyStream;

    async fn count(&self, request: Request<CountRequest>) -> Result<Response<Self::CountStream>, Status> {
        let CountRequest { count, interval_ms, text } = request.into_inner();
        let interval = Duration::from_millis(u64::from(interval_ms));
        let replies = tokio_stream::iter(0..count).then(move |index| {
            let text = text.clone();
            async move {
                if index > 0 {
                    tokio::time::sleep(interval).await;
                }
                Ok(EchoReply { text, index })
            }
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn join(&self, request: Request<Streaming<EchoRequest>>) -> Result<Response<EchoReply>, Status> {
        let mut requests = request.into_inner();
        let mut texts = Vec::new();
        while let Some(request) = requests.message().await? {
            texts.push(request.text);
        }
        Ok(Response::new(EchoReply { index: texts.len() as u32, text: texts.join(" ") }))
    }

    type ChatStream = ReplyStream;

    async fn chat(&self, request: Request<Streaming<EchoRequest>>) -> Result<Response<Self::ChatStream>, Status> {
        let requests = request.into_inner();
        let mut index = 0;
        let replies = requests.map(move |request| {
            index += 1;
            request.map(|request| EchoReply { text: request.text.to_uppercase(), index: index - 1 })
        });
        Ok(Response::new(Box::pin(replies)))
    }
}

/// Serves the sample service (h2c) on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, shutdown: CancellationToken) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(EchoServer::new(Echo))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await
}
