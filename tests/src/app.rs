//! The sample upstream application behind the server sidecar: a small threaded HTTP/1.1 server
//! (keep-alive, content-length bodies) whose answers the tests can predict:
//!
//! - `GET /status/<code>` → that status, body `status <code>\n`;
//! - any request with a body (content-length or chunked) → 200, the body echoed back;
//! - anything else → 200 `hello from <name>\n` with `x-sample-app: <name>`.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
};

use anyhow::Result;

pub struct SampleApp {
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl SampleApp {
    pub fn start(name: &str) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let (name, flag) = (name.to_owned(), stop.clone());
        thread::spawn(move || {
            for stream in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(stream) = stream {
                    let name = name.clone();
                    thread::spawn(move || serve(stream, &name));
                }
            }
        });
        Ok(Self { port, stop })
    }
}

impl Drop for SampleApp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(stream: TcpStream, name: &str) {
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut content_length = 0usize;
        let mut chunked = false;
        let mut close = false;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((key, value)) = line.split_once(':') {
                match key.trim().to_ascii_lowercase().as_str() {
                    "content-length" => content_length = value.trim().parse().unwrap_or(0),
                    "connection" => close = value.trim().eq_ignore_ascii_case("close"),
                    "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
                    _ => {}
                }
            }
        }
        let body = if chunked {
            match read_chunked(&mut reader) {
                Some(body) => body,
                None => return,
            }
        } else {
            let mut body = vec![0; content_length];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            body
        };
        let path = request_line.split_whitespace().nth(1).unwrap_or("/");
        let (status, reply, extra) = if let Some(code) = path.strip_prefix("/status/") {
            let code: u16 = code.parse().unwrap_or(400);
            (code, format!("status {code}\n").into_bytes(), String::new())
        } else if !body.is_empty() {
            (200, body, String::new())
        } else {
            (200, format!("hello from {name}\n").into_bytes(), format!("x-sample-app: {name}\r\n"))
        };
        let head = format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{extra}\r\n",
            if status == 200 { "OK" } else { "Other" },
            reply.len()
        );
        if writer.write_all(head.as_bytes()).and_then(|_| writer.write_all(&reply)).is_err() || close {
            return;
        }
    }
}

/// A chunked body; trailers are read and dropped.
fn read_chunked(reader: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size_line = String::new();
        reader.read_line(&mut size_line).ok()?;
        let size = usize::from_str_radix(size_line.trim().split(';').next()?, 16).ok()?;
        if size == 0 {
            loop {
                let mut trailer = String::new();
                if reader.read_line(&mut trailer).ok()? == 0 || trailer.trim().is_empty() {
                    return Some(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..]).ok()?;
        let mut crlf = [0; 2];
        reader.read_exact(&mut crlf).ok()?;
    }
}

/// The sample gRPC service (`samples/grpc-echo`), served h2c on a runtime thread of its own.
pub struct GrpcApp {
    pub port: u16,
    shutdown: tokio_util::sync::CancellationToken,
    thread: Option<thread::JoinHandle<()>>,
}

impl GrpcApp {
    pub fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let token = shutdown.clone();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let thread = thread::spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => {
                        if let Err(err) = packet_inspector_sample_grpc::serve(listener, token).await {
                            eprintln!("sample gRPC app failed: {err}");
                        }
                    }
                    Err(err) => eprintln!("sample gRPC app cannot listen: {err}"),
                }
            })
        });
        Ok(Self { port, shutdown, thread: Some(thread) })
    }
}

impl Drop for GrpcApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
