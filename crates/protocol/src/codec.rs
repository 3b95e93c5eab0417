//! Frame encoding: JSON text frames and binary frames `[stream id: u64 BE][bytes]`.
//!
//! Decoding never panics: malformed JSON, a known `type` with bad fields, an unknown `type` and a short
//! binary frame each give their own [`ProtocolError`], so a receiver can answer `unsupported` to a newer
//! peer and drop garbage without tearing the session down.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::ProtocolError;

/// One received data frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A JSON message, still encoded.
    Text(String),
    /// Bulk bytes for a stream, kept as the whole frame (see [`Chunk`]).
    Binary(Chunk),
}

/// A binary frame kept whole: `[stream: u64 BE][payload]`. Forwarding one (the hub relaying file data), or
/// sending one whose buffer was filled in place ([`Chunk::room`]), costs no copy of the payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk(Bytes);

impl Chunk {
    /// Bytes before the payload.
    pub const HEADER: usize = 8;

    /// A chunk holding a copy of `payload`.
    pub fn new(stream: u64, payload: &[u8]) -> Chunk {
        Chunk(encode_binary(stream, payload))
    }

    /// A received frame; an error if it is too short to hold a stream id.
    pub fn from_frame(frame: Bytes) -> Result<Chunk, ProtocolError> {
        if frame.len() < Self::HEADER {
            return Err(ProtocolError::ShortBinary(frame.len()));
        }
        Ok(Chunk(frame))
    }

    /// An empty buffer for a payload of up to `capacity` bytes, with room for the header in front: append
    /// the payload, then make it a chunk with [`Chunk::filled`].
    pub fn room(capacity: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::HEADER + capacity);
        v.extend_from_slice(&[0; Self::HEADER]);
        v
    }

    /// A chunk from a buffer made by [`Chunk::room`] (stream 0 until it is addressed).
    pub fn filled(buf: Vec<u8>) -> Chunk {
        debug_assert!(buf.len() >= Self::HEADER);
        Chunk(Bytes::from(buf))
    }

    pub fn stream(&self) -> u64 {
        u64::from_be_bytes(self.0[..Self::HEADER].try_into().expect("length checked"))
    }

    pub fn payload(&self) -> &[u8] {
        &self.0[Self::HEADER..]
    }

    /// The payload as its own `Bytes` (shares the buffer).
    pub fn data(&self) -> Bytes {
        self.0.slice(Self::HEADER..)
    }

    /// The chunk on `stream` (see [`Chunk::into_frame`]).
    pub fn addressed(self, stream: u64) -> Chunk {
        Chunk(self.into_frame(stream))
    }

    /// The frame addressed to `stream`: as it is when it already is, rewritten in place when the buffer is
    /// not shared, copied otherwise.
    pub fn into_frame(self, stream: u64) -> Bytes {
        if self.stream() == stream {
            return self.0;
        }
        match self.0.try_into_mut() {
            Ok(mut m) => {
                m[..Self::HEADER].copy_from_slice(&stream.to_be_bytes());
                m.freeze()
            }
            Err(shared) => encode_binary(stream, &shared[Self::HEADER..]),
        }
    }
}

/// Encodes a message as a JSON text frame.
pub fn encode_text<T: Serialize>(msg: &T) -> String {
    // Our message types contain only strings, numbers, maps and sequences: serialization cannot fail.
    serde_json::to_string(msg).expect("protocol messages always serialize")
}

/// Decodes a JSON text frame into `T`, telling an unknown `type` apart from a malformed message.
pub fn decode_text<T: DeserializeOwned>(text: &str) -> Result<T, ProtocolError> {
    match serde_json::from_str::<T>(text) {
        Ok(msg) => Ok(msg),
        Err(err) => {
            // Only on the error path: find out whether the message is well-formed but of a type we lack.
            #[derive(serde::Deserialize)]
            struct Probe {
                #[serde(rename = "type")]
                kind: Option<serde_json::Value>,
            }
            match serde_json::from_str::<Probe>(text) {
                Ok(Probe {
                    kind: Some(serde_json::Value::String(kind)),
                }) if err.to_string().starts_with("unknown variant") => {
                    Err(ProtocolError::UnknownType(cla_common::util::one_line(&kind, 64)))
                }
                Ok(Probe { kind: None }) => Err(ProtocolError::Malformed("missing `type` field".to_owned())),
                // serde quotes the offending value (`unknown variant `x\ny``): keep the error one line.
                _ => Err(ProtocolError::Malformed(cla_common::util::one_line(
                    &err.to_string(),
                    240,
                ))),
            }
        }
    }
}

