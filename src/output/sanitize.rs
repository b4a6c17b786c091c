//! Makes one line of a task's output safe to show on agentbox's terminal.
//!
//! Why: agentbox prints task output next to its own (the task prefix in `batch`, the status line,
//! `attach`), and a terminal obeys whatever control sequence reaches it. A task could move the
//! cursor, clear the screen, rewrite the status line with a fake "all done", set the window title,
//! switch to the alternate screen or reprogram the keyboard. So every control character is shown
//! instead of obeyed, except TAB and SGR sequences (`ESC [ digits ; : m`), which only colour text and
//! which tools print all the time.
//!
//! How it is shown: ESC as `^[` followed by the rest of its sequence as plain text (so `ESC [ 2 J`
//! reads `^[[2J`), other C0 controls in caret notation (`^M` for a lone CR, `^G` for BEL), DEL as
//! `^?`, C1 controls (U+0080..U+009F, which some terminals obey like ESC sequences) as `cat -v` does
//! (`M-^[` for U+009B). Invalid UTF-8 becomes U+FFFD. Sequences are parsed the way a terminal
//! parses them (CSI, OSC and the other string sequences, two- and three-byte ESC sequences; ESC
//! always starts a new one), so an SGR is recognised exactly and anything else is escaped from its
//! ESC to its final byte, never half passed. When a line kept any SGR, it ends with a reset
//! (`ESC [ 0 m`) so its colours do not leak into agentbox's own text after it.
//!
//! Names and messages a task chose are shown the same way wherever agentbox's own text carries them
//! (a file name in a conflict, a commit subject in `review`), but with no SGR exception
//! (`sanitize_name`): nothing in a name is meant to colour it, and SGR 8 (conceal) would hide it.
//!
//! Wiring: call `sanitize_line` on each line (from `output::lines`, without its '\n') just before it
//! is written to a terminal; logs and JSON output keep the raw bytes. Call `sanitize_name` on each
//! task-chosen name that goes into a line of agentbox's own, and `sanitize_text` on text of many lines
//! (git's log of a task's commits, an error that quotes a hook). A line with no control characters in
//! valid UTF-8 comes back borrowed, so the common case costs one scan and no copy.

use std::borrow::Cow;

const ESC: u8 = 0x1b;
const BEL: u8 = 0x07;
const TAB: u8 = b'\t';
const DEL: u8 = 0x7f;

/// Appended to a line that kept an SGR, so its colours end with it.
const SGR_RESET: &str = "\x1b[0m";

/// The line, with every control sequence but SGR colours shown instead of obeyed.
pub fn sanitize_line(line: &[u8]) -> Cow<'_, str> {
    sanitize(line, Colours::Keep)
}

/// A name or message a task chose (a file name, a commit subject, an error quoting one), with every
/// control sequence shown, colours too: as one line, so a newline in it shows as `^J`.
pub fn sanitize_name(name: &str) -> Cow<'_, str> {
    sanitize(name.as_bytes(), Colours::Show)
}

/// What becomes of SGR sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colours {
    /// Passed on (and reset at the end of the line): output that may be coloured.
    Keep,
    /// Shown like any other sequence: text in which no colour is meant.
    Show,
}

/// Text of many lines, each made safe as [`sanitize_line`] makes one (with `colours` for its SGR
/// sequences). Line ends stay: '\n', and a '\r' right before it (a CRLF file's lines), which only
/// moves the cursor to where the next line starts anyway.
pub fn sanitize_text(text: &[u8], colours: Colours) -> Cow<'_, str> {
    let plain = std::str::from_utf8(text).ok().filter(|t| {
        let bytes = t.as_bytes();
        !bytes.iter().enumerate().any(|(i, &b)| match b {
            b'\n' => false,
            b'\r' => bytes.get(i + 1) != Some(&b'\n'),
            _ => is_c0_or_del(b) || c1_at(bytes, i),
        })
    });
    if let Some(plain) = plain {
        return Cow::Borrowed(plain);
    }
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for line in text.split_inclusive(|&b| b == b'\n') {
        let (content, end): (&[u8], &str) = match line {
            [rest @ .., b'\r', b'\n'] => (rest, "\r\n"),
            [rest @ .., b'\n'] => (rest, "\n"),
            _ => (line, ""),
        };
        out.push_str(&sanitize(content, colours));
        out.push_str(end);
    }
    Cow::Owned(out)
}

