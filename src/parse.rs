//! Small parsers for the ways providers say "wait this long".
//!
//! Every parser here is total: it returns `None` for input it does not understand and
//! saturates absurd values (`99999999999h` is "a very long time", never a panic or an
//! overflow). None of them allocates.

use std::time::{Duration, SystemTime};

/// The longest wait any parser reports: about 31 years. Longer values saturate here.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(1_000_000_000);

fn saturate(d: Duration) -> Duration {
    d.min(MAX_WAIT)
}

/// Parses a Go-style duration as Groq and OpenAI send in `x-ratelimit-reset-*` headers and
/// "try again in …" messages: `2m59.56s`, `7.66s`, `6m0s`, `1h`, `500ms`, `12ms`,
/// `1.984999999s`, `1h2m3s`, `250us`, `10ns`. A bare number is taken as seconds (`"2"`), as
/// some providers send it.
pub(crate) fn go_duration(s: &str) -> Option<Duration> {
    let s = s.trim().as_bytes();
    if s.is_empty() {
        return None;
    }
    // A bare number (possibly fractional) means seconds.
    if s.iter().all(|b| b.is_ascii_digit() || *b == b'.') {
        return seconds(s);
    }
    let mut total = Duration::ZERO;
    let mut i = 0;
    while i < s.len() {
        let start = i;
        while i < s.len() && (s[i].is_ascii_digit() || s[i] == b'.') {
            i += 1;
        }
        if start == i {
            return None;
        }
        let number = &s[start..i];
        let unit_start = i;
        while i < s.len() && s[i].is_ascii_alphabetic() || (i < s.len() && s[i] == 0xC2) {
            // 0xC2 0xB5 is 'µ' in UTF-8; accept it as part of the unit.
            i += if s[i] == 0xC2 { 2 } else { 1 };
        }
        let unit = s.get(unit_start..i)?;
        let nanos_per_unit: u128 = match unit {
            b"h" => 3_600_000_000_000,
            b"m" => 60_000_000_000,
            b"s" => 1_000_000_000,
            b"ms" => 1_000_000,
            b"us" | b"\xC2\xB5s" => 1_000,
            b"ns" => 1,
            _ => return None,
        };
        let part = scaled(number, nanos_per_unit)?;
        total = total.saturating_add(part);
    }
    Some(saturate(total))
}

/// `number` (digits with at most one '.') times `unit` nanoseconds, saturating.
fn scaled(number: &[u8], unit: u128) -> Option<Duration> {
    let mut whole: u128 = 0;
    let mut frac: u128 = 0;
    let mut frac_scale: u128 = 1;
    let mut seen_dot = false;
    let mut digits = 0;
    for &b in number {
        match b {
            b'.' if !seen_dot => seen_dot = true,
            b'0'..=b'9' => {
                digits += 1;
                let d = u128::from(b - b'0');
                if seen_dot {
                    // Digits past nanosecond precision cannot matter.
                    if frac_scale < 1_000_000_000_000_000_000 {
                        frac = frac * 10 + d;
                        frac_scale *= 10;
                    }
                } else {
                    whole = whole.saturating_mul(10).saturating_add(d);
                }
            }
            _ => return None,
        }
    }
    if digits == 0 {
        return None;
    }
    let nanos = whole
        .saturating_mul(unit)
        .saturating_add(frac.saturating_mul(unit) / frac_scale);
    Some(nanos_to_duration(nanos))
}

fn nanos_to_duration(nanos: u128) -> Duration {
    let secs = nanos / 1_000_000_000;
    if secs >= u128::from(MAX_WAIT.as_secs()) {
        return MAX_WAIT;
    }
    Duration::new(secs as u64, (nanos % 1_000_000_000) as u32)
}

/// Parses a number of seconds, integer or fractional (`"2"`, `"0.5"`, `"58.934310785"`).
pub(crate) fn seconds(s: &[u8]) -> Option<Duration> {
    let s = trim(s);
    if s.is_empty() {
        return None;
    }
    scaled(s, 1_000_000_000).map(saturate)
}

