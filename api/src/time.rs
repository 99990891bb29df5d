//! RFC 3339 timestamps as Kubernetes and Istio write them, for times passed around as
//! nanoseconds since the Unix epoch (callers own the clock; this module never reads one).
//!
//! Formatting matches Go's `time.RFC3339Nano` in UTC: fractional seconds with trailing zeros
//! removed, and no fraction at all on a whole second, so `istio.io/connectedAt` looks exactly
//! like Istio's.

const NANOS_PER_SEC: u64 = 1_000_000_000;
const SECS_PER_DAY: u64 = 86_400;

/// `2026-11-27T18:35:09.1234Z` for the given nanoseconds since the epoch.
pub fn format_rfc3339_nanos(nanos: u64) -> String {
    let secs = nanos / NANOS_PER_SEC;
    let frac = nanos % NANOS_PER_SEC;
    let days = secs / SECS_PER_DAY;
    let rem = secs % SECS_PER_DAY;
    let (y, m, d) = civil_from_days(days as i64);
    let mut out = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    if frac != 0 {
        let digits = format!("{frac:09}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// Whole-second form (`time.RFC3339`), as Kubernetes writes `creationTimestamp`.
pub fn format_rfc3339_secs(nanos: u64) -> String {
    format_rfc3339_nanos(nanos - nanos % NANOS_PER_SEC)
}

/// Parses an RFC 3339 timestamp (any fraction length, `Z` or a numeric offset) into
/// nanoseconds since the epoch. Times before 1970 are refused.
///
/// Strict as Go's `time.Parse(time.RFC3339, ..)` (what Kubernetes and Istio read these with):
/// the day must exist in its month (no Feb 30, Feb 29 only in leap years), seconds stop at 59
/// (no leap second), and an offset is at most 23:59. A lenient parser would turn
/// `2026-02-31` into March 3rd and let `+99:00` move a time four days.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<u64> {
        let part = b.get(from..from + len)?;
        part.iter().try_fold(0u64, |acc, c| {
            c.is_ascii_digit().then(|| acc * 10 + u64::from(c - b'0'))
        })
    };
    let sep = |at: usize, want: &[u8]| b.get(at).is_some_and(|c| want.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, min, sec) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || min > 59
        || sec > 59
    {
        return None;
    }
    let mut at = 19;
    let mut frac = 0u64;
    if sep(at, b".") {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            if at - start < 9 {
                frac = frac * 10 + u64::from(b.get(at).copied().unwrap_or(b'0') - b'0');
            }
            at += 1;
        }
        let n = at - start;
        if n == 0 {
            return None;
        }
        for _ in n..9 {
            frac *= 10;
        }
    }
    let offset: i64 = match b.get(at) {
        Some(b'Z' | b'z') if at + 1 == b.len() => 0,
        Some(c @ (b'+' | b'-')) if at + 6 == b.len() && sep(at + 3, b":") => {
            let (oh, om) = (num(at + 1, 2)?, num(at + 4, 2)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let mins = (oh * 60 + om) as i64;
            if *c == b'+' {
                mins * 60
            } else {
                -mins * 60
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year as i64, month as u32, day as u32);
    let secs = days * SECS_PER_DAY as i64 + (hour * 3600 + min * 60 + sec) as i64 - offset;
    let secs = u64::try_from(secs).ok()?;
    secs.checked_mul(NANOS_PER_SEC)?.checked_add(frac)
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's days <-> civil date algorithms (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_go_rfc3339nano() {
        let cases = [
            (0, "1970-01-01T00:00:00Z"),
            (1_700_000_000_000_000_000, "2023-11-14T22:13:20Z"),
            (1_700_000_000_123_456_789, "2023-11-14T22:13:20.123456789Z"),
            (1_700_000_000_120_000_000, "2023-11-14T22:13:20.12Z"),
            (951_782_400_000_000_001, "2000-02-29T00:00:00.000000001Z"),
        ];
        for (n, s) in cases {
            assert_eq!(format_rfc3339_nanos(n), s);
            assert_eq!(parse_rfc3339(s), Some(n), "{s}");
        }
        assert_eq!(
            format_rfc3339_secs(1_700_000_000_999_000_000),
            "2023-11-14T22:13:20Z"
        );
    }

    #[test]
    fn parses_offsets_and_refuses_garbage() {
        assert_eq!(
            parse_rfc3339("2023-11-14T23:13:20+01:00"),
            Some(1_700_000_000_000_000_000)
        );
        assert_eq!(
            parse_rfc3339("2023-11-14T22:13:20.5Z"),
            Some(1_700_000_000_500_000_000)
        );
        for bad in [
            "",
            "2023-11-14",
            "2023-13-14T22:13:20Z",
            "2023-11-14T22:13:20",
            "1969-12-31T23:59:59Z",
            "2023-11-14T22:13:20.Z",
            "2023-11-14T22:13:20Zjunk",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_day_its_month_does_not_have_is_refused() {
        for bad in [
            "2026-02-30T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2100-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-11-31T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        for good in [
            "2024-02-29T00:00:00Z",
            "2000-02-29T00:00:00Z",
            "2026-01-31T00:00:00Z",
            "2026-12-31T23:59:59Z",
        ] {
            assert!(parse_rfc3339(good).is_some(), "{good}");
        }
    }

    #[test]
    fn an_offset_beyond_23_59_is_refused() {
        for bad in [
            "2026-01-01T00:00:00+25:00",
            "2026-01-01T00:00:00-24:00",
            "2026-01-01T00:00:00+01:60",
            "2026-01-01T00:00:00+99:99",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        assert!(parse_rfc3339("2026-01-01T00:00:00+23:59").is_some());
    }

    #[test]
    fn a_leap_second_is_refused_as_go_does() {
        assert_eq!(parse_rfc3339("2016-12-31T23:59:60Z"), None);
    }
}