fn sanitize(line: &[u8], colours: Colours) -> Cow<'_, str> {
    let text = String::from_utf8_lossy(line);
    if !has_controls(text.as_bytes()) {
        return text;
    }
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len() + text.len() / 8 + SGR_RESET.len());
    let mut kept_sgr = false;
    let mut plain_from = 0;
    let mut i = 0;
    while i < bytes.len() {
        let len = match bytes[i] {
            ESC => {
                let sequence = escape_sequence(&bytes[i..]);
                out.push_str(&text[plain_from..i]);
                if sequence.is_sgr && colours == Colours::Keep {
                    out.push_str(&text[i..i + sequence.len]);
                    kept_sgr = true;
                } else {
                    show(&text[i..i + sequence.len], &mut out);
                }
                sequence.len
            }
            byte if is_c0_or_del(byte) || c1_at(bytes, i) => {
                let len = if byte < 0x80 { 1 } else { 2 };
                out.push_str(&text[plain_from..i]);
                show(&text[i..i + len], &mut out);
                len
            }
            _ => {
                i += 1;
                continue;
            }
        };
        i += len;
        plain_from = i;
    }
    out.push_str(&text[plain_from..]);
    if kept_sgr {
        out.push_str(SGR_RESET);
    }
    Cow::Owned(out)
}

/// Whether `bytes` (valid UTF-8) holds a character that `sanitize_line` does not pass as it is.
fn has_controls(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .enumerate()
        .any(|(i, &b)| is_c0_or_del(b) || c1_at(bytes, i))
}

/// C0 controls but TAB, and DEL. ESC is one of them.
fn is_c0_or_del(byte: u8) -> bool {
    (byte < 0x20 && byte != TAB) || byte == DEL
}

/// Whether a C1 control (U+0080..U+009F, encoded as C2 80..C2 9F) starts at `i` of valid UTF-8.
fn c1_at(bytes: &[u8], i: usize) -> bool {
    bytes[i] == 0xC2 && bytes.get(i + 1).is_some_and(|b| (0x80..=0x9F).contains(b))
}

