//! The caller's terminal: raw mode for an interactive session, its size, and the detach keys.
//!
//! Raw mode comes from `rustix::termios` (already a dependency, for processes and files): a guard
//! sets it and puts the saved settings back when it is dropped — on a normal return, on an error
//! (`?`), and while a panic unwinds. Signals whose default action would end agentbox while the
//! terminal is raw (SIGINT, SIGQUIT, SIGTERM, SIGHUP: raw mode stops the terminal from sending
//! them, but `kill` and a closed terminal still do) are caught before raw mode begins: the session
//! returns or goes on, and the guard runs either way.

use std::io::{self, IsTerminal};
use std::os::fd::AsFd;

use rustix::termios::{OptionalActions, Termios};

/// The keys that detach from a task unless told otherwise, as docker's.
pub const DEFAULT_DETACH_KEYS: &str = "ctrl-p,ctrl-q";

/// Whether stdin is a terminal.
pub fn stdin_is_terminal() -> bool {
    io::stdin().is_terminal()
}

/// The terminal's size `(rows, cols)`, when stdin is one and knows it.
pub fn size() -> Option<(u16, u16)> {
    let size = rustix::termios::tcgetwinsize(io::stdin().as_fd()).ok()?;
    (size.ws_row > 0 && size.ws_col > 0).then_some((size.ws_row, size.ws_col))
}

/// Raw mode on stdin for as long as it lives.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    pub fn enable() -> io::Result<Self> {
        let stdin = io::stdin();
        let saved = rustix::termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(stdin.as_fd(), OptionalActions::Now, &raw)?;
        Ok(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Drain: output already written is shown before the settings change back.
        let _ =
            rustix::termios::tcsetattr(io::stdin().as_fd(), OptionalActions::Drain, &self.saved);
    }
}

/// The detach keys as the user wrote them (for the engine) and as bytes (for the watch here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetachKeys {
    pub text: String,
    pub bytes: Vec<u8>,
}

impl DetachKeys {
    pub fn parse(text: &str) -> Result<Self, String> {
        Ok(Self {
            text: text.to_owned(),
            bytes: parse_detach_keys(text)?,
        })
    }

    /// The watch for these keys, when what the user types comes from a terminal: a pipe's bytes
    /// are passed on as they are.
    pub fn watch_if_terminal(&self) -> Option<DetachWatch> {
        stdin_is_terminal().then(|| DetachWatch::new(self.bytes.clone()))
    }
}

/// Parses docker's notation for detach keys: comma-separated keys, each a single character or
/// `ctrl-<c>` with `<c>` one of `a`-`z`, `@`, `[`, `\`, `]`, `^`, `_`.
pub fn parse_detach_keys(text: &str) -> Result<Vec<u8>, String> {
    let invalid = |key: &str| {
        format!(
            "detach key {key:?} is not a character or ctrl-<letter> (as in {DEFAULT_DETACH_KEYS})"
        )
    };
    let mut keys = Vec::new();
    for key in text.split(',') {
        let bytes = key.as_bytes();
        if bytes.len() == 1 {
            keys.push(bytes[0]);
            continue;
        }
        let lower = key.to_ascii_lowercase();
        let Some(rest) = lower.strip_prefix("ctrl-") else {
            return Err(invalid(key));
        };
        let code = match rest.as_bytes() {
            [c @ b'a'..=b'z'] => c - b'a' + 1,
            [b'@'] => 0,
            [b'['] => 27,
            [b'\\'] => 28,
            [b']'] => 29,
            [b'^'] => 30,
            [b'_'] => 31,
            _ => return Err(invalid(key)),
        };
        keys.push(code);
    }
    if keys.is_empty() {
        return Err(invalid(text));
    }
    Ok(keys)
}

/// Watches what the user types for the detach keys: bytes that could begin the sequence are held
/// back until it is clear whether they do; a sequence that breaks off is passed on whole.
#[derive(Debug, Clone)]
pub struct DetachWatch {
    keys: Vec<u8>,
    matched: usize,
}

impl DetachWatch {
    pub fn new(keys: Vec<u8>) -> Self {
        assert!(!keys.is_empty(), "detach keys are never empty");
        Self { keys, matched: 0 }
    }

    /// Appends to `forward` what of `input` goes to the program; returns `true` (and stops there)
    /// when the detach keys were typed.
    pub fn feed(&mut self, input: &[u8], forward: &mut Vec<u8>) -> bool {
        for &byte in input {
            loop {
                if byte == self.keys[self.matched] {
                    self.matched += 1;
                    if self.matched == self.keys.len() {
                        self.matched = 0;
                        return true;
                    }
                    break;
                }
                if self.matched == 0 {
                    forward.push(byte);
                    break;
                }
                // The sequence broke off: what was held goes on, and this byte is looked at anew.
                forward.extend_from_slice(&self.keys[..self.matched]);
                self.matched = 0;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dockers_notation() {
        assert_eq!(parse_detach_keys("ctrl-p,ctrl-q").unwrap(), [16, 17]);
        assert_eq!(parse_detach_keys("ctrl-@,x,CTRL-]").unwrap(), [0, b'x', 29]);
        assert!(parse_detach_keys("ctrl-pp").is_err());
        assert!(parse_detach_keys("alt-x").is_err());
        assert!(parse_detach_keys("").is_err());
    }

    #[test]
    fn holds_back_a_beginning_and_passes_on_a_sequence_that_breaks_off() {
        let mut watch = DetachWatch::new(vec![16, 17]);
        let mut out = Vec::new();
        assert!(!watch.feed(b"ab\x10", &mut out));
        assert_eq!(out, b"ab", "ctrl-p is held until the next key");
        assert!(!watch.feed(b"c", &mut out));
        assert_eq!(out, b"ab\x10c");
        out.clear();
        assert!(!watch.feed(b"\x10\x10", &mut out));
        assert_eq!(out, b"\x10", "a second ctrl-p may still begin the sequence");
        assert!(watch.feed(b"\x11rest", &mut out));
        assert_eq!(out, b"\x10", "nothing after the sequence goes on");
    }
}
