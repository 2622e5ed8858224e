//! Payload masking (RFC 6455 section 5.3).
//!
//! Masking XORs every payload byte with one byte of a 4-byte key, cycling
//! through the key. It is on the hot path of every client-to-server frame, so
//! the bulk of the buffer is processed a machine word at a time; LLVM turns the
//! 8-byte loop into SIMD on targets that have it.

/// XORs `buf` in place with `key`, as if `buf` started `offset` bytes into the
/// frame's payload. Applying the same call twice restores the input.
///
/// `offset` lets a decoder unmask a payload in pieces as they arrive.
///
/// ```
/// let mut data = *b"hello";
/// walkie_proto::apply_mask(&mut data, [1, 2, 3, 4], 0);
/// walkie_proto::apply_mask(&mut data, [1, 2, 3, 4], 0);
/// assert_eq!(&data, b"hello");
/// ```
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], offset: usize) {
    if key == [0; 4] {
        return;
    }
    // Rotate the key so that index 0 of `buf` lines up with key[offset % 4].
    let mut key = key;
    key.rotate_left(offset % 4);

    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    // Every full chunk consumed a multiple of 4 key bytes, so the tail starts
    // at key[0] again.
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= key[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(buf: &mut [u8], key: [u8; 4], offset: usize) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= key[(i + offset) % 4];
        }
    }

    #[test]
    fn matches_the_byte_by_byte_definition() {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        for len in 0..70 {
            for offset in 0..8 {
                let src: Vec<u8> = (0..len as u8).collect();
                let mut a = src.clone();
                let mut b = src.clone();
                apply_mask(&mut a, key, offset);
                naive(&mut b, key, offset);
                assert_eq!(a, b, "len {len} offset {offset}");
            }
        }
    }

    #[test]
    fn rfc_example_hello() {
        // RFC 6455 section 5.7: "Hello" masked with 37 fa 21 3d.
        let mut data = *b"Hello";
        apply_mask(&mut data, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(data, [0x7f, 0x9f, 0x4d, 0x51, 0x58]);
    }

    #[test]
    fn piecewise_equals_whole() {
        let key = [9, 8, 7, 6];
        let src: Vec<u8> = (0..100).collect();
        let mut whole = src.clone();
        apply_mask(&mut whole, key, 0);
        let mut parts = src.clone();
        let (a, b) = parts.split_at_mut(13);
        apply_mask(a, key, 0);
        apply_mask(b, key, 13);
        assert_eq!(whole, parts);
    }
}
