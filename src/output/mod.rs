//! A task's output on its way to the user: cut into lines (`lines`), made safe to show on a terminal
//! (`sanitize`, and `json` for JSON output) and kept in a log of bounded size (`log`).
//!
//! A task may print anything, in any amount: a 50 MB line, escape sequences that clear the screen,
//! gigabytes of noise. Each of these modules holds a bounded amount of memory and disk whatever the task
//! prints, and none of them needs the others.

pub mod json;
pub mod lines;
pub mod log;
pub mod sanitize;
