//! [`GatherWrites`]: an I/O stream whose writes are gathered in memory and written to the socket
//! on flush, in one system call where the socket takes it.
//!
//! Why: h2 hands each DATA frame larger than a few hundred bytes to the transport as its own
//! write, and tokio-rustls turns each write into TLS records and a `writev` at once. The
//! aggregator's forwarding connection carries thousands of small captures a second, so it made
//! two to three system calls per capture; on loopback each one also runs the receiver's TCP
//! stack (measured: 40k `writev`/s and 30% of the aggregator's core at 17k captures/s). Put under
//! TLS, this layer lets h2 write all it has, and the TLS records go out together when h2 flushes,
//! which it does at the end of every write pass.
//!
//! Nothing waits in memory for a flush that never comes: a flush, a shutdown or a read (a
//! protocol that writes and then waits for the answer, as a TLS handshake does, needs what it
//! wrote to have left) writes what is gathered, and a write that would take the gathered bytes
//! past [`GATHER_LIMIT`] writes them first.

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes gathered at most before a write goes to the socket without waiting for a flush.
pub const GATHER_LIMIT: usize = 256 * 1024;

/// Wraps `S`; see the [module docs](self).
#[derive(Debug)]
pub struct GatherWrites<S> {
    inner: S,
    gathered: Vec<u8>,
    /// How much of `gathered` the socket has taken.
    written: usize,
}

impl<S> GatherWrites<S> {
    pub fn new(inner: S) -> Self {
        Self { inner, gathered: Vec::new(), written: 0 }
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
        Poll::Ready(Ok(()))
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

    #[tokio::test]
    async fn small_writes_reach_the_socket_together_on_flush() {
        let mut stream = GatherWrites::new(Socket::default());
        for chunk in [&b"frame one"[..], b"frame two", b"three"] {
            stream.write_all(chunk).await.unwrap();
        }
        let written = stream.write_vectored(&[io::IoSlice::new(b"-a"), io::IoSlice::new(b"-b")]).await.unwrap();
        assert_eq!(written, 4, "a vectored write is taken whole");
        assert!(stream.get_ref().writes.is_empty(), "nothing written before the flush");
        stream.flush().await.unwrap();
        assert_eq!(stream.get_ref().writes, vec![b"frame oneframe twothree-a-b".to_vec()]);
        assert_eq!(stream.get_ref().flushes, 1);
        assert_eq!(stream.gathered(), 0);
    }

    #[tokio::test]
    async fn a_socket_taking_part_of_the_bytes_gets_the_rest_in_order() {
        let mut stream = GatherWrites::new(Socket { accept: Some(4), ..Default::default() });
        stream.write_all(b"0123456789").await.unwrap();
        stream.flush().await.unwrap();
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