/// Parses a number of milliseconds, integer or fractional (`retry-after-ms: 1500`).
pub(crate) fn millis(s: &[u8]) -> Option<Duration> {
    let s = trim(s);
    if s.is_empty() {
        return None;
    }
    scaled(s, 1_000_000).map(saturate)
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &s[start..end]
}

/// Parses a `Retry-After` value per RFC 9110: delay-seconds (fractions accepted, as the
/// official SDKs do) or an HTTP date, measured against `now`. A date that is not in the
/// future is no hint (`None`): a second of clock skew must not make a key look free now.
pub(crate) fn retry_after(value: &[u8], now: impl FnOnce() -> SystemTime) -> Option<Duration> {
    if let Some(d) = seconds(value) {
        return Some(d);
    }
    let text = std::str::from_utf8(value).ok()?;
    let when = httpdate::parse_http_date(text.trim()).ok()?;
    when.duration_since(now())
        .ok()
        .filter(|d| !d.is_zero())
        .map(saturate)
}

/// Parses an RFC 3339 timestamp (`2024-03-26T20:00:00Z`, `2026-09-01T00:00:00.5+02:00`), as
/// Anthropic sends in `anthropic-ratelimit-*-reset`, and returns the time left until it.
pub(crate) fn rfc3339_until(value: &[u8], now: SystemTime) -> Option<Duration> {
    let unix = rfc3339_unix_nanos(trim(value))?;
    let now_nanos = match now.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(_) => return None,
    };
    let left = unix - now_nanos;
    if left <= 0 {
        return Some(Duration::ZERO);
    }
    Some(nanos_to_duration(left as u128))
}

/// Nanoseconds since the Unix epoch of an RFC 3339 timestamp.
fn rfc3339_unix_nanos(s: &[u8]) -> Option<i128> {
    fn num(s: &[u8]) -> Option<i64> {
        if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(s.iter().fold(0i64, |a, b| a * 10 + i64::from(b - b'0')))
    }
    if s.len() < 20 {
        return None;
    }
    let year = num(s.get(0..4)?)?;
    let month = num(s.get(5..7)?)?;
    let day = num(s.get(8..10)?)?;
    let hour = num(s.get(11..13)?)?;
    let minute = num(s.get(14..16)?)?;
    let second = num(s.get(17..19)?)?;
    if s[4] != b'-' || s[7] != b'-' || !matches!(s[10], b'T' | b't' | b' ') {
        return None;
    }
    if s[13] != b':' || s[16] != b':' {
        return None;
    }
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos: i128 = 0;
    if s.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        let mut scale: i128 = 100_000_000;
        while i < s.len() && s[i].is_ascii_digit() {
            nanos += i128::from(s[i] - b'0') * scale;
            scale /= 10;
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let offset_secs: i64 = match s.get(i..)? {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let h = num(&[*h1, *h2])?;
            let m = num(&[*m1, *m2])?;
            let o = h * 3600 + m * 60;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(i128::from(secs) * 1_000_000_000 + nanos)
}

/// Anthropic's monthly spend cap names the moment access returns in its message: "You will
/// regain access on 2026-09-01 at 00:00 UTC." The time left until then (zero once past), or
/// `None` when the message does not say it in that form.
pub(crate) fn regain_access(message: &[u8], now: SystemTime) -> Option<Duration> {
    const MARK: &[u8] = b"regain access on ";
    let at = rfind_ci(message, MARK)?;
    let rest = &message[at + MARK.len()..];
    // `YYYY-MM-DD at HH:MM UTC`
    let date = rest.get(..10)?;
    let rest = rest.get(10..)?.strip_prefix(b" at ")?;
    let time = rest.get(..5)?;
    if !rest.get(5..)?.starts_with(b" UTC") {
        return None;
    }
    let mut stamp = [0u8; 20];
    stamp[..10].copy_from_slice(date);
    stamp[10] = b'T';
    stamp[11..16].copy_from_slice(time);
    stamp[16..].copy_from_slice(b":00Z");
    rfc3339_until(&stamp, now)
}

/// OpenRouter's `X-RateLimit-Reset`: the end of the window as milliseconds since the Unix
/// epoch (`1790812800000`). The time left until then; `None` when it is not such a number or
/// already past.
pub(crate) fn epoch_millis_until(value: &[u8], now: SystemTime) -> Option<Duration> {
    let value = trim(value);
    if value.is_empty() || value.len() > 16 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let ms = value.iter().fold(0u64, |a, b| a * 10 + u64::from(b - b'0'));
    let at = SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms))?;
    at.duration_since(now)
        .ok()
        .filter(|d| !d.is_zero())
        .map(saturate)
}

