//! Pure input checks and formatting: slot names, sizes, durations.
//!
//! Nothing here touches PostgreSQL, so every rule is a plain unit test. The wording of the
//! slot-name errors follows core's `ReplicationSlotValidateName()` in `slot.c`.

use crate::error::GuardError;

/// PostgreSQL's NAMEDATALEN - 1: the longest slot name, in bytes.
pub const MAX_SLOT_NAME_BYTES: usize = 63;

/// Longest `holder` we store. A holder is a label ("nightly backup on host b2"), not a log.
pub const MAX_HOLDER_BYTES: usize = 1024;

/// Check a replication slot name by PostgreSQL's rules: `[a-z0-9_]`, 1..=63 bytes.
pub fn slot_name(name: Option<&str>) -> Result<&str, GuardError> {
    let name = name.ok_or(GuardError::NullArgument("slot_name"))?;
    if name.is_empty() {
        return Err(GuardError::SlotNameTooShort);
    }
    if name.len() > MAX_SLOT_NAME_BYTES {
        return Err(GuardError::SlotNameTooLong(cut(name)));
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
        return Err(GuardError::SlotNameInvalid(cut(name)));
    }
    Ok(name)
}

/// Check a holder label: at most [`MAX_HOLDER_BYTES`], and no control characters (a holder
/// goes into log lines, events and notifications, where a newline or an escape sequence
/// could forge a line or a terminal's display).
pub fn holder(holder: Option<&str>) -> Result<Option<&str>, GuardError> {
    match holder {
        Some(h) if h.len() > MAX_HOLDER_BYTES => Err(GuardError::HolderTooLong(h.len())),
        Some(h) if h.chars().any(char::is_control) => Err(GuardError::HolderControl),
        other => Ok(other),
    }
}

/// How many characters of a value a caller gave are echoed in a message.
pub const ECHO_CHARS: usize = 64;

/// A value a caller gave, as a message may echo it: at most [`ECHO_CHARS`] characters
/// (then "..."), control characters escaped. Input is never echoed unbounded: a 10 MB
/// argument must not become a 10 MB log line.
pub fn cut(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == ECHO_CHARS {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Text for a log line: control characters escaped (a holder stored by an older version
/// may carry them).
pub fn for_log(s: &str) -> String {
    if s.chars().any(char::is_control) {
        s.chars().flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] }).collect()
    } else {
        s.to_string()
    }
}

/// Parse a size the way `pg_size_bytes()` does: a number, optional spaces, an optional
/// unit among bytes, kB, MB, GB, TB, PB (case-insensitive, 1024-based).
pub fn parse_size(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("invalid size: \"{}\"", cut(text)));
    }
    let value: f64 = num.parse().map_err(|_| format!("invalid size: \"{}\"", cut(text)))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" | "bytes" => 1.0,
        "kb" => 1024.0,
        "mb" => 1024.0 * 1024.0,
        "gb" => 1024.0 * 1024.0 * 1024.0,
        "tb" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "pb" => 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("invalid size unit: \"{}\"", cut(other))),
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes >= i64::MAX as f64 || bytes <= i64::MIN as f64 {
        return Err(format!("size \"{}\" is out of range", cut(text)));
    }
    Ok(bytes.round() as i64)
}

/// A per-lease WAL limit: a size above zero.
pub fn max_retained(text: Option<&str>) -> Result<Option<i64>, GuardError> {
    let Some(text) = text else { return Ok(None) };
    let bytes = parse_size(text).map_err(|detail| GuardError::BadSize(cut(text), detail))?;
    if bytes <= 0 {
        return Err(GuardError::BadSize(
            cut(text),
            "max_retained must be greater than zero".to_string(),
        ));
    }
    Ok(Some(bytes))
}

/// Microseconds in a second (PostgreSQL's timestamps and intervals count microseconds).
pub const US_PER_S: i64 = 1_000_000;

/// Far beyond any `pgslotguard.max_ttl` (at most 68 years) and far inside timestamptz's
/// range (to year 294276): each field of a ttl must stay within this many years before
/// any date arithmetic is tried, so none can overflow.
pub const TTL_FIELD_LIMIT_YEARS: i64 = 10_000;

