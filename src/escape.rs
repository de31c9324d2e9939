//! Text from outside (etcd keys and values, files, the wire) printed for a person: control
//! characters (a newline that forges a log line or a table row, an escape sequence that rewrites
//! the operator's terminal) and backslashes are shown escaped, Rust-style, so what is printed is
//! one line that says exactly what was stored. Anything else, non-ASCII included, is printed as is.

use std::borrow::Cow;
use std::fmt;

/// Whether `c` must be shown escaped. Bidirectional overrides and isolates are escaped too: they
/// reorder how the rest of a line reads without being visible themselves.
fn needs_escape(c: char) -> bool {
    c == '\\' || c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every control character escaped; borrowed when nothing needed it (the usual case).
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            out.extend(c.escape_debug());
            if c.escape_debug().len() == 1 {
                // escape_debug leaves some format characters alone: spell them as \u{..}.
                out.pop();
                out.extend(c.escape_unicode());
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `s` for printing as a document of lines (a config as stored): newlines and tabs are kept,
/// every other control character (an escape sequence, a carriage return that overwrites the
/// line) is escaped. Backslashes are left alone: JSON is full of them.
pub fn escape_terminal(s: &str) -> Cow<'_, str> {
    let keep = |c: char| matches!(c, '\\' | '\n' | '\t');
    if !s.chars().any(|c| !keep(c) && needs_escape(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if keep(c) || !needs_escape(c) {
            out.push(c);
        } else {
            out.push_str(&escape(c.encode_utf8(&mut [0; 4])));
        }
    }
    Cow::Owned(out)
}

/// `s` escaped, and cut after about `max` bytes with its length said: a key or value from outside
/// can be a megabyte, and a log line or a table cell should not be.
pub fn clip(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return escape(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}… ({} bytes)", escape(&s[..end]), s.len()))
}

/// Displays a string from outside escaped, for `format!` and log lines:
/// `warn!("skipping lease {}", Escaped(&key))`.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&escape(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_text_is_printed_as_it_is() {
        assert!(matches!(
            escape("/coreos.com/network/subnets/10.1.2.0-24"),
            Cow::Borrowed(_)
        ));
        assert_eq!(escape("vxlan ünïcode"), "vxlan ünïcode");
    }

    #[test]
    fn a_newline_cannot_forge_a_log_line() {
        let key = "subnets/x\n2026-12-07T00:00:00Z  INFO weft::agent: peer added";
        let shown = escape(key);
        assert!(!shown.contains('\n'));
        assert!(shown.contains("x\\n2026"), "{shown}");
    }

    #[test]
    fn escape_sequences_and_bidi_overrides_are_shown_not_obeyed() {
        assert_eq!(escape("\u{1b}[2J"), "\\u{1b}[2J");
        assert_eq!(escape("a\rb\tc\0"), "a\\rb\\tc\\0");
        assert_eq!(escape("ab\u{202e}cd"), "ab\\u{202e}cd");
        assert_eq!(
            escape("a\\nb"),
            "a\\\\nb",
            "a backslash is escaped, so no escape is faked"
        );
    }

    #[test]
    fn a_long_string_is_cut_at_a_character_and_its_length_said() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("aé\nbbbbbbbb", 3), "aé… (12 bytes)");
        assert_eq!(clip("\n\n\n\n", 2), "\\n\\n… (4 bytes)");
    }

    #[test]
    fn a_document_keeps_its_lines_but_not_what_a_terminal_would_obey() {
        let config = "{\n\t\"Network\": \"10.1.0.0/16\\u0041\"\n}";
        assert!(matches!(escape_terminal(config), Cow::Borrowed(_)));
        assert_eq!(escape_terminal("a\u{1b}[2J\rb\n"), "a\\u{1b}[2J\\rb\n");
    }

    #[test]
    fn escaped_pads_like_a_string() {
        assert_eq!(format!("[{:<6}]", Escaped("a\n")), "[a\\n   ]");
    }

    proptest! {
        #[test]
        fn what_is_printed_has_no_control_character(s in any::<String>()) {
            let shown = escape(&s);
            prop_assert!(!shown.chars().any(|c| c.is_control()), "{shown:?}");
            if !s.chars().any(needs_escape) {
                prop_assert_eq!(shown.as_ref(), s.as_str());
            }
        }
    }
}
