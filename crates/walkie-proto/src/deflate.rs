//! permessage-deflate (RFC 7692): negotiation and the per-message codec.
//!
//! Compression runs on `flate2` with the pure-Rust `zlib-rs` backend, which
//! supports raw deflate with a chosen window size. Two zlib limits shape the
//! negotiation:
//!
//! * zlib cannot compress with an 8-bit window. When a peer limits our window
//!   to 8 bits we send stored (uncompressed) deflate blocks, which contain no
//!   back-references and so are valid for any window.
//! * The inflater always uses a 15-bit window, which decodes a stream made
//!   with any smaller window.

use bytes::{BufMut, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::extension::Extension;
use crate::handshake::HandshakeError;

/// The extension's registered name.
pub const EXTENSION_NAME: &str = "permessage-deflate";

/// The four bytes a sync flush ends with; stripped on send and appended before
/// inflating (RFC 7692 section 7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// What to offer (as a client) or accept (as a server).
///
/// ```
/// let mut deflate = walkie_proto::DeflateConfig::default();
/// deflate.server_no_context_takeover = true; // memory over ratio
/// deflate.validate().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeflateConfig {
    /// zlib compression level, 0 (none) to 9 (best). Default: 1, zlib-rs's
    /// "quick" strategy: compressing a 32-byte message with context takeover
    /// takes about 0.1 us at level 1 against 1.7 us at level 6 (see
    /// `cargo bench -p walkie-proto deflate`), which matters more to a
    /// real-time server than the last few percent of ratio. Raise it for
    /// bulky, repetitive messages on slow links.
    pub level: u32,
    /// The server resets its compression context after every message, so it
    /// keeps no window between messages. A server with this set always
    /// announces it; a client with it set asks for it. Default: false.
    pub server_no_context_takeover: bool,
    /// The client resets its compression context after every message. A client
    /// with this set announces it; a server with it set requires it.
    /// Default: false.
    pub client_no_context_takeover: bool,
    /// Largest LZ77 window the server compresses with, as a power of two,
    /// 8 to 15. Default: 15.
    pub server_max_window_bits: u8,
    /// Largest LZ77 window the client compresses with, as a power of two,
    /// 8 to 15. Default: 15.
    pub client_max_window_bits: u8,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        DeflateConfig {
            level: 1,
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
        }
    }
}