/// Appends `text` (part of a valid UTF-8 line) with every control character in visible notation.
fn show(text: &str, out: &mut String) {
    for c in text.chars() {
        match u32::from(c) {
            code @ 0x00..=0x1F if c != '\t' => {
                out.push('^');
                out.push(char::from(code as u8 + 0x40));
            }
            0x7F => out.push_str("^?"),
            code @ 0x80..=0x9F => {
                out.push_str("M-^");
                out.push(char::from(code as u8 - 0x80 + 0x40));
            }
            _ => out.push(c),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Sequence {
    /// Bytes from the ESC to the final byte, or to the byte that broke the sequence off (which is not
    /// part of it: a terminal would act on it, so it is looked at again on its own).
    len: usize,
    is_sgr: bool,
}

impl Sequence {
    fn other(len: usize) -> Self {
        Self { len, is_sgr: false }
    }
}

/// The escape sequence at the start of `bytes`, which starts with ESC.
fn escape_sequence(bytes: &[u8]) -> Sequence {
    debug_assert_eq!(bytes.first(), Some(&ESC));
    match bytes.get(1) {
        Some(b'[') => control_sequence(bytes),
        // OSC, DCS, SOS, PM, APC: a string up to ST (or BEL, which xterm accepts for OSC).
        Some(b']' | b'P' | b'X' | b'^' | b'_') => string_sequence(bytes),
        _ => {
            // Two- or three-byte sequences: intermediates 0x20..0x2F, then a final 0x30..0x7E.
            let mut i = 1;
            while bytes.get(i).is_some_and(|b| (0x20..=0x2F).contains(b)) {
                i += 1;
            }
            match bytes.get(i) {
                Some(0x30..=0x7E) => Sequence::other(i + 1),
                _ => Sequence::other(i),
            }
        }
    }
}

/// CSI: ESC [, parameter bytes 0x30..0x3F, intermediate bytes 0x20..0x2F, a final byte 0x40..0x7E.
/// An SGR is `m` after parameters made only of digits, ';' and ':' (no private marker such as
/// `?` or `>`: `CSI > 4 ; 2 m` reprograms the keyboard).
fn control_sequence(bytes: &[u8]) -> Sequence {
    let params_start = 2;
    let mut i = params_start;
    while bytes.get(i).is_some_and(|b| (0x30..=0x3F).contains(b)) {
        i += 1;
    }
    let params = &bytes[params_start..i];
    let intermediates_start = i;
    while bytes.get(i).is_some_and(|b| (0x20..=0x2F).contains(b)) {
        i += 1;
    }
    match bytes.get(i) {
        Some(0x40..=0x7E) => Sequence {
            len: i + 1,
            is_sgr: bytes[i] == b'm'
                && i == intermediates_start
                && params
                    .iter()
                    .all(|&b| b.is_ascii_digit() || b == b';' || b == b':'),
        },
        _ => Sequence::other(i),
    }
}

/// A string sequence: ends with ST (ESC \ or U+009C), with BEL, or is broken off by another ESC or
/// by the end of the line.
fn string_sequence(bytes: &[u8]) -> Sequence {
    let mut i = 2;
    while i < bytes.len() {
        match bytes[i] {
            BEL => return Sequence::other(i + 1),
            ESC if bytes.get(i + 1) == Some(&b'\\') => return Sequence::other(i + 2),
            ESC => return Sequence::other(i),
            0xC2 if bytes.get(i + 1) == Some(&0x9C) => return Sequence::other(i + 2),
            _ => i += 1,
        }
    }
    Sequence::other(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(line: &[u8]) -> String {
        sanitize_line(line).into_owned()
    }

    /// Checks, independently of the parser above, that a terminal would only colour text: the only
    /// control characters left are TAB and the ESC of `ESC [ [0-9;:]* m`.
    fn assert_harmless(out: &str) {
        let bytes = out.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == ESC {
                assert_eq!(bytes.get(i + 1), Some(&b'['), "raw ESC in {out:?}");
                let mut j = i + 2;
                while bytes
                    .get(j)
                    .is_some_and(|&b| b.is_ascii_digit() || b == b';' || b == b':')
                {
                    j += 1;
                }
                assert_eq!(bytes.get(j), Some(&b'm'), "non-SGR sequence in {out:?}");
                i = j + 1;
                continue;
            }
            i += 1;
        }
        for c in out.chars() {
            assert!(
                c == '\t' || c == '\x1b' || !c.is_control(),
                "control {c:?} in {out:?}"
            );
        }
    }

    #[test]
    fn plain_text_is_returned_borrowed_and_untouched() {
        for line in [
            "",
            "hello world",
            "tab\tseparated",
            "ünïcödé €𝄞",
            "~!@#$%^&*()[]{}",
        ] {
            let out = sanitize_line(line.as_bytes());
            assert!(matches!(out, Cow::Borrowed(_)), "{line:?} was copied");
            assert_eq!(out, line);
        }
    }

    #[test]
    fn sgr_colours_are_kept_and_reset_at_the_end_of_the_line() {
        assert_eq!(
            shown(b"\x1b[1;31merror\x1b[0m: \x1b[38;2;255;0;0mred\x1b[m"),
            "\x1b[1;31merror\x1b[0m: \x1b[38;2;255;0;0mred\x1b[m\x1b[0m"
        );
        assert_eq!(
            shown(b"\x1b[38:5:208mcolon form"),
            "\x1b[38:5:208mcolon form\x1b[0m"
        );
    }

    #[test]
    fn cursor_movement_and_clearing_are_shown_not_obeyed() {
        assert_eq!(shown(b"up\x1b[2Aover"), "up^[[2Aover");
        assert_eq!(shown(b"\x1b[Hhome"), "^[[Hhome");
        assert_eq!(shown(b"\x1b[2Jclear"), "^[[2Jclear");
        assert_eq!(shown(b"\x1b[Kline"), "^[[Kline");
        assert_eq!(shown(b"\x1b[10;20Hat"), "^[[10;20Hat");
    }

    #[test]
    fn sequences_ending_in_m_that_are_not_sgr_are_escaped() {
        // Private markers and intermediates make a different command with the same final byte.
        assert_eq!(shown(b"\x1b[>4;2m"), "^[[>4;2m");
        assert_eq!(shown(b"\x1b[?1m"), "^[[?1m");
        assert_eq!(shown(b"\x1b[1 m"), "^[[1 m");
    }

    #[test]
    fn an_osc_title_change_is_escaped_whole() {
        assert_eq!(shown(b"\x1b]0;pwned\x07after"), "^[]0;pwned^Gafter");
        assert_eq!(shown(b"\x1b]2;pwned\x1b\\after"), "^[]2;pwned^[\\after");
        // A hyperlink (OSC 8) with an SGR after it: the SGR survives on its own.
        assert_eq!(
            shown(b"\x1b]8;;http://x\x1b\\\x1b[4mlink"),
            "^[]8;;http://x^[\\\x1b[4mlink\x1b[0m"
        );
    }

    #[test]
    fn other_escape_sequences_are_escaped_whole() {
        assert_eq!(shown(b"\x1bcreset"), "^[creset");
        assert_eq!(shown(b"\x1b7save\x1b8"), "^[7save^[8");
        assert_eq!(shown(b"\x1b(0charset"), "^[(0charset");
        assert_eq!(shown(b"\x1b#8"), "^[#8");
        assert_eq!(shown(b"\x1bPdcs\x1b\\"), "^[Pdcs^[\\");
    }

    #[test]
    fn a_carriage_return_cannot_overwrite_the_prefix() {
        assert_eq!(
            shown(b"task-a | \rtask-b | all done"),
            "task-a | ^Mtask-b | all done"
        );
        assert_eq!(
            shown(b"bell\x07 nul\0 bs\x08 del\x7f"),
            "bell^G nul^@ bs^H del^?"
        );
    }

    #[test]
    fn c1_controls_are_escaped() {
        // U+009B is CSI on terminals that take C1 controls: "\u{9b}2J" would clear the screen.
        assert_eq!(shown("\u{9b}2Jx".as_bytes()), "M-^[2Jx");
        assert_eq!(shown("\u{9d}0;t\u{9c}".as_bytes()), "M-^]0;tM-^\\");
        assert_eq!(shown("\u{85}".as_bytes()), "M-^E");
        // A raw 0x9b byte is not UTF-8: it becomes U+FFFD, which no terminal obeys.
        assert_eq!(shown(b"\x9b2J"), "\u{fffd}2J");
        // U+00A0 and above are printable.
        assert_eq!(sanitize_line("\u{a0}é".as_bytes()), "\u{a0}é");
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let out = sanitize_line(b"ok \xff\xfe bad");
        assert_eq!(out, "ok \u{fffd}\u{fffd} bad");
    }

    #[test]
    fn truncated_sequences_at_the_end_of_the_line_are_escaped() {
        assert_eq!(shown(b"end\x1b"), "end^[");
        assert_eq!(shown(b"end\x1b["), "end^[[");
        assert_eq!(shown(b"end\x1b[31"), "end^[[31");
        assert_eq!(shown(b"end\x1b[31;"), "end^[[31;");
        assert_eq!(shown(b"end\x1b]0;title"), "end^[]0;title");
        assert_eq!(shown(b"end\x1b("), "end^[(");
    }

    #[test]
    fn a_sequence_broken_off_by_another_is_escaped_and_the_next_one_parsed_afresh() {
        // ESC inside a CSI starts a new sequence, as it does on a terminal.
        assert_eq!(shown(b"\x1b[31\x1b[2J"), "^[[31^[[2J");
        assert_eq!(shown(b"\x1b[31\x1b[1mbold"), "^[[31\x1b[1mbold\x1b[0m");
        // A control inside a CSI breaks it off; it is shown too.
        assert_eq!(shown(b"\x1b[3\r1m"), "^[[3^M1m");
        // Bytes above 0x7E are not final bytes.
        assert_eq!(shown("\x1b[3é".as_bytes()), "^[[3é");
    }

    #[test]
    fn a_name_keeps_no_escape_sequence_not_even_a_colour() {
        assert_eq!(sanitize_name("\x1b]0;pwned\x07x.txt"), "^[]0;pwned^Gx.txt");
        assert_eq!(sanitize_name("\x1b[2Jf"), "^[[2Jf");
        // SGR 8 conceals the text after it: in a name, it is shown like the rest.
        assert_eq!(sanitize_name("\x1b[8mhidden"), "^[[8mhidden");
        assert_eq!(sanitize_name("a\nb\rc"), "a^Jb^Mc");
        let plain = sanitize_name("src/main.rs");
        assert!(matches!(plain, Cow::Borrowed("src/main.rs")));
    }

    #[test]
    fn text_is_made_safe_line_by_line_and_keeps_its_line_ends() {
        let text = b"commit 1\n    \x1b]0;pwned\x07subject\r\n\x1b[31m-red\x1b[m\nlast\rover";
        assert_eq!(
            sanitize_text(text, Colours::Show),
            "commit 1\n    ^[]0;pwned^Gsubject\r\n^[[31m-red^[[m\nlast^Mover"
        );
        assert_eq!(
            sanitize_text(text, Colours::Keep),
            "commit 1\n    ^[]0;pwned^Gsubject\r\n\x1b[31m-red\x1b[m\x1b[0m\nlast^Mover"
        );
        for plain in ["", "one\ntwo\n", "crlf\r\nfile\r\n", "tab\there\n"] {
            let out = sanitize_text(plain.as_bytes(), Colours::Show);
            assert!(matches!(out, Cow::Borrowed(_)), "{plain:?} was copied");
            assert_eq!(out, plain);
        }
        assert_eq!(
            sanitize_text(b"bad \xff\nok\n", Colours::Show),
            "bad \u{fffd}\nok\n"
        );
    }

    #[test]
    fn random_bytes_never_leave_a_sequence_a_terminal_would_obey() {
        let mut state = 0x2545_F491_4F6C_DD1D_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        // Heavy on the bytes that make sequences, so that many near-misses are tried.
        let alphabet =
            b"\x1b\x1b\x1b[[[]]m;;:0123?>\x07\\\r\n\t\x7f\xc2\x9b\x9c\x80P_ aZ\xe2\x82\xac";
        for _ in 0..20_000 {
            let len = (next() % 24) as usize;
            let line: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            assert_harmless(&sanitize_line(&line));
            let name = sanitize_text(&line, Colours::Show);
            assert!(!name.contains('\x1b'), "raw ESC in {name:?}");
            for line in name.split('\n') {
                assert_harmless(line.strip_suffix('\r').unwrap_or(line));
            }
        }
    }
}
