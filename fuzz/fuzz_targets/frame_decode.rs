//! Arbitrary bytes into `FrameHeader::parse`; a parsed header must re-encode
//! (shortest length form) to bytes that parse back to the same header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walkie_proto::FrameHeader;
use walkie_proto::frame::MAX_HEADER_LEN;

fuzz_target!(|data: &[u8]| {
    match FrameHeader::parse(data) {
        Ok(Some((header, len))) => {
            assert!((2..=MAX_HEADER_LEN).contains(&len), "header length {len}");
            assert!(len <= data.len());
            if header.opcode.is_control() {
                assert!(header.fin && header.payload_len <= 125, "{header:?}");
            }
            assert_eq!(header.payload_len >> 63, 0);

            let mut buf = Vec::new();
            header.encode(&mut buf);
            assert_eq!(buf.len(), header.encoded_len());
            // The encoder may use a shorter length form than the input did.
            assert!(buf.len() <= len, "re-encoded {} > parsed {len}", buf.len());
            let (again, again_len) = FrameHeader::parse(&buf)
                .expect("a re-encoded header must parse")
                .expect("a re-encoded header must be complete");
            assert_eq!(again, header);
            assert_eq!(again_len, buf.len());
            // Every strict prefix of a valid header is incomplete, not an error.
            for cut in 0..buf.len() {
                assert_eq!(FrameHeader::parse(&buf[..cut]), Ok(None), "cut {cut}");
            }
            // Trailing payload bytes do not change the header.
            assert_eq!(FrameHeader::parse(&data[..len]), Ok(Some((header, len))));
        }
        // 14 bytes always hold a whole header.
        Ok(None) => assert!(data.len() < MAX_HEADER_LEN),
        Err(_) => {}
    }
});
