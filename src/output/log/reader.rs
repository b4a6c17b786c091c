//! Reading a capped log, from the start or as it grows, with one marker where bytes were left out.

use super::*;

/// Reads a log from its start, in order, marking where output was deleted; polled, it follows a
/// log that is still being written.
#[derive(Debug)]
pub struct LogReader {
    dir: PathBuf,
    dir_fd: Option<OwnedFd>,
    current: Option<(u64, File)>,
    /// The segment to open after `current`.
    next_index: u64,
    /// The first tail segment, once `omitted` has been read.
    first_tail: Option<u64>,
    layout: Option<LogLayout>,
    /// Tail bytes copied out or reported deleted: what `omitted` minus this leaves is the next gap.
    tail_accounted: u64,
    buffer: Vec<u8>,
}

impl LogReader {
    /// Touches nothing yet: the log may not exist until the writer starts.
    pub fn new(dir: &Path) -> LogReader {
        LogReader {
            dir: dir.to_owned(),
            dir_fd: None,
            current: None,
            next_index: 0,
            first_tail: None,
            layout: None,
            tail_accounted: 0,
            buffer: Vec::new(),
        }
    }

    /// Copies to `out` everything written since the last call, with one marker line in place of
    /// each run of deleted output, and returns how many bytes it copied (markers included); 0 when
    /// nothing new is there (or the log does not exist yet). On a finished log, one call copies all
    /// of it. No byte and no marker is copied twice, even when the writer deletes the segment being
    /// read: its open file is read to the end first.
    pub fn read_available(&mut self, out: &mut dyn Write) -> Result<usize, LogError> {
        if self.dir_fd.is_none() {
            match open_dir(&self.dir) {
                Ok(fd) => self.dir_fd = Some(fd),
                Err(LogError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    return Ok(0);
                }
                Err(e) => return Err(e),
            }
        }
        let mut copied = 0;
        loop {
            if self.current.is_none() && !self.advance(out, &mut copied)? {
                return Ok(copied);
            }
            copied += self.copy_current(out)?;
            let Some((index, _)) = &self.current else {
                unreachable!("advance opened a segment");
            };
            if !self.newer_segment_exists(*index)? {
                return Ok(copied);
            }
            // The writer finished this segment before it started the next: what it wrote last is
            // there now.
            copied += self.copy_current(out)?;
            self.current = None;
        }
    }

    fn dir_fd(&self) -> &OwnedFd {
        self.dir_fd.as_ref().expect("opened by read_available")
    }

