//! Content codings. The caller's answer streams back exactly as Greenhouse encoded it, but the
//! gateway reads every answer itself (candidate ids for the audit trail, spec drift), so it asks
//! Greenhouse only for codings it can decode, and decodes its bounded copy before reading it.

use std::borrow::Cow;
use std::io::Read;

use http::HeaderMap;
use http::header::{self, HeaderValue};

/// The codings the gateway can decode (RFC 9110 section 8.4.1), lowercase.
const DECODABLE: [&str; 5] = ["gzip", "x-gzip", "deflate", "br", "identity"];

/// Keeps, of the caller's `Accept-Encoding`, only the codings the gateway can decode (with their
/// weights); when none is left the header goes, and Greenhouse answers unencoded.
pub fn accept_only_decodable(headers: &mut HeaderMap) {
    if !headers.contains_key(header::ACCEPT_ENCODING) {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|item| {
            let coding = item.split(';').next().unwrap_or("").trim();
            DECODABLE.iter().any(|d| coding.eq_ignore_ascii_case(d))
        })
        .map(str::to_string)
        .collect();
    headers.remove(header::ACCEPT_ENCODING);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join(", "))
    {
        headers.insert(header::ACCEPT_ENCODING, v);
    }
}

/// Why a copy could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum Undecodable {
    /// A coding the gateway did not ask for.
    Unknown,
    /// Corrupt data, or more than the limit once decoded.
    Broken,
}

/// Decodes a response copy by its `Content-Encoding` (codings applied in order, so undone in
/// reverse). At most `limit` decoded bytes: a small body that inflates past it is refused, not
/// inflated in memory.
pub fn decode<'a>(
    headers: &HeaderMap,
    body: &'a [u8],
    limit: usize,
) -> Result<Cow<'a, [u8]>, Undecodable> {
    let codings: Vec<String> = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "identity")
        .collect();
    if codings.is_empty() {
        return Ok(Cow::Borrowed(body));
    }
    let mut data = body.to_vec();
    for coding in codings.iter().rev() {
        data = match coding.as_str() {
            "gzip" | "x-gzip" => read_bounded(flate2::read::MultiGzDecoder::new(&data[..]), limit)?,
            // RFC 9110 "deflate" is zlib-wrapped; some servers send raw deflate.
            "deflate" => read_bounded(flate2::read::ZlibDecoder::new(&data[..]), limit)
                .or_else(|_| read_bounded(flate2::read::DeflateDecoder::new(&data[..]), limit))?,
            "br" => read_bounded(brotli::Decompressor::new(&data[..], 8192), limit)?,
            _ => return Err(Undecodable::Unknown),
        };
    }
    Ok(Cow::Owned(data))
}

fn read_bounded(r: impl Read, limit: usize) -> Result<Vec<u8>, Undecodable> {
    let mut out = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    r.take(cap)
        .read_to_end(&mut out)
        .map_err(|_| Undecodable::Broken)?;
    if out.len() > limit {
        return Err(Undecodable::Broken);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn with(name: header::HeaderName, v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(v));
        h
    }

    #[test]
    fn accept_encoding_keeps_only_decodable_codings_with_their_weights() {
        let mut h = with(
            header::ACCEPT_ENCODING,
            "gzip, deflate, br, zstd;q=0.9, *;q=0.1",
        );
        accept_only_decodable(&mut h);
        assert_eq!(h[header::ACCEPT_ENCODING], "gzip, deflate, br");
        let mut h = with(header::ACCEPT_ENCODING, "zstd, compress");
        accept_only_decodable(&mut h);
        assert!(h.get(header::ACCEPT_ENCODING).is_none());
        let mut h = with(header::ACCEPT_ENCODING, "BR;q=0.5, identity");
        accept_only_decodable(&mut h);
        assert_eq!(h[header::ACCEPT_ENCODING], "BR;q=0.5, identity");
    }

    #[test]
    fn gzip_deflate_and_brotli_copies_decode_and_bombs_are_refused() {
        let plain = br#"{"id":42,"external_id":"x"}"#.to_vec();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&plain).ok();
        let gz = gz.finish().unwrap_or_default();
        assert_eq!(
            decode(&with(header::CONTENT_ENCODING, "gzip"), &gz, 1024),
            Ok(Cow::Owned(plain.clone()))
        );
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&plain).ok();
        let z = z.finish().unwrap_or_default();
        assert_eq!(
            decode(&with(header::CONTENT_ENCODING, "deflate"), &z, 1024),
            Ok(Cow::Owned(plain.clone()))
        );
        let mut br = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut br, 4096, 5, 22);
            w.write_all(&plain).ok();
        }
        assert_eq!(
            decode(&with(header::CONTENT_ENCODING, "br"), &br, 1024),
            Ok(Cow::Owned(plain.clone()))
        );
        assert_eq!(
            decode(&with(header::CONTENT_ENCODING, "zstd"), &plain, 1024),
            Err(Undecodable::Unknown)
        );
        assert_eq!(
            decode(&with(header::CONTENT_ENCODING, "gzip"), b"not gzip", 1024),
            Err(Undecodable::Broken)
        );
        let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        bomb.write_all(&vec![b'a'; 1 << 20]).ok();
        let bomb = bomb.finish().unwrap_or_default();
        assert!(bomb.len() < 4096);
        assert_eq!(
            decode(&with(header::CONTENT_ENCODING, "gzip"), &bomb, 64 * 1024),
            Err(Undecodable::Broken)
        );
        assert_eq!(
            decode(&HeaderMap::new(), &plain, 1024),
            Ok(Cow::Borrowed(&plain[..]))
        );
    }
}
