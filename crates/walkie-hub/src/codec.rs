//! How engines store a publication as bytes (the durable engine's values,
//! Redis stream entries and pub/sub messages).

use bytes::Bytes;

use crate::engine::EngineError;
use crate::publication::{Kind, Publication};

/// Layout: flags (bits 0-2 the kind, bit 3 keyed, bit 4 with info), time
/// (u64 LE), then if keyed the key's length (u16 LE) and the key, then if
/// with info its length (u32 LE) and the info, then the data.
pub(crate) fn encode(p: &Publication) -> Vec<u8> {
    let key = p.key.as_deref().unwrap_or("");
    let info = p.info.as_deref().unwrap_or(&[]);
    let mut v = Vec::with_capacity(15 + key.len() + info.len() + p.data.len());
    v.push(p.kind.to_u8() | (u8::from(p.key.is_some()) << 3) | (u8::from(p.info.is_some()) << 4));
    v.extend_from_slice(&p.time_ms.to_le_bytes());
    if p.key.is_some() {
        // Keys are short: the hub refuses longer ones.
        let len = u16::try_from(key.len()).unwrap_or(u16::MAX);
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&key.as_bytes()[..usize::from(len)]);
    }
    if p.info.is_some() {
        let len = u32::try_from(info.len()).unwrap_or(u32::MAX);
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&info[..len as usize]);
    }
    v.extend_from_slice(&p.data);
    v
}

pub(crate) fn decode(offset: u64, b: &[u8]) -> Result<Publication, EngineError> {
    let corrupt = || EngineError::Storage("corrupt publication".into());
    let (&flags, rest) = b.split_first().ok_or_else(corrupt)?;
    let kind = Kind::from_u8(flags & 7).ok_or_else(corrupt)?;
    let time = rest.get(..8).ok_or_else(corrupt)?;
    let mut rest = &rest[8..];
    let key = if flags & 8 != 0 {
        let len = rest.get(..2).ok_or_else(corrupt)?;
        let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
        let key = rest.get(2..2 + len).ok_or_else(corrupt)?;
        rest = &rest[2 + len..];
        Some(std::str::from_utf8(key).map_err(|_| corrupt())?.into())
    } else {
        None
    };
    let info = if flags & 16 != 0 {
        let len = rest.get(..4).ok_or_else(corrupt)?;
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let info = rest.get(4..4 + len).ok_or_else(corrupt)?;
        rest = &rest[4 + len..];
        Some(Bytes::copy_from_slice(info))
    } else {
        None
    };
    Ok(Publication {
        offset,
        data: Bytes::copy_from_slice(rest),
        kind,
        info,
        time_ms: u64::from_le_bytes(time.try_into().map_err(|_| corrupt())?),
        key,
    })
}
