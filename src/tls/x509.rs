//! The few fields of an X.509 certificate zkroute reports: the subject (as RFC 4514 text), the
//! DNS and URI subjectAltNames, and the end of validity. A small DER reader of its own, since
//! rustls verifies certificates but does not expose their contents; anything it does not
//! understand comes back as None, never a panic.

/// What zkroute reports of a certificate.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// RFC 4514 text, most specific first: `CN=client,O=example`.
    pub subject: String,
    pub dns: Vec<String>,
    pub uri: Vec<String>,
    /// notAfter, in seconds since the Unix epoch.
    pub not_after: i64,
}

/// One DER element: tag and contents; `rest` follows it.
struct Tlv<'a> {
    tag: u8,
    body: &'a [u8],
}

fn next(input: &[u8]) -> Option<(Tlv<'_>, &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // multi-byte tags do not occur in the fields read here
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, &b| (acc << 8) | b as usize);
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((Tlv { tag, body: &rest[..len] }, &rest[len..]))
}

/// Iterates over the elements of a constructed value.
fn elements(mut input: &[u8]) -> impl Iterator<Item = Tlv<'_>> {
    std::iter::from_fn(move || {
        let (t, rest) = next(input)?;
        input = rest;
        Some(t)
    })
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;

/// Reads a certificate's subject, SANs and notAfter.
pub fn parse(der: &[u8]) -> Option<CertInfo> {
    let (cert, _) = next(der)?;
    let (tbs, _) = next(cert.body)?;
    if cert.tag != SEQUENCE || tbs.tag != SEQUENCE {
        return None;
    }
    let mut fields = elements(tbs.body).peekable();
    if fields.peek()?.tag == 0xa0 {
        fields.next(); // version
    }
    let _serial = fields.next()?;
    let _signature = fields.next()?;
    let _issuer = fields.next()?;
    let validity = fields.next()?;
    let subject = fields.next()?;
    let _spki = fields.next()?;
    let mut info = CertInfo { subject: name_text(subject.body)?, ..CertInfo::default() };
    let mut times = elements(validity.body);
    let _not_before = times.next()?;
    let not_after = times.next()?;
    info.not_after = time(not_after.tag, not_after.body)?;
    for f in fields {
        if f.tag != 0xa3 {
            continue;
        }
        let (exts, _) = next(f.body)?;
        for ext in elements(exts.body) {
            let mut parts = elements(ext.body);
            let oid = parts.next()?;
            // subjectAltName, 2.5.29.17
            if oid.tag != OID || oid.body != [0x55, 0x1d, 0x11] {
                continue;
            }
            let value = parts.find(|p| p.tag == 0x04)?;
            let (names, _) = next(value.body)?;
            for n in elements(names.body) {
                let text = || String::from_utf8_lossy(n.body).into_owned();
                match n.tag {
                    0x82 => info.dns.push(text()),
                    0x86 => info.uri.push(text()),
                    _ => {}
                }
            }
        }
    }
    Some(info)
}

/// A Name as RFC 4514 text: the RDNs in reverse order, comma-separated.
fn name_text(name: &[u8]) -> Option<String> {
    let mut rdns = Vec::new();
    for rdn in elements(name) {
        if rdn.tag != SET {
            return None;
        }
        let mut parts = Vec::new();
        for atv in elements(rdn.body) {
            let mut it = elements(atv.body);
            let oid = it.next()?;
            let value = it.next()?;
            let key = match oid.body {
                [0x55, 0x04, 0x03] => "CN".to_owned(),
                [0x55, 0x04, 0x06] => "C".to_owned(),
                [0x55, 0x04, 0x07] => "L".to_owned(),
                [0x55, 0x04, 0x08] => "ST".to_owned(),
                [0x55, 0x04, 0x09] => "STREET".to_owned(),
                [0x55, 0x04, 0x0a] => "O".to_owned(),
                [0x55, 0x04, 0x0b] => "OU".to_owned(),
                [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19] => "DC".to_owned(),
                [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01] => "UID".to_owned(),
                other => oid_text(other)?,
            };
            parts.push(format!("{key}={}", escape_rdn(&String::from_utf8_lossy(value.body))));
        }
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    Some(rdns.join(","))
}

fn oid_text(body: &[u8]) -> Option<String> {
    let (&first, rest) = body.split_first()?;
    let mut out = format!("{}.{}", first / 40, first % 40);
    let mut acc: u64 = 0;
    for &b in rest {
        acc = (acc << 7) | (b & 0x7f) as u64;
        if b & 0x80 == 0 {
            out.push_str(&format!(".{acc}"));
            acc = 0;
        }
    }
    Some(out)
}

/// RFC 4514 section 2.4 escapes.
fn escape_rdn(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for (i, c) in v.chars().enumerate() {
        let edge = (i == 0 && (c == ' ' || c == '#')) || (i + 1 == v.chars().count() && c == ' ');
        if edge || matches!(c, '"' | '+' | ',' | ';' | '<' | '>' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// UTCTime (0x17) or GeneralizedTime (0x18), `Z` form, as Unix seconds.
fn time(tag: u8, body: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(body).ok()?;
    let s = s.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 => {
            let y: i64 = s.get(..2)?.parse().ok()?;
            (if y >= 50 { 1900 + y } else { 2000 + y }, s.get(2..)?)
        }
        0x18 => (s.get(..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    let num = |r: std::ops::Range<usize>| -> Option<i64> { rest.get(r)?.parse().ok() };
    let (month, day, hour, min, sec) = (num(0..2)?, num(2..4)?, num(4..6)?, num(6..8)?, num(8..10)?);
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_count_from_the_epoch() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(time(0x17, b"000301000000Z"), Some(951_868_800));
        assert_eq!(time(0x18, b"20501231235959Z"), Some(2_556_143_999));
    }

    #[test]
    fn garbage_is_none_not_a_panic() {
        for bytes in [&b""[..], &[0x30], &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff], &[0x30, 0x02, 0x30, 0x00]] {
            assert_eq!(parse(bytes), None);
        }
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let v: Vec<u8> = (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect();
            let _ = parse(&v);
        }
    }

    #[test]
    fn rdn_values_are_escaped() {
        assert_eq!(escape_rdn("a,b"), "a\\,b");
        assert_eq!(escape_rdn(" x "), "\\ x\\ ");
    }
}
