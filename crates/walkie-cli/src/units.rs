//! Values given on the command line: sizes ("64K", "16MiB") and durations
//! ("500ms", "10s", "2m"). Errors name the accepted forms; clap adds the flag.

use std::time::Duration;

/// Parses a byte size: a number with an optional K, M or G suffix (powers
/// of 1024; "KiB" and "KB" are accepted too).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if !num.is_empty() && unit.starts_with(['.', ',']) {
        return Err(format!(
            "`{s}`: sizes are whole numbers (use a smaller unit: 1536K, not 1.5M)"
        ));
    }
    let n: usize = num.parse().map_err(|e: std::num::ParseIntError| {
        if *e.kind() == std::num::IntErrorKind::PosOverflow {
            format!("`{s}` is too large")
        } else {
            format!("`{s}` is not a size (examples: 65536, 64K, 16M)")
        }
    })?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("`{s}`: unknown size unit (use K, M or G)")),
    };
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))?;
    if bytes == 0 {
        return Err("must be at least 1 byte".into());
    }
    Ok(bytes)
}

/// Parses a duration: a number with a unit (ms, s, m, h); a bare number is
/// seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (examples: 500ms, 10s, 2m)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("`{s}`: unknown duration unit (use ms, s, m or h)")),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a duration that must be more than zero: for waits where zero
/// would fail every attempt (`--handshake-timeout 0` would answer every
/// request with 408) or end before starting.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("`{s}`: must be more than 0"));
    }
    Ok(d)
}

/// A duration that can be turned off (a newtype, so that clap does not read
/// the `Option` as "flag may be absent").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Toggle(pub Option<Duration>);

/// Parses a positive duration; "off" (or "0") disables it.
pub fn parse_optional_duration(s: &str) -> Result<Toggle, String> {
    match s.trim() {
        "0" | "off" | "none" => Ok(Toggle(None)),
        other => parse_duration(other).and_then(|d| {
            if d.is_zero() {
                Err("must be positive, or `off`".into())
            } else {
                Ok(Toggle(Some(d)))
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12X").unwrap_err().contains("unit"));
        assert!(parse_size("abc").is_err());
        assert!(parse_size("1.5M").unwrap_err().contains("whole numbers"));
        assert!(parse_size("1,5M").unwrap_err().contains("whole numbers"));
        let huge = parse_size("99999999999999999999999").unwrap_err();
        assert!(huge.contains("too large"), "{huge}");
        assert!(
            parse_size("99999999999G")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("5 days").is_err());
        assert_eq!(parse_optional_duration("off"), Ok(Toggle(None)));
        assert!(parse_optional_duration("0s").is_err());
        assert_eq!(parse_positive_duration("1ms"), Ok(Duration::from_millis(1)));
        for zero in ["0", "0s", "0ms", "0.0"] {
            let e = parse_positive_duration(zero).unwrap_err();
            assert!(e.contains("more than 0"), "{zero}: {e}");
        }
    }
}
