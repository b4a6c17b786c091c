//! A task's log, capped on disk however much the task prints.
//!
//! Why: the log used to be one file that grew with every byte a task printed, and a task may print
//! forever. The start of a run (what it was asked, how it set up) and its end (the error it died of)
//! are what a reader needs; the middle of a flood is not. So a log keeps the first half of its cap
//! for ever and, after that, only the most recent output, within the other half.
//!
//! Layout: a log is a directory (mode 0700) of numbered segment files (`000000`, `000001`, …, six
//! digits, more past 999999; mode 0600), each at most `segment_size` bytes, written in order, plus
//! a small `omitted` file. The first `head_segments` are the head and stay. After them the writer
//! keeps at most `tail_segments`: before it starts a new one, it deletes the oldest tail segment.
//! Segments rather than one file rewritten in place, so that nothing big is ever copied or held in
//! memory, and so that a reader following the log keeps its open file and its place when the writer
//! moves on or deletes what it is reading.
//!
//! `omitted` says how many bytes were deleted, which segments they were, and the cap; it is
//! replaced atomically (temporary file, then rename) and always before the segment it counts is
//! deleted, so a reader never sees a segment missing that `omitted` does not account for. If it
//! cannot be written, nothing is deleted and no new segment is started: output is dropped rather than
//! the cap exceeded or the count wrong.
//!
//! Bound: every segment is at most `segment_size` bytes, there are at most `head_segments` +
//! `tail_segments` of them, and `LogLayout::new` chooses these so that the segments never hold more
//! than `max_bytes` together (`max_bytes` raised to 128 KiB when smaller); the `omitted` file adds
//! under 100 bytes. The tail holds between `tail_bytes - segment_size` and `tail_bytes` of the most
//! recent output once the log has gone past its head.
//!
//! Wiring: the supervisor creates one `LogWriter` per run (`create` clears a log left by an earlier
//! run of the same task) and calls `write` with each chunk of output. Each call is plain blocking
//! `std::fs` work without fsync: one `write(2)` per segment the chunk touches, and, when a segment
//! fills, a stat, a small file write plus rename, an unlink and an open. Run it on a blocking thread,
//! or accept that cost inline. A failed write is returned but leaves the writer usable: the caller
//! should ignore it and keep the task's output flowing. `agentbox logs` makes a `LogReader` and calls
//! `read_available`; to follow, it calls it again whenever it returns 0, sleeping in between, until
//! the writer is known to be done (the supervisor's lock is free), and then once more for what the
//! writer wrote last. The log is now a directory where it was a file: whatever removes or copies a
//! task's log (gc, `rm`, batch artifacts) has to go through this module or remove the directory.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};

mod reader;
mod writer;

pub use reader::{LogReader, log_size_on_disk};
pub use writer::{LogTotals, LogWriter};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// The default cap of one task's log.
pub const DEFAULT_MAX_BYTES: u64 = 100 * MIB;

/// The smallest segment: smaller ones would cost a rotation every few writes.
pub const MIN_SEGMENT_SIZE: u64 = 64 * KIB;

/// Segments per half of the cap, for a cap large enough that segments are above the minimum.
const SEGMENTS_PER_HALF: u64 = 8;

const OMITTED: &str = "omitted";
const OMITTED_TMP: &str = "omitted.tmp";

/// A reader's bound on retries when the writer deletes segments faster than it can open them.
const ADVANCE_TRIES: usize = 16;

const COPY_BUFFER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("log directory {} is a symlink; refusing to follow it", path.display())]
    Symlink { path: PathBuf },
    #[error("log directory {} exists and is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("log file {} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
}

fn io_error(action: &'static str, path: PathBuf) -> impl FnOnce(io::Error) -> LogError {
    move |source| LogError::Io {
        action,
        path,
        source,
    }
}

fn errno(action: &'static str, path: PathBuf) -> impl FnOnce(rustix::io::Errno) -> LogError {
    move |errno| io_error(action, path)(errno.into())
}

/// How a log of a given cap is cut into segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLayout {
    /// The cap, raised to two minimum segments (128 KiB) when smaller.
    pub max_bytes: u64,
    /// `max_bytes / 16`, at least `MIN_SEGMENT_SIZE`.
    pub segment_size: u64,
    /// Segments kept from the start: as many as fit in half of `max_bytes`, at least one.
    pub head_segments: u64,
    /// Most recent segments kept after the head, the one being written included; as many as the head.
    pub tail_segments: u64,
}

