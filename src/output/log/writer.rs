//! Writing a capped log: the head kept, a rolling tail, the gap counted.

use super::*;

#[derive(Debug)]
struct Segment {
    index: u64,
    file: File,
    len: u64,
}

/// Bytes written over the life of a log, and how many of them were deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogTotals {
    pub written: u64,
    pub omitted: u64,
}

#[derive(Debug)]
pub struct LogWriter {
    dir: PathBuf,
    dir_fd: OwnedFd,
    layout: LogLayout,
    current: Option<Segment>,
    /// The number the next segment gets.
    next_index: u64,
    /// Tail segments on disk before `current`, oldest first, with their lengths.
    tail: VecDeque<(u64, u64)>,
    /// Recorded in `omitted` but still on disk: deleting it failed, and is retried first.
    pending_delete: Option<u64>,
    omitted: Omitted,
    written: u64,
}

impl LogWriter {
    /// Starts a log in `dir` (and its missing parents), clearing the segments and `omitted` of an
    /// earlier log there; other files are left alone. Refuses a symlink at `dir`, even one to a
    /// directory, and anything else that is not a directory.
    pub fn create(dir: &Path, max_bytes: u64) -> Result<LogWriter, LogError> {
        match dir.symlink_metadata() {
            Ok(meta) if meta.is_symlink() => {
                return Err(LogError::Symlink {
                    path: dir.to_owned(),
                });
            }
            Ok(meta) if !meta.is_dir() => {
                return Err(LogError::NotADirectory {
                    path: dir.to_owned(),
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_error("create log directory", dir.to_owned()))?,
            Err(e) => return Err(io_error("inspect log directory", dir.to_owned())(e)),
        }
        // Opened without following symlinks, then used for every file: a symlink swapped in after
        // the check above is refused here, and one swapped in later is never looked at.
        let dir_fd = open_dir(dir)?;
        rustix::fs::fchmod(&dir_fd, Mode::from_raw_mode(0o700))
            .map_err(errno("restrict log directory", dir.to_owned()))?;
        for index in list_segments(&dir_fd, dir)? {
            let name = segment_name(index);
            rustix::fs::unlinkat(&dir_fd, name.as_str(), AtFlags::empty())
                .map_err(errno("remove old log segment", dir.join(&name)))?;
        }
        // `omitted` itself is replaced by a rename, which never follows a symlink there.
        match rustix::fs::unlinkat(&dir_fd, OMITTED_TMP, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(errno("remove", dir.join(OMITTED_TMP))(e)),
        }
        let layout = LogLayout::new(max_bytes);
        let mut writer = LogWriter {
            dir: dir.to_owned(),
            dir_fd,
            layout,
            current: None,
            next_index: 0,
            tail: VecDeque::new(),
            pending_delete: None,
            omitted: Omitted {
                bytes: 0,
                segments: layout.head_segments..layout.head_segments,
                max_bytes: layout.max_bytes,
            },
            written: 0,
        };
        // Replaces the one of an earlier log, so a reader never pairs new segments with old counts.
        writer.write_omitted()?;
        writer.start_segment()?;
        Ok(writer)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn layout(&self) -> LogLayout {
        self.layout
    }

    /// Bytes that reached the log, including those deleted since.
    pub fn total_written(&self) -> u64 {
        self.written
    }

    /// Bytes deleted from the middle of the log.
    pub fn omitted(&self) -> u64 {
        self.omitted.bytes
    }

    /// Appends `bytes`. On error the bytes not yet written are dropped and the writer stays usable:
    /// the next call tries again from where the log really is.
    pub fn write(&mut self, mut bytes: &[u8]) -> Result<(), LogError> {
        while !bytes.is_empty() {
            if self
                .current
                .as_ref()
                .is_none_or(|s| s.len >= self.layout.segment_size)
            {
                self.start_segment()?;
            }
            let Some(segment) = self.current.as_mut() else {
                unreachable!("start_segment sets the current segment");
            };
            let room = self.layout.segment_size - segment.len;
            let n = bytes.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            if let Err(e) = segment.file.write_all(&bytes[..n]) {
                // Part of it may have landed: take the length from the file, or, failing that,
                // close the segment so that it cannot grow past its size.
                let len = match segment.file.metadata() {
                    Ok(meta) => meta.len().min(self.layout.segment_size),
                    Err(_) => self.layout.segment_size,
                };
                self.written += len.saturating_sub(segment.len);
                segment.len = len;
                let name = segment_name(segment.index);
                return Err(io_error("write log segment", self.dir.join(name))(e));
            }
            segment.len += n as u64;
            self.written += n as u64;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// Ends the log. Nothing is buffered, so this only closes the current segment.
    pub fn finish(self) -> LogTotals {
        LogTotals {
            written: self.written,
            omitted: self.omitted.bytes,
        }
    }

    /// Closes the current segment and opens the next one, deleting the oldest tail segment first
    /// when the tail is full.
    fn start_segment(&mut self) -> Result<(), LogError> {
        if let Some(segment) = self.current.take()
            && segment.index >= self.layout.head_segments
        {
            self.tail.push_back((segment.index, segment.len));
        }
        if let Some(index) = self.pending_delete {
            self.delete_segment(index)?;
            self.pending_delete = None;
        }
        let index = self.next_index;
        if index >= self.layout.head_segments {
            while self.tail.len() as u64 >= self.layout.tail_segments {
                let (oldest, len) = self.tail[0];
                self.record_omitted(oldest, len)?;
                self.tail.pop_front();
                // Counted now: if deleting fails, it is retried, never counted again.
                self.pending_delete = Some(oldest);
                self.delete_segment(oldest)?;
                self.pending_delete = None;
            }
        }
        let name = segment_name(index);
        let fd = rustix::fs::openat(
            &self.dir_fd,
            name.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(errno("create log segment", self.dir.join(&name)))?;
        self.current = Some(Segment {
            index,
            file: File::from(fd),
            len: 0,
        });
        self.next_index += 1;
        Ok(())
    }

    /// Counts segment `index` in `omitted`, before it is deleted.
    fn record_omitted(&mut self, index: u64, len: u64) -> Result<(), LogError> {
        let name = segment_name(index);
        // The file knows its length even when a failed write left the writer unsure.
        let len = rustix::fs::statat(&self.dir_fd, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
            .map_or(len, |stat| stat.st_size as u64);
        let before = self.omitted.clone();
        self.omitted.bytes += len;
        self.omitted.segments.end = index + 1;
        if let Err(e) = self.write_omitted() {
            self.omitted = before;
            return Err(e);
        }
        Ok(())
    }

    fn delete_segment(&self, index: u64) -> Result<(), LogError> {
        let name = segment_name(index);
        match rustix::fs::unlinkat(&self.dir_fd, name.as_str(), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(errno("delete log segment", self.dir.join(name))(e)),
        }
    }

    fn write_omitted(&self) -> Result<(), LogError> {
        let tmp_path = || self.dir.join(OMITTED_TMP);
        let fd = rustix::fs::openat(
            &self.dir_fd,
            OMITTED_TMP,
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(errno("create", tmp_path()))?;
        File::from(fd)
            .write_all(self.omitted.to_string().as_bytes())
            .map_err(io_error("write", tmp_path()))?;
        rustix::fs::renameat(&self.dir_fd, OMITTED_TMP, &self.dir_fd, OMITTED)
            .map_err(errno("replace", self.dir.join(OMITTED)))
    }
}
