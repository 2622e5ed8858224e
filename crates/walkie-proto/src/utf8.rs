//! Incremental UTF-8 validation (RFC 6455 section 8.1).
//!
//! A text message may arrive in many fragments, and a fragment in many reads.
//! The validator is fed each piece as it arrives and fails on the first byte
//! that can never start or continue a valid sequence, so a connection sending
//! garbage is failed at once rather than after the whole message.

use std::str;

/// Validates a stream of bytes as UTF-8, piece by piece.
///
/// At most three bytes of an incomplete code point are carried from one piece
/// to the next; everything else is checked in bulk with SIMD (`simdutf8`).
#[derive(Debug, Default, Clone)]
pub struct Utf8Validator {
    carry: [u8; 4],
    carry_len: u8,
}

/// The bytes fed so far can never be valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

/// Length of the sequence introduced by a lead byte (0 for a byte that cannot
/// lead one).
fn sequence_len(lead: u8) -> usize {
    match lead {
        0x00..=0x7f => 1,
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => 0,
    }
}

impl Utf8Validator {
    /// A validator with nothing fed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the bytes fed so far end on a code point boundary.
    pub fn is_complete(&self) -> bool {
        self.carry_len == 0
    }

    /// Forgets everything fed so far.
    pub fn reset(&mut self) {
        self.carry_len = 0;
    }

    /// Feeds the next piece. Fails as soon as the stream cannot be valid,
    /// even if the piece ends in the middle of a code point.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<(), InvalidUtf8> {
        if self.carry_len > 0 {
            let have = self.carry_len as usize;
            let need = sequence_len(self.carry[0]);
            let take = (need - have).min(input.len());
            self.carry[have..have + take].copy_from_slice(&input[..take]);
            let filled = have + take;
            input = &input[take..];
            match str::from_utf8(&self.carry[..filled]) {
                Ok(_) => self.carry_len = 0,
                Err(e) if e.error_len().is_none() => {
                    // Still a valid prefix; wait for more.
                    self.carry_len = filled as u8;
                    return Ok(());
                }
                Err(_) => return Err(InvalidUtf8),
            }
        }
        match simdutf8::compat::from_utf8(input) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let tail = &input[e.valid_up_to()..];
                self.carry[..tail.len()].copy_from_slice(tail);
                self.carry_len = tail.len() as u8;
                Ok(())
            }
            Err(_) => Err(InvalidUtf8),
        }
    }

    /// Ends the stream: fails if it stops in the middle of a code point.
    pub fn finish(&mut self) -> Result<(), InvalidUtf8> {
        let complete = self.is_complete();
        self.reset();
        if complete { Ok(()) } else { Err(InvalidUtf8) }
    }
}

/// Validates a whole buffer at once (the common case of a single-frame text
/// message).
pub fn validate(input: &[u8]) -> Result<(), InvalidUtf8> {
    simdutf8::basic::from_utf8(input)
        .map(|_| ())
        .map_err(|_| InvalidUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_split(bytes: &[u8], at: &[usize]) -> Result<(), InvalidUtf8> {
        let mut v = Utf8Validator::new();
        let mut last = 0;
        for &i in at {
            v.feed(&bytes[last..i])?;
            last = i;
        }
        v.feed(&bytes[last..])?;
        v.finish()
    }

    #[test]
    fn valid_text_split_anywhere() {
        let text = "κόσμε, héllo wörld, 𝄞 music, 中文".as_bytes();
        for i in 0..=text.len() {
            for j in i..=text.len() {
                assert_eq!(feed_split(text, &[i, j]), Ok(()), "split at {i},{j}");
            }
        }
    }

    #[test]
    fn fails_on_the_first_impossible_byte() {
        // 0xF4 0x90 would be above U+10FFFF: invalid before the sequence ends.
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(b"ok \xf4"), Ok(()));
        assert_eq!(v.feed(b"\x90"), Err(InvalidUtf8));

        // Overlong encoding of '/', caught at the lead byte.
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(b"\xc0"), Err(InvalidUtf8));

        // UTF-16 surrogate half, caught at the second byte.
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(b"\xed\xa0"), Err(InvalidUtf8));
    }

    #[test]
    fn incomplete_at_end_fails_on_finish() {
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed("€".as_bytes().get(..2).unwrap_or_default()), Ok(()));
        assert!(!v.is_complete());
        assert_eq!(v.finish(), Err(InvalidUtf8));
    }

    #[test]
    fn carry_completed_one_byte_at_a_time() {
        let bytes = "𝄞".as_bytes();
        let mut v = Utf8Validator::new();
        for b in bytes {
            assert_eq!(v.feed(std::slice::from_ref(b)), Ok(()));
        }
        assert_eq!(v.finish(), Ok(()));
    }

    #[test]
    fn agrees_with_std_on_arbitrary_bytes() {
        // A deterministic sweep over short byte strings with every split.
        let samples: [&[u8]; 6] = [
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
            b"\xf0\x90\x80\x80",
            b"\xf8\x88\x80\x80\x80",
            b"\xe0\x80\xaf",
            b"\xef\xbf\xbf",
            b"abc\xff",
        ];
        for s in samples {
            let expected = std::str::from_utf8(s).is_ok();
            for i in 0..=s.len() {
                assert_eq!(feed_split(s, &[i]).is_ok(), expected, "{s:?} split {i}");
            }
        }
    }
}
