//! A raw HTTP/1.1 client: the tests control every byte of the request (repeated headers,
//! non-ASCII values) and know the client's own address, to compare with the capture.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{bail, Context, Result};

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// The client end of the connection, as the proxy saw it.
    pub local_addr: SocketAddr,
}

/// Sends `head` (request line and headers, without the blank line; `connection: close` is
/// added) and `body`, and reads the whole response.
pub fn send(to: SocketAddr, head: &str, body: &[u8]) -> Result<Response> {
    let mut stream =
        TcpStream::connect_timeout(&to, Duration::from_secs(5)).with_context(|| format!("connecting to {to}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let local_addr = stream.local_addr()?;
    let mut request = head.trim_end().as_bytes().to_vec();
    request.extend_from_slice(format!("\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len()).as_bytes());
    request.extend_from_slice(body);
    stream.write_all(&request)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).context("reading the response")?;
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("no complete response head in {:?}", String::from_utf8_lossy(&raw))
    };
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status =
        lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).context("status line")?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().as_bytes().to_vec()))
        .collect();
    let mut response = Response { status, headers, body: raw[split + 4..].to_vec(), local_addr };
    if response.header("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case(b"chunked")) {
        response.body = dechunk(&response.body)?;
    }
    Ok(response)
}

/// Decodes a chunked body (trailers are ignored).
fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").context("chunk size line")?;
        let size_text = String::from_utf8_lossy(&raw[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16).context("chunk size")?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if raw.len() < size + 2 {
            bail!("truncated chunk");
        }
        body.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }
}
