//! `copy` of `agentbox.toml`: untracked files (`.env`, local configuration) taken from the user's
//! checkout into each new worktree.
//!
//! An entry that is itself a symlink is copied as what it points to, if that is inside the
//! repository. Inside a copied directory, symlinks are copied as symlinks (so a cycle is copied, not
//! followed without end), and only relative ones that stay inside the repository: an absolute link,
//! or one climbing out, would point the task at files beside its worktree. The worktree side is
//! written through a [`GuardedDir`], so a symlink the task committed in place of a copy target (or
//! one of its parents) is an error, never a write outside.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::fs_guard::{GuardError, GuardedDir};

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(
        "copy path {} leads outside the repository; agentbox copies only files inside it",
        path.display()
    )]
    Escapes { path: PathBuf },
    #[error(
        "copy path {} holds the symlink {} -> {}, which leads outside the repository; agentbox copies only symlinks that stay inside it",
        entry.display(), link.display(), target.display()
    )]
    SymlinkEscapes {
        entry: PathBuf,
        link: PathBuf,
        target: PathBuf,
    },
    #[error("copy path {} holds {}, which is neither a file, a directory nor a symlink", entry.display(), path.display())]
    Special { entry: PathBuf, path: PathBuf },
    #[error("cannot copy {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Worktree(#[from] GuardError),
}

/// Copies each of `paths` (relative, already checked not to contain `..`) from `source_root` into
/// the worktree.
pub fn copy_into(
    source_root: &Path,
    worktree: &GuardedDir,
    paths: &[PathBuf],
) -> Result<(), CopyError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CopyError::Io { path, source }
    };
    let root = source_root.canonicalize().map_err(io(source_root))?;
    for relative in paths {
        let source = root.join(relative);
        let resolved = source.canonicalize().map_err(io(&source))?;
        if !resolved.starts_with(&root) {
            return Err(CopyError::Escapes {
                path: relative.clone(),
            });
        }
        let meta = fs::metadata(&resolved).map_err(io(&resolved))?;
        if meta.is_dir() {
            worktree.create_dir(relative)?;
            copy_dir(&root, relative, &resolved, relative, worktree)?;
        } else if meta.is_file() {
            worktree.copy_file_from(&resolved, relative, meta.permissions().mode() & 0o777)?;
        } else {
            return Err(CopyError::Special {
                entry: relative.clone(),
                path: resolved,
            });
        }
    }
    Ok(())
}

/// Copies the contents of the directory `from` to `to` (relative to the worktree), without
/// following any symlink in it.
fn copy_dir(
    root: &Path,
    entry: &Path,
    from: &Path,
    to: &Path,
    worktree: &GuardedDir,
) -> Result<(), CopyError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CopyError::Io { path, source }
    };
    for child in fs::read_dir(from).map_err(io(from))? {
        let child = child.map_err(io(from))?;
        let path = child.path();
        let target = to.join(child.file_name());
        let meta = fs::symlink_metadata(&path).map_err(io(&path))?;
        let kind = meta.file_type();
        if kind.is_symlink() {
            let link = fs::read_link(&path).map_err(io(&path))?;
            if !stays_inside(root, from, &link) {
                return Err(CopyError::SymlinkEscapes {
                    entry: entry.to_owned(),
                    link: path,
                    target: link,
                });
            }
            worktree.symlink(&target, &link)?;
        } else if kind.is_dir() {
            worktree.create_dir(&target)?;
            copy_dir(root, entry, &path, &target, worktree)?;
        } else if kind.is_file() {
            worktree.copy_file_from(&path, &target, meta.permissions().mode() & 0o777)?;
        } else {
            return Err(CopyError::Special {
                entry: entry.to_owned(),
                path,
            });
        }
    }
    Ok(())
}

/// Whether the relative symlink `link`, found in `dir`, names a path inside `root` (lexically: the
/// same holds in the worktree, which has the same layout).
fn stays_inside(root: &Path, dir: &Path, link: &Path) -> bool {
    if link.is_absolute() {
        return false;
    }
    let mut resolved = dir.to_path_buf();
    for component in link.components() {
        match component {
            Component::Normal(part) => resolved.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                if !resolved.pop() || !resolved.starts_with(root) {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    resolved.starts_with(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("repo");
        let wt = tmp.path().join("wt");
        fs::create_dir_all(root.join("conf/sub")).unwrap();
        fs::create_dir(&wt).unwrap();
        fs::write(root.join("conf/a.yml"), "a").unwrap();
        fs::write(root.join("conf/sub/b.yml"), "b").unwrap();
        (tmp, root, wt)
    }

    #[test]
    fn copies_directories_with_inner_symlinks_as_symlinks() {
        let (_tmp, root, wt) = setup();
        symlink("a.yml", root.join("conf/alias.yml")).unwrap();
        // A cycle: copied as a link, not followed.
        symlink("..", root.join("conf/sub/up")).unwrap();
        let dir = GuardedDir::open(&wt).unwrap();
        copy_into(&root, &dir, &[PathBuf::from("conf")]).unwrap();
        assert_eq!(fs::read_to_string(wt.join("conf/sub/b.yml")).unwrap(), "b");
        assert_eq!(
            fs::read_link(wt.join("conf/alias.yml")).unwrap(),
            Path::new("a.yml")
        );
        assert_eq!(
            fs::read_link(wt.join("conf/sub/up")).unwrap(),
            Path::new("..")
        );
    }

    #[test]
    fn refuses_symlinks_that_lead_outside() {
        let (_tmp, root, wt) = setup();
        symlink("/etc/passwd", root.join("conf/abs")).unwrap();
        let dir = GuardedDir::open(&wt).unwrap();
        let err = copy_into(&root, &dir, &[PathBuf::from("conf")]).unwrap_err();
        assert!(matches!(err, CopyError::SymlinkEscapes { .. }), "{err}");
        fs::remove_file(root.join("conf/abs")).unwrap();
        symlink("../../../outside", root.join("conf/sub/climb")).unwrap();
        let err = copy_into(&root, &dir, &[PathBuf::from("conf")]).unwrap_err();
        assert!(matches!(err, CopyError::SymlinkEscapes { .. }), "{err}");
    }

    #[test]
    fn never_writes_through_a_symlink_in_the_worktree() {
        let (tmp, root, wt) = setup();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        symlink(&outside, wt.join("conf")).unwrap();
        let dir = GuardedDir::open(&wt).unwrap();
        let err = copy_into(&root, &dir, &[PathBuf::from("conf/a.yml")]).unwrap_err();
        assert!(
            matches!(err, CopyError::Worktree(GuardError::Symlink { .. })),
            "{err}"
        );
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }
}