impl LogLayout {
    pub fn new(max_bytes: u64) -> Self {
        let max_bytes = max_bytes.max(2 * MIN_SEGMENT_SIZE);
        let segment_size = (max_bytes / (2 * SEGMENTS_PER_HALF)).max(MIN_SEGMENT_SIZE);
        let per_half = (max_bytes / 2 / segment_size).max(1);
        Self {
            max_bytes,
            segment_size,
            head_segments: per_half,
            tail_segments: per_half,
        }
    }

    pub fn head_bytes(&self) -> u64 {
        self.head_segments * self.segment_size
    }

    pub fn tail_bytes(&self) -> u64 {
        self.tail_segments * self.segment_size
    }
}

impl Default for LogLayout {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_BYTES)
    }
}

fn segment_name(index: u64) -> String {
    format!("{index:06}")
}

fn segment_index(name: &[u8]) -> Option<u64> {
    if name.len() < 6 || !name.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(name).ok()?.parse().ok()
}

/// The `omitted` file: `bytes N`, `segments A..B` (the deleted ones, `A` being the first tail
/// segment), `max_bytes M`, one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Omitted {
    bytes: u64,
    segments: Range<u64>,
    max_bytes: u64,
}

impl Omitted {
    fn parse(text: &str) -> Result<Self, String> {
        let (mut bytes, mut segments, mut max_bytes) = (None, None, None);
        for line in text.lines() {
            let Some((key, value)) = line.split_once(' ') else {
                continue;
            };
            let number = |s: &str| s.parse::<u64>().map_err(|e| format!("{key}: {e}"));
            match key {
                "bytes" => bytes = Some(number(value)?),
                "max_bytes" => max_bytes = Some(number(value)?),
                "segments" => {
                    let (start, end) = value
                        .split_once("..")
                        .ok_or_else(|| format!("segments: no range in {value:?}"))?;
                    segments = Some(number(start)?..number(end)?);
                }
                _ => {}
            }
        }
        Ok(Self {
            bytes: bytes.ok_or("no bytes line")?,
            segments: segments.ok_or("no segments line")?,
            max_bytes: max_bytes.ok_or("no max_bytes line")?,
        })
    }
}

impl fmt::Display for Omitted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "bytes {}", self.bytes)?;
        writeln!(f, "segments {}..{}", self.segments.start, self.segments.end)?;
        writeln!(f, "max_bytes {}", self.max_bytes)
    }
}

/// What a reader prints where output was deleted. `bytes` is `None` only for a log whose `omitted`
/// file does not account for the gap (one not written by `LogWriter`).
fn gap_marker(bytes: Option<u64>, layout: Option<LogLayout>) -> String {
    let what = match bytes {
        Some(n) => format!("{n} bytes of output left out here"),
        None => "output left out here".to_owned(),
    };
    match layout {
        Some(layout) => format!(
            "\n[agentbox: {what}; the log keeps the first {} and the last {}]\n",
            Size(layout.head_bytes()),
            Size(layout.tail_bytes())
        ),
        None => format!("\n[agentbox: {what}]\n"),
    }
}

/// A byte count in the largest binary unit that shows it exactly.
struct Size(u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            n if n > 0 && n % MIB == 0 => write!(f, "{} MiB", n / MIB),
            n if n > 0 && n % KIB == 0 => write!(f, "{} KiB", n / KIB),
            n => write!(f, "{n} bytes"),
        }
    }
}

/// Opens `dir` itself, never a symlink in its place.
fn open_dir(dir: &Path) -> Result<OwnedFd, LogError> {
    rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP => LogError::Symlink {
            path: dir.to_owned(),
        },
        rustix::io::Errno::NOTDIR => match dir.symlink_metadata() {
            Ok(meta) if meta.is_symlink() => LogError::Symlink {
                path: dir.to_owned(),
            },
            _ => LogError::NotADirectory {
                path: dir.to_owned(),
            },
        },
        e => io_error("open log directory", dir.to_owned())(e.into()),
    })
}

/// The segment numbers in the directory, in no particular order.
fn list_segments(dir_fd: &OwnedFd, dir: &Path) -> Result<Vec<u64>, LogError> {
    let entries = rustix::fs::Dir::read_from(dir_fd).map_err(errno("list", dir.to_owned()))?;
    let mut segments = Vec::new();
    for entry in entries {
        let entry = entry.map_err(errno("list", dir.to_owned()))?;
        if let Some(index) = segment_index(entry.file_name().to_bytes()) {
            segments.push(index);
        }
    }
    Ok(segments)
}

#[cfg(test)]
mod tests;
