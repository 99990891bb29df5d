//! DNS over HTTPS (RFC 8484) request and response details that are not HTTP plumbing.

use crate::dns::inspect::Response;
use crate::dns::TCP_LIMIT;

pub use vmesh_api::paths::content_type::DNS_MESSAGE as CONTENT_TYPE;
pub use vmesh_api::paths::shim::DNS_QUERY as PATH;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DohError {
    #[error("GET without a dns= parameter")]
    MissingDnsParameter,
    #[error("dns= parameter is not base64url without padding")]
    BadBase64,
    #[error("DNS message larger than 65535 bytes")]
    TooLarge,
}

/// The DNS message of a GET request (RFC 8484 §4.1: `?dns=` base64url, no padding), from a
/// request path with its query string.
pub fn query_from_path(path: &str) -> Result<Vec<u8>, DohError> {
    query_from_query_string(path.split_once('?').map(|(_, q)| q))
}

/// Same, from the query string alone (the part after `?`).
pub fn query_from_query_string(query: Option<&str>) -> Result<Vec<u8>, DohError> {
    let value = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("dns="))
        .ok_or(DohError::MissingDnsParameter)?;
    // 65535 bytes encode to at most 87380 characters; refuse before decoding anything larger.
    if value.len() > TCP_LIMIT.div_ceil(3) * 4 + 8 {
        return Err(DohError::TooLarge);
    }
    // Some clients pad anyway, some percent-encode the padding; accept both rather than fail
    // a valid query.
    let value = trim_all(trim_all(value, "%3D"), "%3d").trim_end_matches('=');
    let message = base64url_decode(value).ok_or(DohError::BadBase64)?;
    if message.len() > TCP_LIMIT {
        return Err(DohError::TooLarge);
    }
    Ok(message)
}

/// `trim_end_matches` for a string pattern without its substring searcher, which would cost
/// the filter module 1.5 KB for this one use.
fn trim_all<'a>(mut value: &'a str, suffix: &str) -> &'a str {
    while let Some(rest) = value.strip_suffix(suffix) {
        value = rest;
    }
    value
}

/// base64url without padding (RFC 4648 §5), strictly: only the URL-safe alphabet, no length
/// that leaves a lone character, and unused trailing bits zero (one encoding per message).
/// Twenty lines instead of the `base64` crate, which cost the filter 4 KB of its budget.
pub fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3 + 2);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in text.as_bytes() {
        let sextet = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(sextet);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // Six bits left is a lone character, which holds no byte.
    (bits < 6 && acc == 0).then_some(out)
}

/// RFC 8484 §5.1: the HTTP freshness lifetime must not exceed the smallest answer TTL.
/// `None` when nothing in the answer section bounds it (no caching header is sent).
pub fn max_age(answer: &[u8]) -> Option<u32> {
    let resp = Response::parse(answer).ok()?;
    resp.answers.iter().map(|rr| rr.ttl).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc8484_4_1_1_get_example_decodes() {
        // The RFC's example: www.example.com A, ID 0.
        let path = "/dns-query?dns=AAABAAABAAAAAAAAA3d3dwdleGFtcGxlA2NvbQAAAQAB";
        let q = query_from_path(path).unwrap();
        assert_eq!(&q[..4], &[0, 0, 1, 0]);
        assert_eq!(q.len(), 33);
    }

    #[test]
    fn get_requests_without_a_usable_parameter_are_refused() {
        assert_eq!(
            query_from_path("/dns-query"),
            Err(DohError::MissingDnsParameter)
        );
        assert_eq!(
            query_from_path("/dns-query?ct=x"),
            Err(DohError::MissingDnsParameter)
        );
        assert_eq!(
            query_from_path("/dns-query?dns=***"),
            Err(DohError::BadBase64)
        );
        let huge = format!("/dns-query?dns={}", "A".repeat(100_000));
        assert_eq!(query_from_path(&huge), Err(DohError::TooLarge));
    }

    #[test]
    fn rfc4648_5_base64url_decodes_like_the_base64_crate() {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        // RFC 4648 §10 test vectors, in the URL-safe alphabet without padding.
        for (text, bytes) in [
            ("", &b""[..]),
            ("Zg", b"f"),
            ("Zm8", b"fo"),
            ("Zm9v", b"foo"),
            ("Zm9vYg", b"foob"),
            ("Zm9vYmE", b"fooba"),
            ("Zm9vYmFy", b"foobar"),
            ("-_8", b"\xfb\xff"),
        ] {
            assert_eq!(base64url_decode(text).as_deref(), Some(bytes), "{text}");
        }
        // Every byte value and length, then every corruption of one character: the crate
        // (strict, as it was used here) and this decoder agree on what is valid and on the bytes.
        let data: Vec<u8> = (0..=255u8).chain((0..64).map(|i| i * 3)).collect();
        for len in 0..data.len() {
            let text = URL_SAFE_NO_PAD.encode(&data[..len]);
            assert_eq!(base64url_decode(&text).as_deref(), Some(&data[..len]));
            if len < 12 {
                for at in 0..text.len() {
                    for c in [b'A', b'B', b'Q', b'g', b'w', b'_', b'+', b'/', b'=', b'.'] {
                        let mut bad = text.clone().into_bytes();
                        bad[at] = c;
                        let bad = String::from_utf8(bad).unwrap();
                        assert_eq!(
                            base64url_decode(&bad),
                            URL_SAFE_NO_PAD.decode(&bad).ok(),
                            "{bad}"
                        );
                    }
                }
            }
            let cut = &text[..text.len().saturating_sub(1)];
            assert_eq!(
                base64url_decode(cut),
                URL_SAFE_NO_PAD.decode(cut).ok(),
                "{cut}"
            );
        }
    }

    #[test]
    fn padded_and_percent_encoded_padding_are_accepted() {
        let plain = query_from_path("/dns-query?dns=AAABAAABAAAAAAAAAAAAAQAB").unwrap();
        assert_eq!(
            query_from_path("/dns-query?ct&dns=AAABAAABAAAAAAAAAAAAAQAB==").unwrap(),
            plain
        );
        assert_eq!(
            query_from_query_string(Some("dns=AAABAAABAAAAAAAAAAAAAQAB%3D%3D")).unwrap(),
            plain
        );
    }
}
