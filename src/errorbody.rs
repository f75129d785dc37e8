//! What a provider's error body asserts: the few fields of its JSON error envelope that
//! classification reads, found by a small scanner that is lenient and scoped.
//!
//! - **Scoped.** A field counts only at its place in a provider's envelope (`error.code`,
//!   `error.details[].reason`, a top-level `message`, …), never inside a string (where
//!   providers quote the request's own text: OpenAI's `Invalid value: 'invalid_api_key'`)
//!   and never deeper in the tree (where a validation error may echo the request's JSON).
//! - **Lenient.** Error bodies are often not whole JSON: cut at the inspection limit, cut by
//!   a stalled stream, or elided. The scanner takes fields as it meets them and stops where
//!   the text stops making sense; it never fails and never allocates.
//!
//! A JSON parser would reject exactly the bodies that matter when a read is cut short, which
//! is why this is a scanner and not `serde_json`.

/// One step of the path to a value: an object member or an array element.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Seg<'a> {
    Key(&'a [u8]),
    Item,
}

/// How deep a path the fields of interest lie at most; deeper values are passed over.
const DEPTH: usize = 8;

/// The fields of an error body that classification reads, as raw (still escaped) bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ErrorFields<'a> {
    /// The body starts as JSON does (`{` or `[` after white space): a provider's API
    /// answered, not an edge's HTML or plain-text page.
    pub(crate) json: bool,
    /// `error.code`, else a top-level `code` (a string or a number).
    pub(crate) code: Option<&'a [u8]>,
    /// `error.type`, else a top-level `type` other than Anthropic's `"error"`.
    pub(crate) kind: Option<&'a [u8]>,
    /// `error.status` (google.rpc: `RESOURCE_EXHAUSTED`, `PERMISSION_DENIED`, …).
    pub(crate) status: Option<&'a [u8]>,
    /// `error.message`, else a top-level `message` or `detail`.
    pub(crate) message: Option<&'a [u8]>,
    /// Anthropic's `error.details.error_code`.
    pub(crate) error_code: Option<&'a [u8]>,
    /// google.rpc `ErrorInfo.reason` is `API_KEY_INVALID`.
    pub(crate) api_key_invalid: bool,
    /// A google.rpc `QuotaFailure` violation's `quotaId` names a daily quota (`…PerDay…`).
    pub(crate) per_day_quota: bool,
    /// google.rpc `RetryInfo.retryDelay` (`"15s"`) in `error.details`, or `error.retryDelay`.
    pub(crate) retry_delay: Option<&'a [u8]>,
    /// OpenRouter's moderation answer: `error.metadata.flagged_input` or `.reasons`.
    pub(crate) flagged: bool,
}

