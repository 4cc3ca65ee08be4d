//! [`GatherWrites`]: an I/O stream whose writes are gathered in memory and written to the socket
//! together, in one system call where the socket takes it.
//!
//! Why: h2 hands each DATA frame larger than a few hundred bytes to the transport as its own
//! write, and tokio-rustls turns each write into TLS records and a system call at once. Worse,
//! h2 flushes after every such frame, so gathering until the flush is not enough: with the
//! analysis service's default 16 KiB frames, a 64 KiB capture left in 9 writes (measured: 18k
//! `sendto`/s of 14 KB each, and the loopback TCP path under them a fifth of the aggregator's
//! core). On loopback each write also runs the receiver's TCP stack. Put under TLS, this layer
//! lets h2 write all it has in one pass, and the records go out together.
//!
//! A flush is therefore put off, once, until h2 has finished its pass: the first flush with
//! bytes gathered wakes the task and returns; the gathered bytes are written by the next read
//! (h2 reads first on every pass, so the wake-up leads straight to it), by a flush once
//! [`FLUSH_DELAY`] has passed (a timer wakes the task for it, in case nothing reads), by a
//! shutdown, or by a write that would take them past [`GATHER_LIMIT`]. A read also writes first
//! for another reason: a protocol that writes and then waits for the answer (a TLS handshake)
//! needs what it wrote to have left. Nothing waits in memory for a flush that never comes.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Sleep,
};

/// Bytes gathered at most before a write goes to the socket without waiting for a flush.
pub const GATHER_LIMIT: usize = 256 * 1024;

/// How long a flush is put off at most when nothing reads in the meantime.
pub const FLUSH_DELAY: Duration = Duration::from_millis(1);

/// Wraps `S`; see the [module docs](self).
#[derive(Debug)]
pub struct GatherWrites<S> {
    inner: S,
    gathered: Vec<u8>,
    /// How much of `gathered` the socket has taken.
    written: usize,
    /// Set while a flush is owed: when it falls due at the latest.
    flush_due: Option<Pin<Box<Sleep>>>,
}

impl<S> GatherWrites<S> {
    pub fn new(inner: S) -> Self {
        Self { inner, gathered: Vec::new(), written: 0, flush_due: None }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Bytes gathered and not yet written.
    pub fn gathered(&self) -> usize {
        self.gathered.len() - self.written
    }
}

impl<S: AsyncWrite + Unpin> GatherWrites<S> {
    /// Writes everything gathered.
    fn poll_write_gathered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.gathered.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.gathered[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.gathered.clear();
        self.written = 0;
        self.flush_due = None;
        Poll::Ready(Ok(()))
    }

    /// Whether a flush asked for now can be put off (see the [module docs](self)); if so, the
    /// task is woken for the read that will write the bytes, or at the deadline.
    fn put_off_flush(&mut self, cx: &mut Context<'_>) -> bool {
        if self.gathered() == 0 {
            return false;
        }
        match &mut self.flush_due {
            None => {
                let mut due = Box::pin(tokio::time::sleep(FLUSH_DELAY));
                // Registers the timer's wake-up; it cannot be due yet.
                let _ = due.as_mut().poll(cx);
                self.flush_due = Some(due);
                cx.waker().wake_by_ref();
                true
            }
            Some(due) => due.as_mut().poll(cx).is_pending(),
        }
    }