impl DeflateConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        use crate::config::ConfigError;
        if self.level > 9 {
            return Err(ConfigError {
                field: "level",
                reason: "must be 0 to 9",
            });
        }
        for (field, bits) in [
            ("server_max_window_bits", self.server_max_window_bits),
            ("client_max_window_bits", self.client_max_window_bits),
        ] {
            if !(8..=15).contains(&bits) {
                return Err(ConfigError {
                    field,
                    reason: "must be 8 to 15",
                });
            }
        }
        Ok(())
    }

    /// The `Sec-WebSocket-Extensions` value a client offers.
    pub fn client_offer(&self) -> String {
        let mut offer = String::from(EXTENSION_NAME);
        if self.server_no_context_takeover {
            offer.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            offer.push_str("; client_no_context_takeover");
        }
        if self.server_max_window_bits < 15 {
            offer.push_str(&format!(
                "; server_max_window_bits={}",
                self.server_max_window_bits
            ));
        }
        // Always tell the server it may limit our window.
        if self.client_max_window_bits < 15 {
            offer.push_str(&format!(
                "; client_max_window_bits={}",
                self.client_max_window_bits
            ));
        } else {
            offer.push_str("; client_max_window_bits");
        }
        offer
    }

    /// Server side: picks the first acceptable permessage-deflate offer among
    /// `offers` and returns the negotiated parameters. Offers with unknown,
    /// repeated or out-of-range parameters are declined (section 7.1), and
    /// `None` means no offer was acceptable: the connection goes on without
    /// compression.
    pub fn accept_offer(&self, offers: &[Extension]) -> Option<DeflateParams> {
        offers
            .iter()
            .filter(|e| e.name == EXTENSION_NAME)
            .find_map(|offer| self.accept_one(offer))
    }

    fn accept_one(&self, offer: &Extension) -> Option<DeflateParams> {
        let p = OfferParams::parse(offer)?;
        let server_bits = match p.server_max_window_bits {
            Some(Some(requested)) => requested.min(self.server_max_window_bits),
            Some(None) => return None, // the value is required in an offer
            None => self.server_max_window_bits,
        };
        let client_bits = match p.client_max_window_bits {
            // The client accepts a limit: impose ours, within its own.
            Some(own) => own.unwrap_or(15).min(self.client_max_window_bits),
            // It did not: we must not send the parameter, it uses 15.
            None => 15,
        };
        Some(DeflateParams {
            server_no_context_takeover: p.server_no_context_takeover
                || self.server_no_context_takeover,
            client_no_context_takeover: p.client_no_context_takeover
                || self.client_no_context_takeover,
            server_max_window_bits: server_bits,
            client_max_window_bits: client_bits,
        })
    }

    /// Client side: checks the server's response against what we offered.
    pub fn accept_response(&self, response: &Extension) -> Result<DeflateParams, HandshakeError> {
        let bad = || HandshakeError::InvalidExtensionResponse;
        let p = OfferParams::parse(response).ok_or_else(bad)?;
        let server_bits = match p.server_max_window_bits {
            Some(Some(bits)) if bits <= self.server_max_window_bits => bits,
            Some(_) => return Err(bad()),
            // We asked for a limit; the server must confirm it.
            None if self.server_max_window_bits < 15 => return Err(bad()),
            None => 15,
        };
        let client_bits = match p.client_max_window_bits {
            Some(Some(bits)) if bits <= self.client_max_window_bits => bits,
            Some(_) => return Err(bad()),
            None => self.client_max_window_bits,
        };
        if self.server_no_context_takeover && !p.server_no_context_takeover {
            return Err(bad());
        }
        Ok(DeflateParams {
            server_no_context_takeover: p.server_no_context_takeover,
            client_no_context_takeover: p.client_no_context_takeover
                || self.client_no_context_takeover,
            server_max_window_bits: server_bits,
            client_max_window_bits: client_bits,
        })
    }
}

/// The parameters of one offer or response, each at most once.
#[derive(Default)]
struct OfferParams {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    /// `Some(None)`: present without a value.
    server_max_window_bits: Option<Option<u8>>,
    client_max_window_bits: Option<Option<u8>>,
}

impl OfferParams {
    fn parse(ext: &Extension) -> Option<OfferParams> {
        let mut p = OfferParams::default();
        for (key, value) in &ext.params {
            let bits = match value {
                None => None,
                // Section 7.1.2: a decimal 8-15, no leading zeros.
                Some(v) if v.len() <= 2 && !v.starts_with('0') => match v.parse::<u8>() {
                    Ok(b @ 8..=15) => Some(b),
                    _ => return None,
                },
                Some(_) => return None,
            };
            match key.as_str() {
                "server_no_context_takeover" if value.is_none() => {
                    if std::mem::replace(&mut p.server_no_context_takeover, true) {
                        return None;
                    }
                }
                "client_no_context_takeover" if value.is_none() => {
                    if std::mem::replace(&mut p.client_no_context_takeover, true) {
                        return None;
                    }
                }
                "server_max_window_bits" => {
                    if p.server_max_window_bits.replace(bits).is_some() {
                        return None;
                    }
                }
                "client_max_window_bits" => {
                    if p.client_max_window_bits.replace(bits).is_some() {
                        return None;
                    }
                }
                _ => return None,
            }
        }
        Some(p)
    }
}

/// The negotiated parameters, identical on both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateParams {
    /// The server resets its compressor after each message.
    pub server_no_context_takeover: bool,
    /// The client resets its compressor after each message.
    pub client_no_context_takeover: bool,
    /// The server's compression window, in bits.
    pub server_max_window_bits: u8,
    /// The client's compression window, in bits.
    pub client_max_window_bits: u8,
}

