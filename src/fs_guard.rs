//! Host-side file work inside directories a task can write to (its worktree, its git dir), done so
//! that nothing the task planted there redirects it: no symlink is followed, no parent directory
//! that is a symlink is walked through, and nothing but a regular file is read or replaced.
//!
//! A [`GuardedDir`] is an open directory (the worktree's root, which agentbox made itself); every
//! path below it is walked one component at a time with `O_NOFOLLOW`, so a task that replaced
//! `config/` with a symlink to `/etc` gets an error instead of a write into `/etc`. Files are written
//! to a temporary name and renamed into place: a rename replaces a directory entry and never writes
//! through whatever the entry pointed at.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(
        "{} is a symlink; agentbox never writes or reads through a symlink in a task's worktree or git dir (the task may have planted it)",
        path.display()
    )]
    Symlink { path: PathBuf },
    #[error("{} is not a {expected}", path.display())]
    WrongType {
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{} is larger than {limit} bytes", path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// A directory opened without following symlinks, for work beneath it.
#[derive(Debug)]
pub struct GuardedDir {
    fd: OwnedFd,
    path: PathBuf,
}

pub use rustix::fs::FileType;

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

impl GuardedDir {
    /// Opens `path`, which must be a directory and not a symlink. Its parents are agentbox's own
    /// (the worktree root, the state dir) and are trusted.
    pub fn open(path: &Path) -> Result<Self, GuardError> {
        let fd = rustix::fs::open(path, DIR_FLAGS, Mode::empty())
            .map_err(|e| classify(e.into(), path, "directory", "open"))?;
        Ok(Self {
            fd,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn child_path(&self, name: &Path) -> PathBuf {
        self.path.join(name)
    }

    /// The directory at `relative` below this one, walked without following symlinks; missing
    /// directories are created (mode 0755) when `create` is set.
    pub fn dir(&self, relative: &Path, create: bool) -> Result<GuardedDir, GuardError> {
        let mut current = GuardedDir {
            fd: self
                .fd
                .try_clone()
                .map_err(|e| io_error("open", &self.path, e))?,
            path: self.path.clone(),
        };
        for name in components(relative)? {
            current = current.child_dir(name, create)?;
        }
        Ok(current)
    }

    fn child_dir(&self, name: &Path, create: bool) -> Result<GuardedDir, GuardError> {
        let path = self.child_path(name);
        match rustix::fs::openat(&self.fd, name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => Ok(GuardedDir { fd, path }),
            Err(rustix::io::Errno::NOENT) if create => {
                match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(io_error("create directory", &path, e.into())),
                }
                let fd = rustix::fs::openat(&self.fd, name, DIR_FLAGS, Mode::empty())
                    .map_err(|e| classify(e.into(), &path, "directory", "open"))?;
                Ok(GuardedDir { fd, path })
            }
            Err(e) => Err(classify(e.into(), &path, "directory", "open")),
        }
    }

    /// Splits `relative` into the directory that holds it (created when missing) and its name.
    fn parent_of<'p>(&self, relative: &'p Path) -> Result<(GuardedDir, &'p Path), GuardError> {
        let parts = components(relative)?;
        let (name, parents) = parts.split_last().ok_or_else(|| GuardError::WrongType {
            path: self.path.clone(),
            expected: "file path",
        })?;
        let mut dir = self.dir(Path::new(""), false)?;
        for parent in parents {
            dir = dir.child_dir(parent, true)?;
        }
        Ok((dir, name))
    }

    /// Writes `bytes` to `relative` with `mode`, replacing a regular file that is there. A symlink
    /// there is an error, and so is a symlink among its parents; nothing is written through either.
    pub fn write_file(&self, relative: &Path, bytes: &[u8], mode: u32) -> Result<(), GuardError> {
        let (dir, name) = self.parent_of(relative)?;
        dir.replace_with(name, mode, |file| file.write_all(bytes))
    }

    /// Writes what `fill` produces into a temporary file beside `name` and renames it over `name`.
    fn replace_with(
        &self,
        name: &Path,
        mode: u32,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> Result<(), GuardError> {
        let path = self.child_path(name);
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => match FileType::from_raw_mode(stat.st_mode) {
                FileType::RegularFile => {}
                FileType::Symlink => return Err(GuardError::Symlink { path }),
                _ => {
                    return Err(GuardError::WrongType {
                        path,
                        expected: "regular file",
                    });
                }
            },
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(io_error("inspect", &path, e.into())),
        }
        let tmp_name = format!(
            ".agentbox-tmp-{}-{}",
            std::process::id(),
            name.to_string_lossy()
        );
        let tmp_name = Path::new(&tmp_name);
        let fd = rustix::fs::openat(
            &self.fd,
            tmp_name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .map_err(|e| io_error("create", &self.child_path(tmp_name), e.into()))?;
        let mut file = File::from(fd);
        let written = fill(&mut file).and_then(|()| {
            // The mode asked for, whatever the umask made of it.
            rustix::fs::fchmod(file.as_fd(), Mode::from_raw_mode(mode)).map_err(io::Error::from)
        });
        let renamed = written.and_then(|()| {
            rustix::fs::renameat(&self.fd, tmp_name, &self.fd, name).map_err(io::Error::from)
        });
        if let Err(e) = renamed {
            let _ = rustix::fs::unlinkat(&self.fd, tmp_name, AtFlags::empty());
            return Err(io_error("write", &path, e));
        }
        Ok(())
    }

    /// Copies the regular file `source` (outside any task's reach) to `relative`, with its mode.
    pub fn copy_file_from(
        &self,
        source: &Path,
        relative: &Path,
        mode: u32,
    ) -> Result<(), GuardError> {
        let mut from = File::open(source).map_err(|e| io_error("open", source, e))?;
        let (dir, name) = self.parent_of(relative)?;
        dir.replace_with(name, mode, |file| io::copy(&mut from, file).map(drop))
    }

    /// Creates the symlink `relative` -> `target`; an existing entry there is an error.
    pub fn symlink(&self, relative: &Path, target: &Path) -> Result<(), GuardError> {
        let (dir, name) = self.parent_of(relative)?;
        rustix::fs::symlinkat(target, &dir.fd, name)
            .map_err(|e| io_error("create symlink", &dir.child_path(name), e.into()))
    }

    /// Creates the directory `relative` (and its parents); an existing directory is fine, an
    /// existing symlink is an error.
    pub fn create_dir(&self, relative: &Path) -> Result<(), GuardError> {
        let (dir, name) = self.parent_of(relative)?;
        dir.child_dir(name, true).map(drop)
    }

    /// The entries of this directory with their types (a symlink is reported as one, not
    /// followed).
    pub fn entries(&self) -> Result<Vec<(std::ffi::OsString, FileType)>, GuardError> {
        let fd = rustix::fs::openat(&self.fd, ".", DIR_FLAGS, Mode::empty())
            .map_err(|e| io_error("open", &self.path, e.into()))?;
        let mut dir =
            rustix::fs::Dir::read_from(fd).map_err(|e| io_error("list", &self.path, e.into()))?;
        let mut entries = Vec::new();
        while let Some(entry) = dir.read() {
            let entry = entry.map_err(|e| io_error("list", &self.path, e.into()))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = std::ffi::OsStr::from_bytes(name).to_owned();
            let kind = match entry.file_type() {
                FileType::Unknown => {
                    rustix::fs::statat(&self.fd, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
                        .map(|s| FileType::from_raw_mode(s.st_mode))
                        .map_err(|e| {
                            io_error("inspect", &self.child_path(Path::new(&name)), e.into())
                        })?
                }
                known => known,
            };
            entries.push((name, kind));
        }
        Ok(entries)
    }

    /// What is at `relative` (its type, permission bits and size), without following a symlink
    /// there or among its parents; `None` when nothing is.
    pub fn stat(&self, relative: &Path) -> Result<Option<Entry>, GuardError> {
        let parts = components(relative)?;
        let Some((name, parents)) = parts.split_last() else {
            let stat = rustix::fs::fstat(&self.fd)
                .map_err(|e| io_error("inspect", &self.path, e.into()))?;
            return Ok(Some(Entry::from_stat(&stat)));
        };
        let Some(dir) = self.existing_parent(parents)? else {
            return Ok(None);
        };
        match rustix::fs::statat(&dir.fd, *name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(Entry::from_stat(&stat))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(io_error("inspect", &dir.child_path(name), e.into())),
        }
    }

    /// Removes the file, symlink (itself, never what it points to) or empty directory at
    /// `relative`; a symlink among its parents is an error. Returns what was removed, `None` when
    /// nothing was there.
    pub fn remove(&self, relative: &Path) -> Result<Option<FileType>, GuardError> {
        let parts = components(relative)?;
        let (name, parents) = parts.split_last().ok_or_else(|| GuardError::WrongType {
            path: self.path.clone(),
            expected: "path below the directory",
        })?;
        let Some(dir) = self.existing_parent(parents)? else {
            return Ok(None);
        };
        let path = dir.child_path(name);
        let kind = match rustix::fs::statat(&dir.fd, *name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => FileType::from_raw_mode(stat.st_mode),
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(io_error("inspect", &path, e.into())),
        };
        let flags = if kind == FileType::Directory {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        rustix::fs::unlinkat(&dir.fd, *name, flags)
            .map_err(|e| io_error("remove", &path, e.into()))?;
        Ok(Some(kind))
    }

    /// The directory that holds the last of `parents`, walked without following symlinks; `None`
    /// when one of them does not exist.
    fn existing_parent(&self, parents: &[&Path]) -> Result<Option<GuardedDir>, GuardError> {
        let mut dir = self.dir(Path::new(""), false)?;
        for parent in parents {
            dir = match dir.child_dir(parent, false) {
                Ok(dir) => dir,
                Err(GuardError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
        }
        Ok(Some(dir))
    }

    /// The target a symlink at `name` (in this directory) names, as text; never followed.
    pub fn read_link(&self, name: &Path) -> Result<PathBuf, GuardError> {
        let target = rustix::fs::readlinkat(&self.fd, name, Vec::new())
            .map_err(|e| io_error("read symlink", &self.child_path(name), e.into()))?;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(
            target.as_bytes(),
        )))
    }

    /// Reads the regular file at `relative`, at most `limit` bytes; `None` when there is none.
    pub fn read_file(&self, relative: &Path, limit: u64) -> Result<Option<Vec<u8>>, GuardError> {
        let parts = components(relative)?;
        let Some((name, parents)) = parts.split_last() else {
            return Ok(None);
        };
        let mut dir = self.dir(Path::new(""), false)?;
        for parent in parents {
            dir = match dir.child_dir(parent, false) {
                Ok(dir) => dir,
                Err(GuardError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
        }
        let path = dir.child_path(name);
        // Non-blocking, so that a FIFO planted in place of the file cannot hang the reader.
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let fd = match rustix::fs::openat(&dir.fd, *name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(classify(e.into(), &path, "regular file", "open")),
        };
        let stat = rustix::fs::fstat(&fd).map_err(|e| io_error("inspect", &path, e.into()))?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(GuardError::WrongType {
                path,
                expected: "regular file",
            });
        }
        if u64::try_from(stat.st_size).unwrap_or(u64::MAX) > limit {
            return Err(GuardError::TooLarge { path, limit });
        }
        let mut bytes = Vec::new();
        File::from(fd)
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| io_error("read", &path, e))?;
        if bytes.len() as u64 > limit {
            return Err(GuardError::TooLarge { path, limit });
        }
        Ok(Some(bytes))
    }
}

/// What is at a path: its type, permission bits and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub kind: FileType,
    pub mode: u32,
    pub size: u64,
}

impl Entry {
    fn from_stat(stat: &rustix::fs::Stat) -> Self {
        Self {
            kind: FileType::from_raw_mode(stat.st_mode),
            mode: stat.st_mode & 0o7777,
            size: u64::try_from(stat.st_size).unwrap_or(0),
        }
    }
}

/// The normal components of a relative path; `..`, a root or a prefix are refused.
fn components(relative: &Path) -> Result<Vec<&Path>, GuardError> {
    relative
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .map(|c| match c {
            Component::Normal(name) => Ok(Path::new(name)),
            _ => Err(GuardError::WrongType {
                path: relative.to_owned(),
                expected: "relative path without '..'",
            }),
        })
        .collect()
}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> GuardError {
    GuardError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Turns the errors `O_NOFOLLOW` and `O_DIRECTORY` produce into what they mean here.
fn classify(e: io::Error, path: &Path, expected: &'static str, action: &'static str) -> GuardError {
    match e.raw_os_error() {
        // ELOOP: the last component is a symlink and O_NOFOLLOW refused it.
        Some(code) if code == rustix::io::Errno::LOOP.raw_os_error() => GuardError::Symlink {
            path: path.to_owned(),
        },
        Some(code) if code == rustix::io::Errno::NOTDIR.raw_os_error() => {
            match std::fs::symlink_metadata(path) {
                Ok(meta) if meta.file_type().is_symlink() => GuardError::Symlink {
                    path: path.to_owned(),
                },
                _ => GuardError::WrongType {
                    path: path.to_owned(),
                    expected,
                },
            }
        }
        _ => io_error(action, path, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    #[test]
    fn writes_and_replaces_regular_files_with_the_mode_asked_for() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = GuardedDir::open(tmp.path()).unwrap();
        dir.write_file(Path::new("a/b/c.txt"), b"one", 0o600)
            .unwrap();
        dir.write_file(Path::new("a/b/c.txt"), b"two", 0o600)
            .unwrap();
        let path = tmp.path().join("a/b/c.txt");
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            dir.read_file(Path::new("a/b/c.txt"), 10).unwrap().unwrap(),
            b"two"
        );
        assert_eq!(dir.read_file(Path::new("a/nope"), 10).unwrap(), None);
        assert!(matches!(
            dir.read_file(Path::new("a/b/c.txt"), 2),
            Err(GuardError::TooLarge { .. })
        ));
    }

    #[test]
    fn never_writes_through_a_symlinked_file_or_parent() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = tmp.path().join("wt");
        std::fs::create_dir(&root).unwrap();
        symlink(outside.path().join("target"), root.join(".env")).unwrap();
        symlink(outside.path(), root.join("config")).unwrap();
        let dir = GuardedDir::open(&root).unwrap();
        let err = dir
            .write_file(Path::new(".env"), b"secret", 0o600)
            .unwrap_err();
        assert!(matches!(err, GuardError::Symlink { .. }), "{err}");
        let err = dir
            .write_file(Path::new("config/local.yml"), b"secret", 0o600)
            .unwrap_err();
        assert!(matches!(err, GuardError::Symlink { .. }), "{err}");
        let err = dir.read_file(Path::new("config/x"), 10).unwrap_err();
        assert!(matches!(err, GuardError::Symlink { .. }), "{err}");
        assert_eq!(
            std::fs::read_dir(outside.path()).unwrap().count(),
            0,
            "nothing was written outside"
        );
        symlink(outside.path(), tmp.path().join("linked-root")).unwrap();
        assert!(matches!(
            GuardedDir::open(&tmp.path().join("linked-root")),
            Err(GuardError::Symlink { .. })
        ));
    }

    #[test]
    fn a_fifo_is_neither_read_nor_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let dir = GuardedDir::open(tmp.path()).unwrap();
        assert!(matches!(
            dir.read_file(Path::new("fifo"), 10),
            Err(GuardError::WrongType { .. })
        ));
        assert!(matches!(
            dir.write_file(Path::new("fifo"), b"x", 0o600),
            Err(GuardError::WrongType { .. })
        ));
    }

    #[test]
    fn removes_a_symlink_itself_and_never_walks_through_one() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), "x").unwrap();
        let root = tmp.path().join("wt");
        std::fs::create_dir(&root).unwrap();
        symlink(outside.path().join("keep"), root.join("link")).unwrap();
        symlink(outside.path(), root.join("dir")).unwrap();
        let dir = GuardedDir::open(&root).unwrap();
        assert_eq!(
            dir.stat(Path::new("link")).unwrap().unwrap().kind,
            FileType::Symlink
        );
        assert!(matches!(
            dir.remove(Path::new("dir/keep")),
            Err(GuardError::Symlink { .. })
        ));
        assert!(matches!(
            dir.stat(Path::new("dir/keep")),
            Err(GuardError::Symlink { .. })
        ));
        assert_eq!(
            dir.read_link(Path::new("link")).unwrap(),
            outside.path().join("keep")
        );
        assert_eq!(
            dir.remove(Path::new("link")).unwrap(),
            Some(FileType::Symlink)
        );
        assert!(outside.path().join("keep").exists(), "the target stays");
        assert_eq!(dir.remove(Path::new("link")).unwrap(), None);
        assert!(dir.remove(Path::new("../x")).is_err());
    }

    #[test]
    fn refuses_paths_that_climb_out() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = GuardedDir::open(tmp.path()).unwrap();
        assert!(dir.write_file(Path::new("../x"), b"", 0o600).is_err());
        assert!(dir.write_file(Path::new("/etc/x"), b"", 0o600).is_err());
    }
}