/// Each field of a ttl interval (months, days, microseconds) alone stays within
/// [`TTL_FIELD_LIMIT_YEARS`] either way (also false for PostgreSQL 17's infinite intervals).
pub fn ttl_fields_in_range(months: i32, days: i32, micros: i64) -> bool {
    let y = TTL_FIELD_LIMIT_YEARS;
    (months as i64).abs() <= y * 12 && (days as i64).abs() <= y * 366 && (micros as i128).abs() <= (y * 366 * 86_400) as i128 * US_PER_S as i128
}

/// Parse a `pg_lsn` in its text form (`16/B374D848`). Reading the text is much cheaper
/// than pg_lsn arithmetic in SQL, which goes through numeric.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= u32::MAX as u64 && lo <= u32::MAX as u64).then_some((hi << 32) | lo)
}

/// Format an LSN as PostgreSQL does.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Format bytes as `pg_size_pretty()` does (rounded halves, 1024-based, kB..PB).
pub fn pretty_size(bytes: i64) -> String {
    let neg = bytes < 0;
    let mut size = bytes.unsigned_abs() as f64;
    let units = ["bytes", "kB", "MB", "GB", "TB", "PB"];
    let mut unit = 0;
    // pg_size_pretty switches unit once the value reaches 10 240 of the current one.
    while size >= 10_240.0 && unit < units.len() - 1 {
        size /= 1024.0;
        unit += 1;
    }
    let rounded = size.round() as u64;
    format!("{}{} {}", if neg { "-" } else { "" }, rounded, units[unit])
}

