//! The sample upstream application behind the server sidecar: a small threaded HTTP/1.1 server
//! (keep-alive, content-length bodies) whose answers the tests can predict:
//!
//! - `GET /status/<code>` → that status, body `status <code>\n`;
//! - any request with a body → 200, the body echoed back;
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
                    _ => {}
                }
            }
        }
        let mut body = vec![0; content_length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
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