impl<'a> ErrorFields<'a> {
    /// Reads what `body` asserts. Any input is fine: what is not understood is left out.
    pub(crate) fn scan(body: &'a [u8]) -> ErrorFields<'a> {
        let mut fields = ErrorFields {
            json: matches!(body.trim_ascii_start().first(), Some(b'{' | b'[')),
            ..ErrorFields::default()
        };
        if fields.json {
            walk(body, |path, value| fields.take(path, value));
        }
        fields
    }

    fn take(&mut self, path: &[Seg<'a>], value: &'a [u8]) {
        use Seg::{Item, Key};
        // The OpenAI-compatible Gemini endpoint wraps its error in an array.
        let path = match path {
            [Item, rest @ ..] => rest,
            _ => path,
        };
        let first = |slot: &mut Option<&'a [u8]>| {
            if slot.is_none() {
                *slot = Some(value);
            }
        };
        match path {
            [Key(b"error"), Key(b"code")] => self.code = Some(value),
            [Key(b"error"), Key(b"type")] => self.kind = Some(value),
            [Key(b"error"), Key(b"status")] => self.status = Some(value),
            [Key(b"error"), Key(b"message")] => self.message = Some(value),
            [Key(b"error"), Key(b"details"), Key(b"error_code")] => self.error_code = Some(value),
            [Key(b"error"), Key(b"details"), Item, Key(b"reason")] => {
                self.api_key_invalid |= value == b"API_KEY_INVALID";
            }
            [Key(b"error"), Key(b"details"), Item, Key(b"retryDelay")]
            | [Key(b"error"), Key(b"retryDelay")] => first(&mut self.retry_delay),
            [Key(b"error"), Key(b"details"), Item, Key(b"violations"), Item, Key(b"quotaId")] => {
                self.per_day_quota |= contains(value, b"PerDay");
            }
            [Key(b"error"), Key(b"metadata"), Key(b"flagged_input" | b"reasons"), ..] => {
                self.flagged = true;
            }
            [Key(b"code")] => first(&mut self.code),
            [Key(b"type")] if value != b"error" => first(&mut self.kind),
            [Key(b"message" | b"detail")] => first(&mut self.message),
            _ => {}
        }
    }

    /// Whether `error.code` or `error.type` is one of `names`.
    pub(crate) fn code_or_kind_in(&self, names: &[&str]) -> bool {
        let is = |v: Option<&[u8]>| v.is_some_and(|v| names.iter().any(|n| n.as_bytes() == v));
        is(self.code) || is(self.kind)
    }

    /// Whether the provider's message starts with one of `starts` (ASCII case-insensitive):
    /// an anchored match, so text the provider quotes later in its message cannot match.
    pub(crate) fn message_starts_with(&self, starts: &[&str]) -> bool {
        self.message.is_some_and(|m| {
            starts
                .iter()
                .any(|s| m.len() >= s.len() && m[..s.len()].eq_ignore_ascii_case(s.as_bytes()))
        })
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Calls `visit` with the path and raw bytes of every scalar (string contents without the
/// quotes, or a number or literal) at most [`DEPTH`] deep, in document order. Stops at the
/// end of the input, at an unterminated string, or past 64 levels of nesting.
pub(crate) fn walk<'a>(body: &'a [u8], mut visit: impl FnMut(&[Seg<'a>], &'a [u8])) {
    // The open containers: whether each is an object. `path[k - 1]` is how the k-th open
    // container (the root is the 0th) was reached from its parent, for the first DEPTH.
    let mut objects = [false; 64];
    let mut depth = 0usize;
    let mut path: [Seg<'a>; DEPTH] = [Seg::Item; DEPTH];
    // In an object: the member name just read, and whether a name comes next.
    let mut key: &'a [u8] = b"";
    let mut expect_key = false;
    // The step from the innermost open container to a value in it.
    let step = |depth: usize, objects: &[bool; 64], key: &'a [u8]| match depth {
        0 => None,
        d if objects[d - 1] => Some(Seg::Key(key)),
        _ => Some(Seg::Item),
    };
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        let mut value: Option<&'a [u8]> = None;
        match b {
            b'{' | b'[' => {
                if depth == objects.len() {
                    return;
                }
                if let Some(seg) = step(depth, &objects, key) {
                    if depth <= DEPTH {
                        path[depth - 1] = seg;
                    }
                }
                objects[depth] = b == b'{';
                depth += 1;
                expect_key = b == b'{';
                key = b"";
                i += 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                expect_key = false;
                i += 1;
            }
            b',' => {
                expect_key = depth > 0 && objects[depth - 1];
                key = b"";
                i += 1;
            }
            b':' => {
                expect_key = false;
                i += 1;
            }
            b'"' => {
                let start = i + 1;
                let Some(len) = string_len(&body[start..]) else {
                    return;
                };
                i = start + len + 1;
                let text = &body[start..start + len];
                if expect_key {
                    key = text;
                    expect_key = false;
                } else {
                    value = Some(text);
                }
            }
            b if b.is_ascii_whitespace() => i += 1,
            _ => {
                let start = i;
                while i < body.len() && !b",:{}[]\" \t\r\n".contains(&body[i]) {
                    i += 1;
                }
                if !expect_key {
                    value = Some(&body[start..i]);
                }
            }
        }
        if let (Some(text), Some(seg)) = (value, step(depth, &objects, key)) {
            if depth <= DEPTH {
                path[depth - 1] = seg;
                visit(&path[..depth], text);
            }
        }
    }
}

/// The length of a JSON string's contents (up to the closing quote, escapes skipped), or
/// `None` when it is not closed.
fn string_len(s: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'"' => return Some(i),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(b: Option<&[u8]>) -> Option<&str> {
        b.map(|b| std::str::from_utf8(b).unwrap())
    }

    #[test]
    fn openai_envelope() {
        let f = ErrorFields::scan(
            br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
        );
        assert!(f.json);
        assert_eq!(s(f.kind), Some("insufficient_quota"));
        assert_eq!(s(f.code), Some("insufficient_quota"));
        assert_eq!(s(f.message), Some("You exceeded your current quota"));
    }

    #[test]
    fn quoted_request_text_is_not_a_field() {
        let f = ErrorFields::scan(
            br#"{"error":{"message":"Invalid value: 'invalid_api_key' \"code\":\"invalid_api_key\"","type":"invalid_request_error","param":"messages[0].role","code":"invalid_value"}}"#,
        );
        assert_eq!(s(f.code), Some("invalid_value"));
        assert_eq!(s(f.kind), Some("invalid_request_error"));
    }

    #[test]
    fn echoed_request_json_deeper_in_the_tree_is_not_a_field() {
        let f = ErrorFields::scan(
            br#"{"error":{"message":"bad","param":{"code":"invalid_api_key","error":{"code":"x"}}},"detail":[{"input":{"error":{"code":"invalid_api_key"}}}]}"#,
        );
        assert_eq!(f.code, None);
        assert_eq!(s(f.message), Some("bad"));
    }

    #[test]
    fn google_rpc_details() {
        let f = ErrorFields::scan(
            br#"[{"error":{"code":429,"message":"m","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]},{"@type":"x.RetryInfo","retryDelay":"5s"},{"reason":"API_KEY_INVALID"}]}}]"#,
        );
        assert_eq!(s(f.code), Some("429"));
        assert_eq!(s(f.status), Some("RESOURCE_EXHAUSTED"));
        assert!(f.per_day_quota);
        assert!(f.api_key_invalid);
        assert_eq!(s(f.retry_delay), Some("5s"));
    }

    #[test]
    fn anthropic_and_mistral_and_openrouter() {
        let a = ErrorFields::scan(
            br#"{"type":"error","error":{"type":"rate_limit_error","message":"m","details":{"error_code":"enforced_spend_limit_reached"}}}"#,
        );
        assert_eq!(s(a.kind), Some("rate_limit_error"));
        assert_eq!(s(a.error_code), Some("enforced_spend_limit_reached"));
        let m = ErrorFields::scan(br#"{"detail":"Unauthorized"}"#);
        assert_eq!(s(m.message), Some("Unauthorized"));
        let o = ErrorFields::scan(
            br#"{"error":{"code":403,"message":"flagged","metadata":{"reasons":["violence"],"flagged_input":"..."}}}"#,
        );
        assert!(o.flagged);
    }

    #[test]
    fn a_cut_body_keeps_what_came_before_the_cut() {
        let f = ErrorFields::scan(br#"{"error":{"type":"tokens","code":"rate_limit_exceeded","message":"Rate limit reached for mo"#);
        assert_eq!(s(f.code), Some("rate_limit_exceeded"));
        assert_eq!(f.message, None);
        let html = ErrorFields::scan(b"<!DOCTYPE html><title>Attention Required!</title>");
        assert!(!html.json);
        assert_eq!(
            ErrorFields::scan(b"error code: 1020"),
            ErrorFields::default()
        );
    }

    #[test]
    fn deep_and_hostile_nesting_is_total() {
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        let _ = ErrorFields::scan(deep.as_bytes());
        let _ = ErrorFields::scan(b"{\"error\":{\"code\":\"\\");
        let _ = ErrorFields::scan(b"}}}]]]{\"error\"::::\"code\"");
        let _ = ErrorFields::scan(b"{\"a\\\"b\":1,\"error\":{\"code\":\"x\"}}");
        assert_eq!(
            s(ErrorFields::scan(b"  {\"error\":{\"code\":\"x\"}}").code),
            Some("x")
        );
    }
}