/// Format a duration in microseconds the way a DBA reads it: `2h 05m`, `42s`, `3d 04h`.
pub fn pretty_duration(us: i64) -> String {
    let neg = us < 0;
    let s = us.unsigned_abs() / US_PER_S as u64;
    let (d, h, m, sec) = (s / 86_400, (s % 86_400) / 3600, (s % 3600) / 60, s % 60);
    let body = if d > 0 {
        format!("{d}d {h:02}h")
    } else if h > 0 {
        format!("{h}h {m:02}m")
    } else if m > 0 {
        format!("{m}m {sec:02}s")
    } else {
        format!("{sec}s")
    };
    if neg {
        format!("-{body}")
    } else {
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_follow_core_rules() {
        assert!(slot_name(Some("nightly")).is_ok());
        assert!(slot_name(Some("a_1")).is_ok());
        assert!(slot_name(Some(&"x".repeat(63))).is_ok());
        assert!(matches!(slot_name(None), Err(GuardError::NullArgument(_))));
        assert!(matches!(slot_name(Some("")), Err(GuardError::SlotNameTooShort)));
        assert!(matches!(slot_name(Some(&"x".repeat(64))), Err(GuardError::SlotNameTooLong(_))));
        for bad in ["Nightly", "a-b", "a b", "a'b", "; drop table x", "ünï", "a\"b", "a.b"] {
            assert!(matches!(slot_name(Some(bad)), Err(GuardError::SlotNameInvalid(_))), "{bad}");
        }
        // 63 bytes but made of 2-byte characters is refused for the characters, not length
        assert!(matches!(slot_name(Some(&"é".repeat(20))), Err(GuardError::SlotNameInvalid(_))));
    }

    #[test]
    fn holder_length_is_bounded() {
        assert_eq!(holder(None).unwrap(), None);
        assert_eq!(holder(Some("nightly on b2")).unwrap(), Some("nightly on b2"));
        assert!(matches!(holder(Some(&"h".repeat(100_000))), Err(GuardError::HolderTooLong(100_000))));
    }

    #[test]
    fn sizes_parse_like_pg_size_bytes() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert_eq!(parse_size("10 bytes").unwrap(), 10);
        assert_eq!(parse_size("1kB").unwrap(), 1024);
        assert_eq!(parse_size("64MB").unwrap(), 64 << 20);
        assert_eq!(parse_size("50GB").unwrap(), 50 << 30);
        assert_eq!(parse_size(" 2 tb ").unwrap(), 2 << 40);
        assert_eq!(parse_size("1PB").unwrap(), 1 << 50);
        assert_eq!(parse_size("1.5GB").unwrap(), 3 << 29);
        assert_eq!(parse_size("-1").unwrap(), -1);
        assert!(parse_size("10XB").unwrap_err().contains("unit"));
        assert!(parse_size("").is_err());
        assert!(parse_size("GB").is_err());
        assert!(parse_size("1.2.3MB").is_err());
        assert!(parse_size("99999999999PB").unwrap_err().contains("out of range"));
        assert!(parse_size("9223372036854775808").unwrap_err().contains("out of range"));
    }

    #[test]
    fn lease_limit_must_be_positive() {
        assert_eq!(max_retained(None).unwrap(), None);
        assert_eq!(max_retained(Some("1GB")).unwrap(), Some(1 << 30));
        for bad in ["-1", "0", "10XB", "99999999999PB", "abc"] {
            assert!(matches!(max_retained(Some(bad)), Err(GuardError::BadSize(..))), "{bad}");
        }
    }

    #[test]
    fn ttl_fields_are_bounded_before_any_arithmetic() {
        assert!(ttl_fields_in_range(0, 7, 0));
        assert!(ttl_fields_in_range(1000, -29_993, 0));
        assert!(!ttl_fields_in_range(71_000_000, -2_129_999_993, 0));
        assert!(!ttl_fields_in_range(0, 0, i64::MAX));
        assert!(!ttl_fields_in_range(i32::MAX, 0, 0));
        assert!(!ttl_fields_in_range(0, i32::MIN, 0));
    }

    #[test]
    fn lsns_parse_and_format_like_pg_lsn() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("0/1598CB8"), Some(0x1598CB8));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374D848));
        assert_eq!(format_lsn((0x16 << 32) | 0xB374D848), "16/B374D848");
        for bad in ["", "0", "x/1", "1/", "/1", "100000000/0"] {
            assert_eq!(parse_lsn(bad), None, "{bad}");
        }
    }

    #[test]
    fn pretty_size_matches_pg_size_pretty() {
        assert_eq!(pretty_size(0), "0 bytes");
        assert_eq!(pretty_size(10_239), "10239 bytes");
        assert_eq!(pretty_size(10_240), "10 kB");
        assert_eq!(pretty_size(16 << 20), "16 MB");
        assert_eq!(pretty_size(840 << 20), "840 MB");
        assert_eq!(pretty_size(12 << 30), "12 GB");
        assert_eq!(pretty_size(-(64 << 20)), "-64 MB");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(pretty_duration(0), "0s");
        assert_eq!(pretty_duration(42_000_000), "42s");
        assert_eq!(pretty_duration(125_000_000), "2m 05s");
        assert_eq!(pretty_duration(2 * 3600 * 1_000_000 + 5 * 60 * 1_000_000), "2h 05m");
        assert_eq!(pretty_duration(3 * 86_400 * 1_000_000 + 4 * 3600 * 1_000_000), "3d 04h");
        assert_eq!(pretty_duration(-90_000_000), "-1m 30s");
    }
}

#[cfg(test)]
mod echo_tests {
    use super::*;

    #[test]
    fn echoed_input_is_short_and_has_no_control_characters() {
        let long = "9".repeat(10 << 20);
        let e = max_retained(Some(&long)).unwrap_err().to_string();
        assert!(e.len() < 300, "{} bytes", e.len());
        assert!(e.contains(&format!("{}...", "9".repeat(ECHO_CHARS))), "{e}");
        assert_eq!(cut("a\nb\x1b[31m"), "a\\nb\\u{1b}[31m");
        let name = "x".repeat(5000);
        assert!(slot_name(Some(&name)).unwrap_err().to_string().len() < 200);
    }

    #[test]
    fn a_holder_with_a_control_character_is_refused() {
        for bad in ["line1\nline2", "tab\there", "bell\x07", "esc\x1b[2J"] {
            assert!(matches!(holder(Some(bad)), Err(GuardError::HolderControl)), "{bad:?}");
        }
        assert_eq!(holder(Some("nightly — host b2")).unwrap(), Some("nightly — host b2"));
        assert_eq!(for_log("a\nb"), "a\\nb");
    }
}
