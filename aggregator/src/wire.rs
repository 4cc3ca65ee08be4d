//! What HTTP can carry on the wire, applied to captured bytes before they are rendered into
//! packets (HTTP/1.1 text or HTTP/2 HPACK). Envoy's codecs already refuse most of what is
//! mended here; these rules make sure that whatever a proxy reports, the synthesized file keeps
//! valid framing and Wireshark can dissect it. The `.bson` keeps the bytes as they were.
//!
//! - names and methods are tokens (RFC 9110 §5.6.2): any other byte becomes `_`;
//! - the request target keeps what RFC 3986 allows in a path and query, the authority keeps
//!   visible ASCII; other bytes, and a `%` that does not start a percent-encoding, are
//!   percent-encoded;
//! - field values lose control bytes (NUL, CR, LF and the rest but HTAB), which become spaces;
//! - a status is three digits, or 502 when the proxy reported something else.

use std::borrow::Cow;

fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// A token (header name without the pseudo-header colon, or method); never empty.
pub fn token(bytes: &[u8]) -> Cow<'_, [u8]> {
    if !bytes.is_empty() && bytes.iter().all(|&b| is_tchar(b)) {
        return Cow::Borrowed(bytes);
    }
    if bytes.is_empty() {
        return Cow::Borrowed(b"_");
    }
    Cow::Owned(bytes.iter().map(|&b| if is_tchar(b) { b } else { b'_' }).collect())
}

/// A header name: a token, keeping one leading `:` of a pseudo-header.
pub fn name(bytes: &[u8]) -> Cow<'_, [u8]> {
    match bytes.strip_prefix(b":") {
        Some(rest) if !rest.is_empty() && rest.iter().all(|&b| is_tchar(b)) => Cow::Borrowed(bytes),
        Some(rest) => Cow::Owned([b":".as_slice(), &token(rest)].concat()),
        None => token(bytes),
    }
}

/// A request target in origin form (RFC 9112 §3.2.1), starting with `/` (the asterisk form `*`
/// is kept), with only the characters RFC 3986 allows in a path and query: unreserved,
/// sub-delims, `:`, `@`, `/`, `?` and percent-encodings.
pub fn target(bytes: &[u8]) -> Cow<'_, [u8]> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?".contains(&b);
    match bytes.first() {
        None => Cow::Borrowed(b"/"),
        Some(b'/') => percent_encode(bytes, allowed),
        _ if bytes == b"*" => Cow::Borrowed(bytes),
        _ => Cow::Owned([b"/".as_slice(), &percent_encode(bytes, allowed)].concat()),
    }
}

/// An authority: visible ASCII kept, anything else percent-encoded.
pub fn authority(bytes: &[u8]) -> Cow<'_, [u8]> {
    percent_encode(bytes, |b| (0x21..0x7f).contains(&b) && b != b'%')
}

/// `bytes` with every byte that is not `allowed` percent-encoded; a `%` is kept only where it
/// starts a valid percent-encoding.
fn percent_encode(bytes: &[u8], allowed: impl Fn(u8) -> bool) -> Cow<'_, [u8]> {
    let keep = |at: usize| match bytes[at] {
        b'%' => bytes.get(at + 1..at + 3).is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)),
        b => allowed(b),
    };
    if (0..bytes.len()).all(keep) {
        return Cow::Borrowed(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len() * 3);
    for (at, &b) in bytes.iter().enumerate() {
        if keep(at) {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    Cow::Owned(out)
}

/// A field value without control bytes.
pub fn value(bytes: &[u8]) -> Cow<'_, [u8]> {
    let control = |b: u8| (b < 0x20 && b != b'\t') || b == 0x7f;
    if !bytes.iter().any(|&b| control(b)) {
        return Cow::Borrowed(bytes);
    }
    Cow::Owned(bytes.iter().map(|&b| if control(b) { b' ' } else { b }).collect())
}

/// A three-digit status.
pub fn status(bytes: Option<&[u8]>) -> u16 {
    bytes
        .filter(|s| s.len() == 3 && s.iter().all(u8::is_ascii_digit))
        .and_then(|s| std::str::from_utf8(s).ok()?.parse().ok())
        .filter(|s| (100..=999).contains(s))
        .unwrap_or(502)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_input_is_borrowed_untouched() {
        assert!(matches!(token(b"GET"), Cow::Borrowed(b"GET")));
        assert!(matches!(name(b":path"), Cow::Borrowed(_)));
        assert!(matches!(target(b"/a?b=c%20d"), Cow::Borrowed(_)));
        assert!(matches!(value("café\tok".as_bytes()), Cow::Borrowed(_)));
    }

    #[test]
    fn invalid_bytes_are_mended() {
        assert_eq!(&*token(b"GE T\r\n"), b"GE_T__");
        assert_eq!(&*token(b""), b"_");
        assert_eq!(&*name(b"x:y z"), b"x_y_z");
        assert_eq!(&*name(b":pa th"), b":pa_th");
        assert_eq!(&*target(b"/a b\xc3\xa9\x00"), b"/a%20b%C3%A9%00");
        assert_eq!(&*target(b""), b"/");
        assert_eq!(&*target(b"relative"), b"/relative");
        assert_eq!(&*target(b"*"), b"*");
        assert_eq!(&*target(b"/a[1]|{x}\\^#"), b"/a%5B1%5D%7C%7Bx%7D%5C%5E%23");
        assert!(matches!(authority(b"[::1]:8080"), Cow::Borrowed(_)));
        assert_eq!(&*authority(b"host name:80"), b"host%20name:80");
        assert_eq!(&*target(b"/100%-off%2"), b"/100%25-off%252");
        assert!(matches!(target(b"/a%2Fb"), Cow::Borrowed(_)));
        assert_eq!(&*value(b"a\r\nb\x00c\x7f"), b"a  b c ");
    }

    #[test]
    fn statuses() {
        assert_eq!(status(Some(b"404")), 404);
        for bad in [&b"4040"[..], b"abc", b"99", b"-12", b""] {
            assert_eq!(status(Some(bad)), 502, "{bad:?}");
        }
        assert_eq!(status(None), 502);
    }
}
