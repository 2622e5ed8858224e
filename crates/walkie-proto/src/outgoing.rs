//! Bytes waiting to be written to the transport.
//!
//! Small frames are copied into one contiguous tail buffer, so many small
//! messages leave in a single write. Large payloads are not copied: they are
//! queued as their own chunk behind their header, and the I/O layer writes the
//! whole queue with one vectored write.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

/// Payloads at least this large are queued by reference instead of copied.
pub(crate) const COPY_THRESHOLD: usize = 1024;

/// A queue of bytes to write, in order.
///
/// It implements [`Buf`]: use [`Buf::chunks_vectored`] to gather everything
/// into one `writev`, then [`Buf::advance`] by what was written.
#[derive(Debug, Default)]
pub struct Outgoing {
    /// Sealed chunks, written before `tail`.
    chunks: VecDeque<Bytes>,
    /// Where small frames are appended; always last.
    tail: BytesMut,
    /// Total bytes queued (chunks and tail).
    len: usize,
}

impl Outgoing {
    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffer small writes append to. Callers must add what they wrote
    /// with [`Outgoing::commit_tail`].
    pub(crate) fn tail(&mut self) -> &mut BytesMut {
        &mut self.tail
    }

    /// Accounts for `n` bytes appended through [`Outgoing::tail`].
    pub(crate) fn commit_tail(&mut self, n: usize) {
        self.len += n;
    }

    /// Appends bytes by reference, after everything queued so far.
    pub(crate) fn push_chunk(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        if !self.tail.is_empty() {
            self.chunks.push_back(self.tail.split().freeze());
        }
        self.len += bytes.len();
        self.chunks.push_back(bytes);
    }

    /// Takes the buffer frames are written into, if nothing is queued and
    /// it holds memory; the queue is left without memory.
    pub(crate) fn take_buffer(&mut self) -> Option<BytesMut> {
        if self.len != 0 {
            return None;
        }
        self.chunks = VecDeque::new();
        (self.tail.capacity() > 0).then(|| std::mem::take(&mut self.tail))
    }

    /// Empties the queue, keeping its memory unless the tail's capacity is
    /// outside `keep`.
    pub(crate) fn reset(&mut self, keep: std::ops::RangeInclusive<usize>) {
        // A deque grown by a burst of large messages is not carried around.
        if self.chunks.capacity() > 8 {
            self.chunks = VecDeque::new();
        }
        self.chunks.clear();
        self.tail.clear();
        self.len = 0;
        if !keep.contains(&self.tail.capacity()) {
            self.tail = BytesMut::new();
        }
    }

    /// Gives an empty queue a buffer to write frames into, so that the next
    /// frames need no allocation. Ignored unless the queue is
    /// empty and holds no buffer.
    pub fn provide_buffer(&mut self, mut buf: BytesMut) {
        if self.len == 0 && self.tail.capacity() == 0 {
            buf.clear();
            self.tail = buf;
        }
    }

    /// Whether the queue has a buffer to write into.
    pub fn has_buffer(&self) -> bool {
        self.tail.capacity() > 0
    }
}

impl Buf for Outgoing {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        match self.chunks.front() {
            Some(c) => c,
            None => &self.tail,
        }
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(
            cnt <= self.len,
            "advance past the end of the outgoing queue"
        );
        self.len -= cnt;
        while cnt > 0 {
            match self.chunks.front_mut() {
                Some(front) if front.len() <= cnt => {
                    cnt -= front.len();
                    self.chunks.pop_front();
                }
                Some(front) => {
                    front.advance(cnt);
                    return;
                }
                None => {
                    self.tail.advance(cnt);
                    break;
                }
            }
        }
        if self.len == 0 {
            // Reuse the tail's allocation from its start. Advancing moved
            // the tail's start forward, and `clear` keeps it there: take
            // the room before it back (empty, so nothing is copied; a no-op
            // when the tail is still at its start). Otherwise every write
            // would go to fresh memory further along the buffer, cold in
            // the cache, until the buffer ran out and was replaced.
            self.tail.clear();
            let room = self.tail.capacity();
            let _ = self.tail.try_reclaim(room + 1);
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for chunk in self
            .chunks
            .iter()
            .map(|c| &c[..])
            .chain(Some(&self.tail[..]))
        {
            if n == dst.len() {
                break;
            }
            if !chunk.is_empty() {
                dst[n] = IoSlice::new(chunk);
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    #[test]
    fn keeps_order_across_chunks_and_tail() {
        let mut out = Outgoing::default();
        out.tail().put_slice(b"ab");
        out.commit_tail(2);
        out.push_chunk(Bytes::from_static(b"cdef"));
        out.tail().put_slice(b"gh");
        out.commit_tail(2);
        assert_eq!(out.len(), 8);
        let mut slices = [IoSlice::new(&[]); 8];
        let n = out.chunks_vectored(&mut slices);
        let joined: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
        assert_eq!(joined, b"abcdefgh");
        out.advance(3);
        assert_eq!(out.chunk(), b"def");
        out.advance(5);
        assert!(out.is_empty());
    }

    /// Written out, the tail is reused from the start of its memory: its
    /// whole capacity is there again, at the same address.
    #[test]
    fn an_emptied_tail_starts_over_at_its_start() {
        let mut out = Outgoing::default();
        out.provide_buffer(BytesMut::with_capacity(4096));
        let start = out.tail().as_ptr();
        for _ in 0..3 {
            out.tail().put_slice(&[7u8; 1000]);
            out.commit_tail(1000);
            out.advance(600);
            out.advance(400);
            assert!(out.is_empty());
            assert_eq!(out.tail().as_ptr(), start);
            assert!(out.tail().capacity() >= 4096);
        }
        // Shared with a sealed chunk while it was written: the same.
        out.tail().put_slice(b"head");
        out.commit_tail(4);
        out.push_chunk(Bytes::from(vec![1u8; 2000]));
        out.advance(2004);
        assert_eq!(out.tail().as_ptr(), start);
    }
}