/// The time from `now` until the next midnight in the US Pacific time zone, when Gemini's
/// per-day quotas reset: 08:00 UTC in standard time, 07:00 UTC in daylight time (from the
/// second Sunday of March to the first Sunday of November, switching at 02:00 local time).
pub(crate) fn until_pacific_midnight(now: SystemTime) -> Duration {
    const HOUR: i64 = 3600;
    const DAY: i64 = 86_400;
    let Ok(since) = now.duration_since(SystemTime::UNIX_EPOCH) else {
        return Duration::ZERO;
    };
    // Past some 146 billion years the sums below would overflow: a clock that far off gets
    // a day, the length of the quota's window.
    let Some(t) = i64::try_from(since.as_secs())
        .ok()
        .filter(|t| *t <= i64::MAX / 2)
    else {
        return Duration::from_secs(DAY as u64);
    };
    // The Sundays that start and end daylight time in `year`, as days since the epoch.
    let sundays = |year: i64| {
        let march_1 = days_from_civil(year, 3, 1);
        let nov_1 = days_from_civil(year, 11, 1);
        let first_sunday = |d: i64| d + (7 - weekday(d)) % 7;
        (first_sunday(march_1) + 7, first_sunday(nov_1))
    };
    // The offset now: daylight time runs from 10:00 UTC of its first day to 09:00 UTC of
    // its last (02:00 local on both).
    let (year, _, _) = civil_from_days((t - 8 * HOUR).div_euclid(DAY));
    let (start, end) = sundays(year);
    let dst_now = (start * DAY + 10 * HOUR..end * DAY + 9 * HOUR).contains(&t);
    let offset = if dst_now { -7 * HOUR } else { -8 * HOUR };
    // The next local midnight, and the offset in force then: daylight time at midnight of
    // the days after its first Sunday up to and including its last.
    let midnight = ((t + offset).div_euclid(DAY) + 1) * DAY;
    let day = midnight / DAY;
    let (year, _, _) = civil_from_days(day);
    let (start, end) = sundays(year);
    let offset = if day > start && day <= end {
        -7 * HOUR
    } else {
        -8 * HOUR
    };
    let at = midnight - offset;
    let left = Duration::from_secs((at - t).max(0) as u64);
    left.saturating_sub(Duration::from_nanos(u64::from(since.subsec_nanos())))
}

/// The day of the week of a day since the epoch: 0 for Sunday (1970-01-01 was a Thursday).
fn weekday(days: i64) -> i64 {
    (days + 4).rem_euclid(7)
}

/// The proleptic Gregorian date of a day since the epoch (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// ASCII case-insensitive search of `needle` in `hay`.
pub(crate) fn find_ci(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    if needle.len() > hay.len() {
        return None;
    }
    let first = needle[0].to_ascii_lowercase();
    (0..=hay.len() - needle.len()).find(|&i| {
        hay[i].to_ascii_lowercase() == first
            && hay[i..i + needle.len()].eq_ignore_ascii_case(needle)
    })
}

/// The position of the last occurrence of `needle` in `hay` (case-sensitive).
pub(crate) fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || needle.len() > hay.len() {
        return None;
    }
    let first = needle[0];
    (0..=hay.len() - needle.len())
        .rev()
        .find(|&i| hay[i] == first && &hay[i..i + needle.len()] == needle)
}

/// ASCII case-insensitive search of the last `needle` in `hay`.
fn rfind_ci(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || needle.len() > hay.len() {
        return None;
    }
    let first = needle[0].to_ascii_lowercase();
    (0..=hay.len() - needle.len()).rev().find(|&i| {
        hay[i].to_ascii_lowercase() == first
            && hay[i..i + needle.len()].eq_ignore_ascii_case(needle)
    })
}