impl DeflateParams {
    /// The `Sec-WebSocket-Extensions` value a server sends to accept.
    /// `client_max_window_bits` appears only below 15, which
    /// [`DeflateConfig::accept_offer`] leaves at 15 unless the client offered it.
    pub fn response_header(&self) -> String {
        let mut v = String::from(EXTENSION_NAME);
        if self.server_no_context_takeover {
            v.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            v.push_str("; client_no_context_takeover");
        }
        if self.server_max_window_bits < 15 {
            v.push_str(&format!(
                "; server_max_window_bits={}",
                self.server_max_window_bits
            ));
        }
        if self.client_max_window_bits < 15 {
            v.push_str(&format!(
                "; client_max_window_bits={}",
                self.client_max_window_bits
            ));
        }
        v
    }
}

/// Compresses outgoing messages for one connection.
pub struct Deflater {
    compress: Compress,
    reset_each_message: bool,
    /// Tests: make the next `compress` fail.
    #[cfg(test)]
    pub(crate) fail_next: bool,
}

impl std::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deflater")
            .field("reset_each_message", &self.reset_each_message)
            .finish_non_exhaustive()
    }
}

impl Deflater {
    /// A compressor with an LZ77 window of `window_bits` (8 to 15).
    pub fn new(level: u32, window_bits: u8, reset_each_message: bool) -> Self {
        // zlib has no 8-bit window: stored blocks are valid for any window.
        let (level, bits) = if window_bits <= 8 {
            (0, 9)
        } else {
            (level.min(9), window_bits.min(15))
        };
        Deflater {
            compress: Compress::new_with_window_bits(Compression::new(level), false, bits),
            reset_each_message,
            #[cfg(test)]
            fail_next: false,
        }
    }

    /// Compresses one whole message, appending the payload (without the
    /// trailing `00 00 ff ff`) to `dst`.
    pub fn compress(&mut self, input: &[u8], dst: &mut BytesMut) -> Result<(), DeflateError> {
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next) {
            return Err(DeflateError);
        }
        let start = dst.len();
        let mut input = input;
        loop {
            dst.reserve(input.len() / 2 + 64);
            let before = self.compress.total_in();
            compress_into(&mut self.compress, input, dst, FlushCompress::Sync)?;
            input = &input[(self.compress.total_in() - before) as usize..];
            // A sync flush is done when all input is consumed and zlib left
            // room in the output (it stops only when out of space otherwise).
            if input.is_empty() && dst.len() < dst.capacity() {
                break;
            }
        }
        if dst.len() == start {
            // Nothing to flush (an empty message after a previous flush):
            // send one empty stored block header (section 7.2.3.6).
            dst.put_u8(0x00);
        } else if dst.len() - start >= 4 && dst[dst.len() - 4..] == TAIL {
            dst.truncate(dst.len() - 4);
        } else {
            return Err(DeflateError);
        }
        if self.reset_each_message {
            self.compress.reset();
        }
        Ok(())
    }
}

/// Runs one compress call writing into the spare capacity of `dst`.
fn compress_into(
    c: &mut Compress,
    input: &[u8],
    dst: &mut BytesMut,
    flush: FlushCompress,
) -> Result<(), DeflateError> {
    let out = dst.spare_capacity_mut();
    let before = c.total_out();
    c.compress_uninit(input, out, flush)
        .map_err(|_| DeflateError)?;
    let written = (c.total_out() - before) as usize;
    // SAFETY: the first `written` bytes of the spare capacity were written.
    unsafe { dst.advance_mut(written) };
    Ok(())
}

/// Inflates incoming messages for one connection.
pub struct Inflater {
    decompress: Decompress,
    /// The peer's deflate stream ended (a block with BFINAL set) inside the
    /// message in progress: the rest of that message is ignored, and the
    /// next message starts a new stream.
    ended: bool,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Default for Inflater {
    fn default() -> Self {
        Self::new()
    }
}

/// Inflating or deflating failed: the data is not valid deflate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid deflate data")]
pub struct DeflateError;

/// Why inflating a fragment stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// The data is not valid deflate.
    Invalid,
    /// The output would exceed the limit given.
    TooLarge,
}

