//! HPACK (RFC 7541) encoding restricted to what makes every capture decode standalone:
//! each field is a *literal header field never indexed, new name* (§6.2.3) with raw
//! (non-Huffman) strings, so a reader needs no dynamic-table state from earlier packets or files.
//!
//! Why never-indexed rather than without-indexing (§6.2.2), which decodes the same way: the
//! latter starts every field with a 0x00 octet, and Wireshark shows a CONTINUATION frame's
//! header-block fragment as ASCII text, flagging each such NUL as "trailing stray characters".
//! Never-indexed fields start with 0x10, so large header blocks open without warnings.

/// Appends `value` as an HPACK integer with an `prefix_bits`-bit prefix; `first` carries the
/// pattern bits above the prefix (RFC 7541 §5.1).
pub fn encode_integer(out: &mut Vec<u8>, first: u8, prefix_bits: u8, mut value: usize) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max_prefix as u8);
    value -= max_prefix;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

fn encode_string(out: &mut Vec<u8>, bytes: &[u8]) {
    encode_integer(out, 0x00, 7, bytes.len()); // H = 0: raw octets
    out.extend_from_slice(bytes);
}

/// Appends one header field as a literal never indexed, with a literal name (`0001 0000`).
pub fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x10);
    encode_string(out, name);
    encode_string(out, value);
}

/// A whole header block. HTTP/2 names are lower case; pseudo-headers go first, as required.
pub fn encode_block<'a>(fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Vec<u8> {
    let (mut pseudo, mut regular): (Vec<_>, Vec<_>) =
        fields.into_iter().partition(|(name, _)| name.first() == Some(&b':'));
    pseudo.append(&mut regular);
    let mut out = Vec::new();
    for (name, value) in pseudo {
        encode_literal(&mut out, &name.to_ascii_lowercase(), value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_match_rfc_7541_c1() {
        let mut out = Vec::new();
        encode_integer(&mut out, 0, 5, 10); // C.1.1
        assert_eq!(out, [0b01010]);
        out.clear();
        encode_integer(&mut out, 0, 5, 1337); // C.1.2
        assert_eq!(out, [0b11111, 0b1001_1010, 0b0000_1010]);
        out.clear();
        encode_integer(&mut out, 0, 8, 42); // C.1.3
        assert_eq!(out, [42]);
    }

    #[test]
    fn literal_never_indexed_golden() {
        // RFC 7541 C.2.1's field, in the never-indexed form (first octet 0x10, not 0x40).
        let mut out = Vec::new();
        encode_literal(&mut out, b"custom-key", b"custom-header");
        let mut expected = vec![0x10, 0x0a];
        expected.extend_from_slice(b"custom-key");
        expected.push(0x0d);
        expected.extend_from_slice(b"custom-header");
        assert_eq!(out, expected);
    }

    #[test]
    fn long_and_binary_values_are_raw() {
        let value = vec![0xffu8; 300];
        let mut out = Vec::new();
        encode_literal(&mut out, b"x-trace-bin", &value);
        assert_eq!(&out[..2], &[0x10, 11]);
        assert_eq!(&out[13..16], &[0x7f, 0xad, 0x01], "300 = 127 + 173 in a 7-bit prefix");
        assert_eq!(&out[16..], value.as_slice());
    }

    #[test]
    fn pseudo_headers_first_and_names_lowercased() {
        let block = encode_block([(&b"Content-Type"[..], &b"a"[..]), (b":path", b"/")]);
        assert_eq!(&block[..7], &[0x10, 5, b':', b'p', b'a', b't', b'h']);
        assert!(block.windows(12).any(|w| w == b"content-type"));
    }
}