/// Finds a wait hint in an error message or body: "try again in 5.289s", "Please retry in
/// 58.93s", "retry after 6 seconds", or a google.rpc `"retryDelay": "15s"`. Of each phrase the
/// last one counts: a provider's own hint ends its message, after any text it quotes.
pub(crate) fn body_hint(body: &[u8]) -> Option<Duration> {
    for marker in [&b"try again in "[..], b"retry in "] {
        if let Some(at) = rfind_ci(body, marker) {
            let rest = &body[at + marker.len()..];
            let token = token(rest, |b| b.is_ascii_alphanumeric() || b == b'.');
            let token = token.strip_suffix(b".").unwrap_or(token);
            if let Some(d) = std::str::from_utf8(token).ok().and_then(go_duration) {
                return Some(d);
            }
        }
    }
    if let Some(at) = rfind_ci(body, b"retry after ") {
        let rest = &body[at + b"retry after ".len()..];
        let number = token(rest, |b| b.is_ascii_digit() || b == b'.');
        let after = trim(&rest[number.len()..]);
        if after.len() >= 3 && after[..3].eq_ignore_ascii_case(b"sec") {
            if let Some(d) = seconds(number) {
                return Some(d);
            }
        }
    }
    if let Some(at) = find_ci(body, b"\"retryDelay\"") {
        let rest = &body[at + b"\"retryDelay\"".len()..];
        let rest = trim(rest).strip_prefix(b":").map(trim)?;
        let rest = rest.strip_prefix(b"\"")?;
        let end = rest.iter().position(|&b| b == b'"')?;
        return std::str::from_utf8(&rest[..end]).ok().and_then(go_duration);
    }
    None
}