    /// Copies the current segment from where it was left to its end.
    fn copy_current(&mut self, out: &mut dyn Write) -> Result<usize, LogError> {
        let Some((index, file)) = self.current.as_mut() else {
            return Ok(0);
        };
        let path = || self.dir.join(segment_name(*index));
        if self.buffer.is_empty() {
            self.buffer = vec![0; COPY_BUFFER];
        }
        let is_tail = self.first_tail.is_some_and(|first| *index >= first);
        let mut copied = 0;
        loop {
            let n = match file.read(&mut self.buffer) {
                Ok(0) => return Ok(copied),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error("read", path())(e)),
            };
            out.write_all(&self.buffer[..n])
                .map_err(io_error("copy", path()))?;
            copied += n;
            if is_tail {
                self.tail_accounted += n as u64;
            }
        }
    }

    /// Opens the next segment there is, first writing a marker if segments were deleted before it.
    /// False if the writer has not started it yet.
    fn advance(&mut self, out: &mut dyn Write, copied: &mut usize) -> Result<bool, LogError> {
        for _ in 0..ADVANCE_TRIES {
            let omitted = self.read_omitted()?;
            let mut target = self.next_index;
            if let Some(omitted) = omitted.as_ref().filter(|o| o.segments.contains(&target)) {
                target = omitted.segments.end;
            }
            let gap = match self.open_segment(target)? {
                Some(file) => {
                    let gap = (target > self.next_index).then(|| {
                        let deleted = omitted.as_ref().map_or(0, |o| o.bytes);
                        Some(deleted.saturating_sub(self.tail_accounted))
                    });
                    self.current = Some((target, file));
                    gap
                }
                None => {
                    let Some(newer) = self.first_segment_from(target)? else {
                        return Ok(false);
                    };
                    // `target` was deleted after `omitted` was read: read it again. Unless the
                    // newer `omitted` does not count it either (a log this writer did not write):
                    // then skip to what is there, unable to say how much is missing.
                    let again = self.read_omitted()?;
                    if again.is_some_and(|o| o.segments.contains(&target)) {
                        continue;
                    }
                    let Some(file) = self.open_segment(newer)? else {
                        continue;
                    };
                    self.current = Some((newer, file));
                    Some(None)
                }
            };
            let (index, _) = self.current.as_ref().expect("just opened");
            self.next_index = index + 1;
            if let Some(bytes) = gap {
                if let Some(bytes) = bytes {
                    self.tail_accounted += bytes;
                }
                let marker = gap_marker(bytes, self.layout);
                out.write_all(marker.as_bytes())
                    .map_err(io_error("copy", self.dir.clone()))?;
                *copied += marker.len();
            }
            return Ok(true);
        }
        // The writer keeps deleting what this reader is about to open; try again on the next call.
        Ok(false)
    }

    fn open_segment(&self, index: u64) -> Result<Option<File>, LogError> {
        let name = segment_name(index);
        match rustix::fs::openat(
            self.dir_fd(),
            name.as_str(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(Some(File::from(fd))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(errno("open", self.dir.join(name))(e)),
        }
    }

    /// Whether the writer has gone past segment `index`, so that it will not grow any more.
    fn newer_segment_exists(&self, index: u64) -> Result<bool, LogError> {
        let name = segment_name(index + 1);
        match rustix::fs::statat(self.dir_fd(), name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => return Ok(true),
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(errno("inspect", self.dir.join(name))(e)),
        }
        // It may have been started and deleted already.
        Ok(self.first_segment_from(index + 1)?.is_some())
    }

    fn first_segment_from(&self, index: u64) -> Result<Option<u64>, LogError> {
        let segments = list_segments(self.dir_fd(), &self.dir)?;
        Ok(segments.into_iter().filter(|&i| i >= index).min())
    }

    /// The `omitted` file, if the writer has written one; also learns the layout from it.
    fn read_omitted(&mut self) -> Result<Option<Omitted>, LogError> {
        let path = || self.dir.join(OMITTED);
        let fd = match rustix::fs::openat(
            self.dir_fd(),
            OMITTED,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(errno("open", path())(e)),
        };
        let mut text = String::new();
        File::from(fd)
            .take(4096)
            .read_to_string(&mut text)
            .map_err(io_error("read", path()))?;
        let omitted = Omitted::parse(&text).map_err(|reason| LogError::Corrupt {
            path: path(),
            reason,
        })?;
        self.first_tail = Some(omitted.segments.start);
        self.layout = Some(LogLayout::new(omitted.max_bytes));
        Ok(Some(omitted))
    }
}

/// Bytes the files of the log at `dir` take (segments and `omitted`); 0 if there is no log.
pub fn log_size_on_disk(dir: &Path) -> Result<u64, LogError> {
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
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_error("inspect log directory", dir.to_owned())(e)),
    }
    let mut total = 0;
    for entry in std::fs::read_dir(dir).map_err(io_error("list", dir.to_owned()))? {
        let entry = entry.map_err(io_error("list", dir.to_owned()))?;
        let name = entry.file_name();
        let ours = name == OMITTED
            || name == OMITTED_TMP
            || segment_index(name.as_encoded_bytes()).is_some();
        if !ours {
            continue;
        }
        match entry.metadata() {
            Ok(meta) if meta.is_file() => total += meta.len(),
            Ok(_) => {}
            // Deleted by the writer since it was listed.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("inspect", entry.path())(e)),
        }
    }
    Ok(total)
}
