//! JSON as agentbox prints it on stdout: serde_json's compact form, except that DEL and the C1
//! controls (U+007F..U+009F) in strings are escaped too (`\u009b`).
//!
//! Why: serde_json escapes only what JSON requires (the C0 controls, `"` and `\`), so a file name,
//! commit subject or output line a task chose could carry U+009B raw — CSI on terminals that obey
//! C1 controls — to a terminal that shows `--json` output. The value a reader parses is the same;
//! only those characters are spelled differently.

use std::io;

use serde::Serialize;
use serde_json::ser::{Formatter, Serializer};

/// serde_json's `CompactFormatter` (every default) with the escapes above.
struct TerminalSafe;

impl Formatter for TerminalSafe {
    fn write_string_fragment<W>(&mut self, writer: &mut W, fragment: &str) -> io::Result<()>
    where
        W: ?Sized + io::Write,
    {
        let mut plain = 0;
        for (i, c) in fragment.char_indices() {
            if matches!(u32::from(c), 0x7F..=0x9F) {
                writer.write_all(&fragment.as_bytes()[plain..i])?;
                write!(writer, "\\u{:04x}", u32::from(c))?;
                plain = i + c.len_utf8();
            }
        }
        writer.write_all(&fragment.as_bytes()[plain..])
    }
}

/// Writes `value` as one line of JSON (without the newline).
pub fn to_writer<W: io::Write, T: ?Sized + Serialize>(
    writer: W,
    value: &T,
) -> serde_json::Result<()> {
    value.serialize(&mut Serializer::with_formatter(writer, TerminalSafe))
}

/// `value` as one line of JSON (without the newline).
pub fn to_string<T: ?Sized + Serialize>(value: &T) -> serde_json::Result<String> {
    let mut out = Vec::new();
    to_writer(&mut out, value)?;
    Ok(String::from_utf8(out).expect("serde_json writes UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn ordinary_values_are_what_serde_json_writes() {
        let value = json!({
            "task": "a",
            "files": ["\x1b]0;pwned\x07x.txt", "tab\tnew\nline", "ünïcödé €\u{a0}"],
            "n": 3,
            "none": null,
            "nested": {"quote": "\"\\"},
        });
        assert_eq!(
            to_string(&value).unwrap(),
            serde_json::to_string(&value).unwrap()
        );
    }

    #[test]
    fn del_and_c1_controls_are_escaped_and_parse_back_the_same() {
        // U+009B 2 J clears the screen on terminals that take C1 controls; U+00A0 is printable.
        let name = "a\u{9b}2Jb\u{7f}c\u{9d}0;t\u{9c}\u{80}\u{a0}é";
        let escaped = format!(r"a\u009b2Jb\u007fc\u009d0;t\u009c\u0080{}", "\u{a0}é");
        let line = to_string(&json!({ name: [name] })).unwrap();
        assert_eq!(line, format!(r#"{{"{escaped}":["{escaped}"]}}"#));
        let back: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back, json!({ name: [name] }));
    }
}
