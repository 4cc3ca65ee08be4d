//! An open-loop HTTP/1.1 load generator: requests go out on a fixed schedule, whatever the
//! answers do, and each latency is measured from the request's *scheduled* time, so a proxy that
//! falls behind pays for the queue it builds (no coordinated omission). `wrk` is closed loop: a
//! slower proxy simply gets fewer requests, which is why latency is compared with this one.
//!
//! `connections` keep-alive connections share the rate; connection `i` starts `i/connections`
//! of a period after the first, so requests are spread evenly rather than sent in bursts. A
//! request that waits for its connection's previous answer is timed from its scheduled time; one
//! that waits for the timer (whose resolution is a millisecond) from when it is actually sent,
//! so timer slack is not counted against the proxy.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinSet,
    time::Instant,
};

use crate::bench::{percentile, LoadResult};

/// Loads `127.0.0.1:port` at `rate` requests/s for `seconds`. Runs on the calling thread.
pub fn run(port: u16, connections: u32, rate: f64, seconds: u64) -> Result<LoadResult> {
    if rate.is_nan() || rate <= 0.0 || connections == 0 {
        bail!("open-loop load needs a positive rate and connections");
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let period = Duration::from_secs_f64(f64::from(connections) / rate);
        let start = Instant::now() + Duration::from_millis(100);
        let end = start + Duration::from_secs(seconds);
        let mut tasks = JoinSet::new();
        for i in 0..connections {
            let first = start + period.mul_f64(f64::from(i) / f64::from(connections));
            tasks.spawn(connection(port, first, period, end));
        }
        let mut latencies_us = Vec::new();
        let mut failed = 0;
        while let Some(joined) = tasks.join_next().await {
            let (latencies, errors) = joined.context("a load connection panicked")?;
            latencies_us.extend(latencies);
            failed += errors;
        }
        if latencies_us.is_empty() {
            bail!("no request succeeded ({failed} failed)");
        }
        latencies_us.sort_by(|a, b| a.total_cmp(b));
        Ok(LoadResult {
            requests: latencies_us.len() as u64,
            failed,
            requests_per_second: latencies_us.len() as f64 / seconds as f64,
            p50_us: percentile(&latencies_us, 0.50),
            p99_us: percentile(&latencies_us, 0.99),
            latencies_us,
        })
    })
}

/// One connection's schedule; returns the latencies (µs) of its answered requests and how many
/// failed (error, non-2xx, connection lost: it reconnects for the next one).
async fn connection(port: u16, first: Instant, period: Duration, end: Instant) -> (Vec<f64>, u64) {
    let mut latencies = Vec::new();
    let mut failed = 0;
    let mut stream = None;
    let mut buffer = Vec::with_capacity(128 * 1024);
    let mut scheduled = first;
    while scheduled < end {
        let sent = if Instant::now() >= scheduled {
            scheduled
        } else {
            tokio::time::sleep_until(scheduled).await;
            Instant::now()
        };
        let answered = async {
            if stream.is_none() {
                let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
                tcp.set_nodelay(true)?;
                stream = Some(tcp);
            }
            let tcp = stream.as_mut().context("no connection")?;
            exchange(tcp, &mut buffer).await
        }
        .await;
        match answered {
            Ok(status) if (200..300).contains(&status) => {
                latencies.push(sent.elapsed().as_secs_f64() * 1e6);
            }
            Ok(_) => failed += 1,
            Err(_) => {
                failed += 1;
                stream = None;
            }
        }
        scheduled += period;
    }
    (latencies, failed)
}

/// Sends one GET and reads its whole answer (`content-length` framed); returns the status.
async fn exchange(tcp: &mut TcpStream, buffer: &mut Vec<u8>) -> Result<u16> {
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n").await?;
    buffer.clear();
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        read_more(tcp, buffer).await?;
    };
    let head = std::str::from_utf8(&buffer[..head_end]).context("response head is not text")?;
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).context("no status code")?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
        })
        .context("the answer has no content-length")?;
    while buffer.len() < head_end + length {
        read_more(tcp, buffer).await?;
    }
    Ok(status)
}

async fn read_more(tcp: &mut TcpStream, buffer: &mut Vec<u8>) -> Result<()> {
    let mut chunk = [0u8; 65536];
    let n = tcp.read(&mut chunk).await?;
    if n == 0 {
        bail!("connection closed");
    }
    buffer.extend_from_slice(&chunk[..n]);
    Ok(())
}