    /// Makes room for `len` more bytes: writes what is gathered when they would not fit.
    fn poll_room_for(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if self.gathered.len() + len > GATHER_LIMIT && !self.gathered.is_empty() {
            ready!(self.poll_write_gathered(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for GatherWrites<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room_for(cx, buf.len()))?;
        if buf.len() >= GATHER_LIMIT {
            // Too big to be worth a copy: straight through (nothing is gathered at this point).
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        this.gathered.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        ready!(this.poll_room_for(cx, len))?;
        if len >= GATHER_LIMIT {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for buf in bufs {
            this.gathered.extend_from_slice(buf);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.put_off_flush(cx) {
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_write_gathered(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_gathered(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for GatherWrites<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Whoever reads may be waiting for the answer to what it wrote. If the socket is full,
        // the read goes ahead: the waker is registered for writability too, so the next poll
        // writes the rest.
        if this.gathered() > 0 {
            if let Poll::Ready(Err(err)) = this.poll_write_gathered(cx) {
                return Poll::Ready(Err(err));
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use std::time::Duration;

    /// Records each write the socket receives; takes at most `accept` bytes per write.
    #[derive(Default)]
    struct Socket {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        accept: Option<usize>,
        to_read: Vec<u8>,
    }

    impl AsyncWrite for Socket {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let n = self.accept.map_or(buf.len(), |a| a.min(buf.len()));
            self.writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Socket {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let n = self.to_read.len().min(buf.remaining());
            buf.put_slice(&self.to_read[..n]);
            self.to_read.drain(..n);
            Poll::Ready(Ok(()))
        }
    }

    /// Polls `stream`'s flush until the socket has received a write, or fails after a second.
    async fn flushed(stream: &mut GatherWrites<Socket>) {
        let written = std::future::poll_fn(|cx| {
            let _ = Pin::new(&mut *stream).poll_flush(cx);
            if stream.get_ref().writes.is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        });
        tokio::time::timeout(Duration::from_secs(1), written).await.expect("the put-off flush never happened");
    }

    #[tokio::test]
    async fn writes_and_put_off_flushes_reach_the_socket_together_on_the_next_read() {
        let mut stream = GatherWrites::new(Socket { to_read: b"ack".to_vec(), ..Default::default() });
        for chunk in [&b"frame one"[..], b"frame two", b"three"] {
            stream.write_all(chunk).await.unwrap();
            // h2 flushes after each large DATA frame.
            stream.flush().await.unwrap();
        }
        let written = stream.write_vectored(&[io::IoSlice::new(b"-a"), io::IoSlice::new(b"-b")]).await.unwrap();
        assert_eq!(written, 4, "a vectored write is taken whole");
        stream.flush().await.unwrap();
        assert!(stream.get_ref().writes.is_empty(), "the flushes were put off");
        let mut ack = [0u8; 3];
        stream.read_exact(&mut ack).await.unwrap();
        assert_eq!(stream.get_ref().writes, vec![b"frame oneframe twothree-a-b".to_vec()]);
        assert_eq!(stream.gathered(), 0);
        assert_eq!(&ack, b"ack");
    }

    #[tokio::test]
    async fn a_put_off_flush_happens_after_the_delay_when_nothing_reads() {
        let mut stream = GatherWrites::new(Socket::default());
        stream.write_all(b"capture").await.unwrap();
        stream.flush().await.unwrap();
        assert!(stream.get_ref().writes.is_empty(), "put off");
        let started = std::time::Instant::now();
        // Only the timer can wake this task now.
        flushed(&mut stream).await;
        assert!(started.elapsed() >= FLUSH_DELAY / 2, "written before the delay: {:?}", started.elapsed());
        assert_eq!(stream.get_ref().writes, vec![b"capture".to_vec()]);
        assert_eq!(stream.get_ref().flushes, 1, "the socket is flushed once the bytes are written");
        // Nothing gathered: a flush goes straight through.
        stream.flush().await.unwrap();
        assert_eq!(stream.get_ref().flushes, 2);
    }

    #[tokio::test]
    async fn a_socket_taking_part_of_the_bytes_gets_the_rest_in_order() {
        let mut stream = GatherWrites::new(Socket { accept: Some(4), ..Default::default() });
        stream.write_all(b"0123456789").await.unwrap();
        stream.flush().await.unwrap();
        flushed(&mut stream).await;
        assert_eq!(stream.get_ref().writes.concat(), b"0123456789");
        assert_eq!(stream.get_ref().writes.len(), 3);
    }

    #[tokio::test]
    async fn the_limit_sends_what_is_gathered_before_more_is_taken() {
        let mut stream = GatherWrites::new(Socket::default());
        let chunk = vec![7u8; GATHER_LIMIT / 2 + 1];
        stream.write_all(&chunk).await.unwrap();
        assert!(stream.get_ref().writes.is_empty());
        stream.write_all(&chunk).await.unwrap();
        assert_eq!(stream.get_ref().writes.len(), 1, "the first chunk went when the second would not fit");
        assert_eq!(stream.gathered(), chunk.len());
        let big = vec![9u8; GATHER_LIMIT];
        stream.write_all(&big).await.unwrap();
        assert_eq!(stream.get_ref().writes.len(), 3, "gathered bytes first, then the big write as it is");
        assert_eq!(stream.get_ref().writes[2], big);
        assert_eq!(stream.gathered(), 0);
    }

    #[tokio::test]
    async fn reading_sends_what_was_written_first() {
        let mut stream = GatherWrites::new(Socket { to_read: b"answer".to_vec(), ..Default::default() });
        stream.write_all(b"question").await.unwrap();
        let mut answer = [0u8; 6];
        stream.read_exact(&mut answer).await.unwrap();
        assert_eq!(stream.get_ref().writes, vec![b"question".to_vec()]);
        assert_eq!(&answer, b"answer");
    }

    #[tokio::test]
    async fn shutdown_sends_what_is_gathered() {
        let mut stream = GatherWrites::new(Socket::default());
        stream.write_all(b"last words").await.unwrap();
        stream.shutdown().await.unwrap();
        assert_eq!(stream.get_ref().writes, vec![b"last words".to_vec()]);
    }
}
