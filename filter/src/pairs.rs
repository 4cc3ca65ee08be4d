//! The proxy-wasm "pairs" serialization: how the host hands over header maps and struct-valued
//! properties (e.g. `xds.node.metadata.LABELS`), and how gRPC initial metadata is handed back.
//!
//! Layout: `u32 count`, then `count` × (`u32 key_len`, `u32 value_len`), then each key and value
//! followed by a NUL byte; integers little-endian. The SDK's decoder panics on malformed input
//! or non-UTF-8 names; this one returns an error, because a panic would fail the request.

/// The input is not a well-formed pairs buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct MalformedPairs;

fn read_u32(bytes: &[u8], at: usize) -> Result<usize, MalformedPairs> {
    let slice = bytes.get(at..at + 4).ok_or(MalformedPairs)?;
    let array: [u8; 4] = slice.try_into().map_err(|_| MalformedPairs)?;
    Ok(u32::from_le_bytes(array) as usize)
}

/// One (key, value) pair, borrowed from the buffer.
pub type Pair<'a> = (&'a [u8], &'a [u8]);

/// The `len` bytes at `start`, and where the next field starts (past the NUL).
fn field(bytes: &[u8], start: usize, len: usize) -> Result<(&[u8], usize), MalformedPairs> {
    let end = start.checked_add(len).ok_or(MalformedPairs)?;
    Ok((bytes.get(start..end).ok_or(MalformedPairs)?, end + 1))
}

/// Decodes a pairs buffer into borrowed (key, value) byte slices. An empty buffer is an empty map.
///
/// # Errors
/// [`MalformedPairs`] when a length runs past the end of the buffer.
pub fn decode(bytes: &[u8]) -> Result<Vec<Pair<'_>>, MalformedPairs> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let count = read_u32(bytes, 0)?;
    let mut data = count.checked_mul(8).and_then(|n| n.checked_add(4)).ok_or(MalformedPairs)?;
    if data > bytes.len() {
        return Err(MalformedPairs);
    }
    let mut pairs = Vec::with_capacity(count);
    for index in 0..count {
        let key_len = read_u32(bytes, 4 + index * 8)?;
        let value_len = read_u32(bytes, 8 + index * 8)?;
        let (key, after_key) = field(bytes, data, key_len)?;
        let (value, after_value) = field(bytes, after_key, value_len)?;
        data = after_value;
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// Encodes (key, value) pairs.
pub fn encode<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    let data: usize = pairs.iter().map(|(k, v)| k.as_ref().len() + v.as_ref().len() + 2).sum();
    let mut out = Vec::with_capacity(4 + pairs.len() * 8 + data);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (key, value) in pairs {
        out.extend_from_slice(&(key.as_ref().len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.as_ref().len() as u32).to_le_bytes());
    }
    for (key, value) in pairs {
        out.extend_from_slice(key.as_ref());
        out.push(0);
        out.extend_from_slice(value.as_ref());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_including_binary_and_empty_values() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b":path", b"/a"), (b"x-bin", &[0, 0xff, 1]), (b"empty", b"")];
        let bytes = encode(&pairs);
        assert_eq!(decode(&bytes).unwrap(), pairs);
    }

    #[test]
    fn golden_layout() {
        let bytes = encode(&[("a", "bc")]);
        assert_eq!(bytes, [1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, b'a', 0, b'b', b'c', 0]);
    }

    #[test]
    fn empty_buffer_is_empty_map() {
        assert_eq!(decode(&[]).unwrap(), vec![]);
    }

    #[test]
    fn malformed_buffers_are_errors_not_panics() {
        let good = encode(&[("key", "value")]);
        for cut in 1..good.len() - 1 {
            assert_eq!(decode(&good[..cut]), Err(MalformedPairs), "cut at {cut}");
        }
        assert_eq!(decode(&[0xff, 0xff, 0xff, 0xff]), Err(MalformedPairs));
        assert_eq!(decode(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0]), Err(MalformedPairs));
    }
}