/// Encodes a binary frame: the stream id, big-endian, then the bytes.
pub fn encode_binary(stream: u64, data: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(8 + data.len());
    buf.put_u64(stream);
    buf.put_slice(data);
    buf.freeze()
}

/// Splits a binary frame into its stream id and bytes (without copying them).
pub fn decode_binary(frame: Bytes) -> Result<(u64, Bytes), ProtocolError> {
    if frame.len() < 8 {
        return Err(ProtocolError::ShortBinary(frame.len()));
    }
    let stream = u64::from_be_bytes(frame[..8].try_into().expect("length checked"));
    Ok((stream, frame.slice(8..)))
}

/// Deepest nesting of a result or stash (JSON readers, ours included, refuse much deeper documents).
pub const MAX_DEPTH: usize = 64;

/// How deeply a JSON text nests (a scalar is 0), counted without parsing it: parsers refuse documents
/// nested much deeper, and the error must say what the problem is.
pub fn depth(json: &str) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{HubMessage, WorkerMessage};

    #[test]
    fn binary_round_trip() {
        let f = encode_binary(0x0102_0304_0506_0708, b"hello");
        assert_eq!(&f[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        let (s, d) = decode_binary(f).unwrap();
        assert_eq!(s, 0x0102_0304_0506_0708);
        assert_eq!(&d[..], b"hello");
        let (s, d) = decode_binary(encode_binary(7, b"")).unwrap();
        assert_eq!((s, d.len()), (7, 0));
    }

    #[test]
    fn short_binary_is_an_error() {
        for n in 0..8 {
            let e = decode_binary(Bytes::from(vec![0u8; n])).unwrap_err();
            assert!(matches!(e, ProtocolError::ShortBinary(m) if m == n));
        }
    }

    #[test]
    fn unknown_type_is_told_apart() {
        let e = decode_text::<HubMessage>(r#"{"type":"teleport","to":"mars"}"#).unwrap_err();
        assert!(
            matches!(e, ProtocolError::UnknownType(ref t) if t == "teleport"),
            "{e}"
        );
    }

    #[test]
    fn quoted_values_in_errors_stay_on_one_line() {
        // Found by the property tests: a type or enum value with an escaped newline.
        let e = decode_text::<WorkerMessage>(r#"{"type":"tra\nsfer","job":"j"}"#).unwrap_err();
        assert_eq!(e.to_string(), "unsupported message type `tra\\nsfer`");
        let long = "x".repeat(5000);
        let e = decode_text::<WorkerMessage>(&format!(r#"{{"type":"{long}"}}"#)).unwrap_err();
        assert!(e.to_string().len() < 120, "{e}");
        let e = decode_text::<WorkerMessage>(r#"{"type":"finished","job":"j","outcome":"ok\u001b[2J\n"}"#)
            .unwrap_err();
        assert!(
            !e.to_string().contains('\n') && !e.to_string().contains('\u{1b}'),
            "{e}"
        );
    }

    #[test]
    fn malformed_inputs_are_errors_not_panics() {
        let inputs = [
            "",
            "{",
            "null",
            "[]",
            "42",
            r#"{"no_type":1}"#,
            r#"{"type":7}"#,
            r#"{"type":"exec"}"#,
            r#"{"type":"exec","job":"j","cmd":"x","stdout":"one","stderr":2}"#,
            r#"{"type":"cancel","job":null,"reason":""}"#,
            "\u{0}\u{1}garbage",
        ];
        for input in inputs {
            let e = decode_text::<HubMessage>(input).unwrap_err();
            assert!(matches!(e, ProtocolError::Malformed(_)), "{input:?} gave {e:?}");
            assert!(decode_text::<WorkerMessage>(input).is_err());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A bounded, deterministic sweep of pseudo-random inputs (xorshift), as text and as binary frames.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 64) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (x >> (i % 8 * 8)) as u8).collect();
            let text = String::from_utf8_lossy(&bytes);
            let _ = decode_text::<HubMessage>(&text);
            let _ = decode_text::<WorkerMessage>(&text);
            let _ = decode_binary(Bytes::from(bytes));
        }
    }
}