fn token(s: &[u8], keep: impl Fn(u8) -> bool) -> &[u8] {
    let end = s.iter().position(|&b| !keep(b)).unwrap_or(s.len());
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(stamp: &str) -> SystemTime {
        let nanos = rfc3339_unix_nanos(stamp.as_bytes()).unwrap();
        SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos as u64)
    }

    #[test]
    fn pacific_midnight_in_standard_and_daylight_time() {
        let h = |n: u64| Duration::from_secs(n * 3600);
        let m = |n: u64| Duration::from_secs(n * 60);
        // 11:00 PST: midnight PST is 08:00 UTC the next day.
        assert_eq!(until_pacific_midnight(at("2026-12-01T19:00:00Z")), h(13));
        // 23:30 PDT on June 30: midnight PDT is 07:00 UTC.
        assert_eq!(until_pacific_midnight(at("2026-07-01T06:30:00Z")), m(30));
        // 00:00 PST exactly: the next midnight, a day later.
        assert_eq!(until_pacific_midnight(at("2026-01-15T08:00:00Z")), h(24));
        // Saturday 2026-03-07 20:00 PST; daylight time starts Sunday 2026-03-08 at 02:00, so
        // Sunday's midnight is still standard time (08:00 UTC), and Monday's is daylight time.
        assert_eq!(until_pacific_midnight(at("2026-03-08T04:00:00Z")), h(4));
        assert_eq!(until_pacific_midnight(at("2026-03-08T12:00:00Z")), h(19));
        // Saturday 2026-10-31 20:00 PDT; daylight time ends Sunday 2026-11-01 at 02:00: that
        // Sunday's midnight is daylight time (07:00 UTC), Monday's standard time (08:00 UTC).
        assert_eq!(until_pacific_midnight(at("2026-11-01T03:00:00Z")), h(4));
        assert_eq!(until_pacific_midnight(at("2026-11-01T12:00:00Z")), h(20));
        // Sub-second parts count.
        assert_eq!(
            until_pacific_midnight(at("2026-12-01T19:00:00.250Z")),
            h(13) - Duration::from_millis(250)
        );
        assert_eq!(
            until_pacific_midnight(SystemTime::UNIX_EPOCH - h(1)),
            Duration::ZERO
        );
    }

    #[test]
    fn pacific_midnight_is_total_for_far_future_clocks() {
        for secs in [i64::MAX as u64, i64::MAX as u64 - 3600, u64::MAX >> 2] {
            if let Some(t) = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs)) {
                assert!(until_pacific_midnight(t) <= Duration::from_secs(25 * 3600));
            }
        }
    }

    #[test]
    fn anthropic_regain_access_date() {
        let msg = b"You have reached your API usage limits: your organization has crossed its monthly API usage threshold, set based on your organization's API tier. You will regain access on 2026-09-01 at 00:00 UTC.";
        assert_eq!(
            regain_access(msg, at("2026-08-31T12:00:00Z")),
            Some(Duration::from_secs(12 * 3600))
        );
        assert_eq!(
            regain_access(msg, at("2026-09-02T00:00:00Z")),
            Some(Duration::ZERO)
        );
        assert_eq!(
            regain_access(b"You will regain access on 2026-09-01.", SystemTime::now()),
            None
        );
        assert_eq!(
            regain_access(
                b"regain access on 2026-13-01 at 00:00 UTC",
                SystemTime::now()
            ),
            None
        );
        assert_eq!(
            regain_access(
                b"regain access on 2026-09-01 at 00:00 PST",
                SystemTime::now()
            ),
            None
        );
        assert_eq!(regain_access(b"regain access on ", SystemTime::now()), None);
    }

    #[test]
    fn openrouter_epoch_millis() {
        let now = at("2026-09-30T12:00:00Z");
        // 1790812800000 is 2026-10-01T00:00:00Z.
        assert_eq!(
            epoch_millis_until(b"1790812800000", now),
            Some(Duration::from_secs(12 * 3600))
        );
        assert_eq!(
            epoch_millis_until(b"1790812800000", at("2026-10-02T00:00:00Z")),
            None
        );
        assert_eq!(epoch_millis_until(b"17908128e5", now), None);
        assert_eq!(epoch_millis_until(b"", now), None);
        assert_eq!(epoch_millis_until(b"99999999999999999999", now), None);
        assert_eq!(epoch_millis_until(b"9999999999999999", now), Some(MAX_WAIT));
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn go_durations_from_providers() {
        assert_eq!(go_duration("2m59.56s"), Some(ms(179_560)));
        assert_eq!(go_duration("7.66s"), Some(ms(7_660)));
        assert_eq!(go_duration("59.66s"), Some(ms(59_660)));
        assert_eq!(go_duration("6m0s"), Some(ms(360_000)));
        assert_eq!(go_duration("1s"), Some(ms(1_000)));
        assert_eq!(go_duration("12ms"), Some(ms(12)));
        assert_eq!(go_duration("500ms"), Some(ms(500)));
        assert_eq!(go_duration("1h"), Some(ms(3_600_000)));
        assert_eq!(go_duration("1h2m3s"), Some(ms(3_723_000)));
        assert_eq!(go_duration("9m38.016s"), Some(ms(578_016)));
        assert_eq!(
            go_duration("1m47.5854s"),
            Some(Duration::new(107, 585_400_000))
        );
        assert_eq!(
            go_duration("1.984999999s"),
            Some(Duration::new(1, 984_999_999))
        );
        assert_eq!(go_duration("250us"), Some(Duration::from_micros(250)));
        assert_eq!(go_duration("250µs"), Some(Duration::from_micros(250)));
        assert_eq!(go_duration("2"), Some(ms(2_000)));
    }

    #[test]
    fn go_durations_reject_garbage() {
        for bad in ["", "s", "1x", "abc", "1.2.3s", "-1s", "1 s", "m5", "5m s"] {
            assert_eq!(go_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn absurd_values_saturate() {
        assert_eq!(go_duration("99999999999h"), Some(MAX_WAIT));
        assert_eq!(
            go_duration("340282366920938463463374607431768211456h"),
            Some(MAX_WAIT)
        );
        assert_eq!(seconds(b"99999999999999999999999999999999"), Some(MAX_WAIT));
        assert_eq!(millis(b"1e9"), None);
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(retry_after(b"120", || now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(b" 2 ", || now), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(b"1.5", || now), Some(ms(1_500)));
        assert_eq!(
            retry_after(b"Sun, 06 Nov 1994 08:50:07 GMT", || now),
            Some(Duration::from_secs(30))
        );
        // A date in the past, or now, is no hint: the configured cooldown applies.
        assert_eq!(retry_after(b"Sun, 06 Nov 1994 08:00:00 GMT", || now), None);
        assert_eq!(retry_after(b"Sun, 06 Nov 1994 08:49:37 GMT", || now), None);
        assert_eq!(retry_after(b"soon", || now), None);
        assert_eq!(millis(b"1500"), Some(ms(1_500)));
        assert_eq!(millis(b"0.5"), Some(Duration::from_micros(500)));
    }

    #[test]
    fn rfc3339_timestamps() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_711_483_200 - 90); // 2024-03-26T19:58:30Z
        assert_eq!(
            rfc3339_until(b"2024-03-26T20:00:00Z", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            rfc3339_until(b"2024-03-26T22:00:00.5+02:00", now),
            Some(ms(90_500))
        );
        assert_eq!(
            rfc3339_until(b"2020-01-01T00:00:00Z", now),
            Some(Duration::ZERO)
        );
        for bad in [
            &b"2024-13-01T00:00:00Z"[..],
            b"2024-03-26",
            b"2024-03-26T20:00:00",
            b"x",
        ] {
            assert_eq!(rfc3339_until(bad, now), None);
        }
    }

    #[test]
    fn hints_in_bodies() {
        let groq = br#"{"error":{"message":"Rate limit reached ... Please try again in 5.289s. Visit https://console.groq.com","type":"tokens"}}"#;
        assert_eq!(body_hint(groq), Some(ms(5_289)));
        let tpd = b"Please try again in 9m38.016s. Need more tokens?";
        assert_eq!(body_hint(tpd), Some(ms(578_016)));
        let gemini_msg = b"Please retry in 58.934310785s.";
        assert_eq!(body_hint(gemini_msg), Some(Duration::new(58, 934_310_785)));
        let azure = b"Please retry after 86400 seconds. Please go here";
        assert_eq!(body_hint(azure), Some(Duration::from_secs(86_400)));
        let rpc = br#"{"@type":"type.googleapis.com/google.rpc.RetryInfo", "retryDelay" : "15s"}"#;
        assert_eq!(body_hint(rpc), Some(ms(15_000)));
        assert_eq!(body_hint(b"Please try again in 644ms."), Some(ms(644)));
        assert_eq!(body_hint(b"nothing to see"), None);
        assert_eq!(body_hint(b"try again in"), None);
        // Quoted text first, the provider's own hint last.
        let quoted =
            b"Rate limit reached for model `try again in 99999h` ... Please try again in 2s.";
        assert_eq!(body_hint(quoted), Some(ms(2_000)));
    }

    /// Arbitrary bytes never make a parser panic, and what parses stays within bounds.
    #[test]
    fn parsers_are_total_on_arbitrary_input() {
        let alphabet = b"0123456789.:-+ TZhmsun\xC2\xB5\"retryDelay againinafter secondsGMTSun,Nov";
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 40) as usize;
            let input: Vec<u8> = (0..len)
                .map(|i| {
                    let r = state.rotate_left(i as u32 * 7);
                    if r.is_multiple_of(5) {
                        (r >> 8) as u8
                    } else {
                        alphabet[(r >> 16) as usize % alphabet.len()]
                    }
                })
                .collect();
            let text = String::from_utf8_lossy(&input);
            for d in [
                go_duration(&text),
                seconds(&input),
                millis(&input),
                retry_after(&input, || now),
                rfc3339_until(&input, now),
                body_hint(&input),
            ]
            .into_iter()
            .flatten()
            {
                assert!(d <= MAX_WAIT, "{text:?} gave {d:?}");
            }
        }
    }

    #[test]
    fn case_insensitive_find() {
        assert_eq!(find_ci(b"Hello World", b"world"), Some(6));
        assert_eq!(find_ci(b"abc", b"abcd"), None);
        assert_eq!(find_ci(b"abc", b""), Some(0));
    }
}