impl Inflater {
    /// An inflater with a 15-bit window, able to decode any peer's stream.
    pub fn new() -> Self {
        Inflater {
            decompress: Decompress::new_with_window_bits(false, 15),
            ended: false,
        }
    }

    /// Inflates one fragment of a compressed message, appending to `dst`.
    /// Pass `last` for the final fragment, so the sync-flush tail is added.
    ///
    /// A peer may end its deflate stream inside a message, with a block
    /// that has BFINAL set (RFC 7692 section 7.2.3.4): whatever follows in
    /// that message, the tail included, is then ignored, and the next
    /// message starts a new stream (with context takeover too: the ended
    /// stream's window is gone).
    ///
    /// `dst` never grows past `limit` bytes: a decompression bomb fails with
    /// [`InflateError::TooLarge`] after at most `limit` bytes of output.
    pub fn inflate(
        &mut self,
        input: &[u8],
        last: bool,
        dst: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), InflateError> {
        if !self.ended {
            self.inflate_part(input, dst, limit)?;
        }
        if last {
            if !self.ended {
                self.inflate_part(&TAIL, dst, limit)?;
            }
            if std::mem::take(&mut self.ended) {
                self.decompress.reset(false);
            }
        }
        Ok(())
    }

    fn inflate_part(
        &mut self,
        mut input: &[u8],
        dst: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), InflateError> {
        loop {
            // Room for one byte past the limit, so crossing it is detected
            // instead of stalling; growth doubles but never passes limit + 1.
            let allowed = limit.saturating_add(1).saturating_sub(dst.len());
            if allowed == 0 {
                return Err(InflateError::TooLarge);
            }
            let chunk = dst.len().max(4096).min(allowed);
            dst.reserve_exact(chunk);
            let len = dst.len();
            let out = &mut dst.spare_capacity_mut()[..chunk];
            let (before_in, before_out) = (self.decompress.total_in(), self.decompress.total_out());
            let status = self
                .decompress
                .decompress_uninit(input, out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Invalid)?;
            let consumed = (self.decompress.total_in() - before_in) as usize;
            let written = (self.decompress.total_out() - before_out) as usize;
            // SAFETY: zlib initialised the `written` (<= chunk) bytes after `len`.
            unsafe { dst.set_len(len + written) };
            input = &input[consumed..];
            if dst.len() > limit {
                return Err(InflateError::TooLarge);
            }
            if status == Status::StreamEnd {
                // The peer ended the deflate stream (BFINAL): the rest of the
                // message is ignored; `inflate` resets at its end.
                self.ended = true;
                return Ok(());
            }
            if written < chunk {
                // Output not full: zlib took all the input it could.
                if input.is_empty() {
                    return Ok(());
                }
                if consumed == 0 {
                    return Err(InflateError::Invalid);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extension::parse_extensions;

    fn offer(s: &str) -> Vec<Extension> {
        parse_extensions(s).unwrap()
    }

    #[test]
    fn round_trip_with_and_without_context() {
        for reset in [false, true] {
            for bits in [8, 9, 12, 15] {
                let mut d = Deflater::new(6, bits, reset);
                let mut i = Inflater::new();
                for msg in ["hello hello hello hello", "", "hello again hello", "x"] {
                    let mut wire = BytesMut::new();
                    d.compress(msg.as_bytes(), &mut wire).unwrap();
                    let mut out = Vec::new();
                    i.inflate(&wire, true, &mut out, 1 << 20).unwrap();
                    assert_eq!(out, msg.as_bytes(), "bits {bits} reset {reset}");
                }
            }
        }
    }

    // RFC 7692 section 7.2.3.1: "Hello" compressed.
    #[test]
    fn rfc_example_hello() {
        let mut i = Inflater::new();
        let mut out = Vec::new();
        i.inflate(
            &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00],
            true,
            &mut out,
            100,
        )
        .unwrap();
        assert_eq!(out, b"Hello");
    }

    // RFC 7692 section 7.2.3.4: "Hello" in a block with BFINAL set, then
    // the byte that lets the tail be appended. Each message ends the
    // stream: what follows it in the message is ignored, the tail included.
    #[test]
    fn rfc_example_bfinal_twice() {
        const HELLO_BFINAL: &[u8] = &[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00];
        let mut i = Inflater::new();
        for _ in 0..3 {
            let mut out = Vec::new();
            i.inflate(HELLO_BFINAL, true, &mut out, 100).unwrap();
            assert_eq!(out, b"Hello");
        }
        // Ended in a first fragment: the next fragments are ignored.
        let mut out = Vec::new();
        i.inflate(HELLO_BFINAL, false, &mut out, 100).unwrap();
        i.inflate(&[0xff, 0xff], false, &mut out, 100).unwrap();
        i.inflate(&[0xff], true, &mut out, 100).unwrap();
        assert_eq!(out, b"Hello");
        // A message with the usual sync flush follows.
        let mut d = Deflater::new(6, 15, false);
        let mut wire = BytesMut::new();
        d.compress(b"after", &mut wire).unwrap();
        let mut out = Vec::new();
        i.inflate(&wire, true, &mut out, 100).unwrap();
        assert_eq!(out, b"after");
    }

    #[test]
    fn bomb_stops_at_the_limit() {
        let mut d = Deflater::new(9, 15, false);
        let zeros = vec![0u8; 10 << 20];
        let mut wire = BytesMut::new();
        d.compress(&zeros, &mut wire).unwrap();
        assert!(wire.len() < 20_000);
        let mut i = Inflater::new();
        let mut out = Vec::new();
        assert_eq!(
            i.inflate(&wire, true, &mut out, 1 << 20),
            Err(InflateError::TooLarge)
        );
        assert!(out.capacity() <= (1 << 20) + 8192, "{}", out.capacity());
    }

    #[test]
    fn garbage_is_invalid() {
        let mut i = Inflater::new();
        let mut out = Vec::new();
        assert_eq!(
            i.inflate(&[0xff, 0xff, 0xff, 0xff], true, &mut out, 1000),
            Err(InflateError::Invalid)
        );
    }

    // RFC 7692 section 7.1: negotiation.
    #[test]
    fn server_accepts_first_valid_offer() {
        let cfg = DeflateConfig::default();
        let params = cfg
            .accept_offer(&offer(
                "permessage-deflate; foo, permessage-deflate; server_max_window_bits=10; client_max_window_bits",
            ))
            .unwrap();
        assert_eq!(params.server_max_window_bits, 10);
        assert_eq!(params.client_max_window_bits, 15);
        assert_eq!(
            params.response_header(),
            "permessage-deflate; server_max_window_bits=10"
        );
    }

    #[test]
    fn server_declines_bad_offers() {
        let cfg = DeflateConfig::default();
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=abc",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_no_context_takeover=1",
            "x-webkit-deflate-frame",
        ] {
            assert_eq!(cfg.accept_offer(&offer(bad)), None, "{bad}");
        }
    }

    #[test]
    fn server_imposes_its_settings() {
        let cfg = DeflateConfig {
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            client_max_window_bits: 10,
            ..DeflateConfig::default()
        };
        let p = cfg
            .accept_offer(&offer("permessage-deflate; client_max_window_bits"))
            .unwrap();
        assert_eq!(
            p.response_header(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; client_max_window_bits=10"
        );
        // Without client_max_window_bits in the offer, it must not appear.
        let p = cfg.accept_offer(&offer("permessage-deflate")).unwrap();
        assert_eq!(p.client_max_window_bits, 15);
    }

    #[test]
    fn client_checks_the_response() {
        let cfg = DeflateConfig {
            server_max_window_bits: 10,
            ..DeflateConfig::default()
        };
        let ok = &offer("permessage-deflate; server_max_window_bits=9")[0];
        assert_eq!(cfg.accept_response(ok).unwrap().server_max_window_bits, 9);
        for bad in [
            "permessage-deflate",
            "permessage-deflate; server_max_window_bits=12",
            "permessage-deflate; x=1",
        ] {
            assert!(cfg.accept_response(&offer(bad)[0]).is_err(), "{bad}");
        }
    }
}
