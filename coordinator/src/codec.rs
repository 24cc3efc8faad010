//! How commands and snapshots are laid out in bytes: one format byte, then
//! postcard. The log outlives binaries, so a change of layout gets a new format
//! byte and a decoder for the old one; never an in-place change.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Commands, and snapshots written before cluster ids existed.
pub const FORMAT_V1: u8 = 1;
/// Snapshots carrying the cluster id.
pub const FORMAT_V2: u8 = 2;
/// Snapshots whose transactions carry repair records.
pub const FORMAT_V3: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("empty record")]
    Empty,
    #[error("unknown record format {0}; this binary reads formats {FORMAT_V1} to {FORMAT_V3}")]
    UnknownFormat(u8),
    #[error("corrupt record: {0}")]
    Corrupt(#[from] postcard::Error),
}

pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    encode_as(FORMAT_V1, value)
}

/// Encodes `value` under an explicit format byte (a layout that changed
/// gets a new one; see [`decode_any`]).
pub fn encode_as<T: Serialize + ?Sized>(format: u8, value: &T) -> Vec<u8> {
    encode_sized(format, value, 0)
}

/// [`encode_as`] into a buffer that starts with room for `capacity_hint`
/// bytes: for a large record whose size is roughly known (a snapshot), so
/// that the buffer is not grown, copied and faulted in again and again.
/// Room reserved and not written costs address space, not memory.
pub fn encode_sized<T: Serialize + ?Sized>(format: u8, value: &T, capacity_hint: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity_hint.max(1));
    out.push(format);
    append(value, &mut out);
    out
}

/// Appends `value`'s body (no format byte) to `out`: a part of a record
/// written piece by piece (a snapshot's head, each of its transactions).
pub fn append<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    // Serializing plain data into a Vec cannot fail.
    postcard::to_io(value, out).expect("postcard serialization into memory");
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    match bytes.split_first() {
        None => Err(DecodeError::Empty),
        Some((&FORMAT_V1, rest)) => Ok(postcard::from_bytes(rest)?),
        Some((&other, _)) => Err(DecodeError::UnknownFormat(other)),
    }
}

/// A record's format byte and body, for a reader that knows several layouts.
pub fn decode_any(bytes: &[u8]) -> Result<(u8, &[u8]), DecodeError> {
    match bytes.split_first() {
        None => Err(DecodeError::Empty),
        Some((&format @ (FORMAT_V1 | FORMAT_V2 | FORMAT_V3), rest)) => Ok((format, rest)),
        Some((&other, _)) => Err(DecodeError::UnknownFormat(other)),
    }
}

/// Decodes a body returned by [`decode_any`].
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    Ok(postcard::from_bytes(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::command::Command;

    #[test]
    fn commands_round_trip_and_unknown_formats_are_refused() {
        let command = Command::Gc {
            gids: vec!["a".into(), "b".into()],
        };
        let bytes = encode(&command);
        assert_eq!(decode::<Command>(&bytes).unwrap(), command);
        let mut future = bytes.clone();
        future[0] = 9;
        assert!(matches!(
            decode::<Command>(&future),
            Err(DecodeError::UnknownFormat(9))
        ));
        assert!(matches!(decode::<Command>(&[]), Err(DecodeError::Empty)));
    }
}
