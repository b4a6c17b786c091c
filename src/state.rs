//! The state dir: one record file and one log file per task, kept outside every path that is mounted
//! into a container so that a task can never rewrite agentbox's own records.
//!
//! There is no lock over the whole directory: records are replaced atomically (write, then rename), and
//! each task has its own lock file that its supervisor holds for as long as it lives. Holding that
//! lock is what "this task is running" means; the kernel drops it when the supervisor dies, however it
//! dies, so a record in an active state whose lock is free was left by a dead run.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::task::{TaskName, TaskRecord};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "the record of task {task} ({}) is damaged: {source}; move it away to let agentbox forget the task (its branch stays)",
        path.display()
    )]
    Corrupt {
        task: TaskName,
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the record of task {task} is damaged: {what}")]
    Damaged {
        task: crate::task::TaskName,
        what: String,
    },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// A stable, readable identifier for a repository: its directory name plus a hash of the absolute
/// path of its git common dir, so two clones called `app` get different ids.
pub fn repo_id(repo_name: &str, common_dir: &Path) -> String {
    let name: String = repo_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(24)
        .collect();
    let name = name.trim_matches('-');
    let name = if name.is_empty() { "repo" } else { name };
    format!(
        "{name}-{:08x}",
        fnv1a(common_dir.as_os_str().as_encoded_bytes()) as u32
    )
}

/// FNV-1a: a fixed hash that will not change between Rust releases, unlike std's `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// Proof that this process supervises a task. Dropping it (or dying) releases the task.
#[derive(Debug)]
pub struct TaskClaim {
    _lock: File,
}

impl StateDir {
    /// `state_home` is `$XDG_STATE_HOME` (or its default), as resolved by the caller.
    pub fn new(state_home: &Path, repo_id: &str) -> Self {
        Self {
            root: state_home.join("agentbox").join(repo_id),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn tasks_dir(&self) -> PathBuf {
        self.root.join("tasks")
    }

    fn record_path(&self, name: &TaskName) -> PathBuf {
        self.tasks_dir().join(format!("{name}.json"))
    }

    fn lock_path(&self, name: &TaskName) -> PathBuf {
        self.tasks_dir().join(format!("{name}.lock"))
    }

    /// The task's log: a directory of segments (see [`crate::output::log`]).
    pub fn log_path(&self, name: &TaskName) -> PathBuf {
        self.root.join("logs").join(name.as_str())
    }

    /// Logs of the commands agents ran in the task (`task_run`), one per run, by number.
    pub fn runs_path(&self, name: &TaskName) -> PathBuf {
        self.root.join("runs").join(name.as_str())
    }

    /// The task's own git dir, mounted into its container (and nothing else of the state dir is).
    pub fn task_git_dir(&self, name: &TaskName) -> PathBuf {
        self.git_dirs_root().join(name.as_str())
    }

    /// The directory holding every task's own git dir.
    pub fn git_dirs_root(&self) -> PathBuf {
        self.root.join("git")
    }

    /// Where a finished task's directories wait for their deletion, with the manifests listing them
    /// (see [`crate::trash`]).
    pub fn trash_dir(&self) -> PathBuf {
        self.root.join("trash")
    }

    /// agentbox's scratch git dir for the task; never mounted anywhere.
    pub fn scratch_dir(&self, name: &TaskName) -> PathBuf {
        self.scratch_root().join(name.as_str())
    }

    /// The directory holding every task's scratch dir.
    pub fn scratch_root(&self) -> PathBuf {
        self.root.join("scratch")
    }

    fn ensure_dirs(&self) -> Result<(), StateError> {
        for dir in [self.tasks_dir(), self.root.join("logs")] {
            fs::create_dir_all(&dir).map_err(io_error("create state directory", &dir))?;
        }
        Ok(())
    }

    fn open_lock(&self, name: &TaskName) -> Result<File, StateError> {
        self.ensure_dirs()?;
        let path = self.lock_path(name);
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error("open task lock", &path))
    }

    /// Takes the task for this process, or returns `None` when a live supervisor already holds it.
    ///
    /// Others look at the lock for a moment to learn whether the task is supervised
    /// ([`is_supervised`](Self::is_supervised)); a claim that meets one of those glances tries again
    /// for a little while, so that only a real supervisor makes it fail.
    pub fn try_claim(&self, name: &TaskName) -> Result<Option<TaskClaim>, StateError> {
        const ATTEMPTS: u32 = 50;
        for attempt in 1..=ATTEMPTS {
            match self.try_lock_once(name)? {
                Some(claim) => return Ok(Some(claim)),
                None if attempt == ATTEMPTS => return Ok(None),
                None => std::thread::sleep(std::time::Duration::from_millis(2)),
            }
        }
        Ok(None)
    }

    fn try_lock_once(&self, name: &TaskName) -> Result<Option<TaskClaim>, StateError> {
        loop {
            let file = self.open_lock(name)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Ok(None),
                Err(TryLockError::Error(source)) => {
                    return Err(StateError::Io {
                        action: "lock",
                        path: self.lock_path(name),
                        source,
                    });
                }
            }
            // The holder of an earlier claim may have removed the task (and its lock file) while we
            // waited: a lock on a file that is no longer at the path proves nothing. Open it again.
            if self.is_current_lock(name, &file) {
                return Ok(Some(TaskClaim { _lock: file }));
            }
        }
    }

    fn is_current_lock(&self, name: &TaskName, file: &File) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (fs::metadata(self.lock_path(name)), file.metadata()) {
            (Ok(at_path), Ok(held)) => at_path.ino() == held.ino() && at_path.dev() == held.dev(),
            _ => false,
        }
    }

    /// Whether a live process supervises the task. The look takes a shared lock for an instant,
    /// which only a supervisor's exclusive one keeps out, so lookers never mistake each other for a
    /// supervisor; a claim that meets a look tries again ([`try_claim`](Self::try_claim)).
    pub fn is_supervised(&self, name: &TaskName) -> Result<bool, StateError> {
        let file = self.open_lock(name)?;
        match file.try_lock_shared() {
            Ok(()) => Ok(false),
            Err(TryLockError::WouldBlock) => Ok(true),
            Err(TryLockError::Error(source)) => Err(StateError::Io {
                action: "lock",
                path: self.lock_path(name),
                source,
            }),
        }
    }

    /// Blocks until no process supervises the task any more (its supervisor finished or died).
    pub fn wait_unsupervised(&self, name: &TaskName) -> Result<(), StateError> {
        loop {
            let file = self.open_lock(name)?;
            file.lock_shared()
                .map_err(io_error("wait for the lock", &self.lock_path(name)))?;
            // A lock file removed with the task while we waited: the task is not supervised, but a
            // new run may have started on a new lock file; look at that one.
            if self.is_current_lock(name, &file) || !self.lock_path(name).exists() {
                return Ok(());
            }
        }
    }

    pub fn read(&self, name: &TaskName) -> Result<Option<TaskRecord>, StateError> {
        let path = self.record_path(name);
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| StateError::Corrupt {
                        task: name.clone(),
                        path,
                        source,
                    })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("read", &path)(e)),
        }
    }

    /// [`write`](Self::write) on a blocking thread: it syncs the file to disk, which must not stall
    /// the other tasks an async caller drives.
    pub async fn save(&self, record: &TaskRecord) -> Result<(), StateError> {
        let (state, record) = (self.clone(), record.clone());
        tokio::task::spawn_blocking(move || state.write(&record))
            .await
            .expect("writing a record does not panic")
    }

    /// Replaces the task's record atomically, so a reader never sees half a record.
    pub fn write(&self, record: &TaskRecord) -> Result<(), StateError> {
        self.ensure_dirs()?;
        let path = self.record_path(&record.name);
        let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
        let bytes = serde_json::to_vec_pretty(record).expect("a task record always serialises");
        let mut file = File::create(&tmp).map_err(io_error("create", &tmp))?;
        file.write_all(&bytes).map_err(io_error("write", &tmp))?;
        file.sync_data().map_err(io_error("sync", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_error("replace", &path))
    }

    /// Forgets a task: its record, its logs and its lock file. Only the holder of the task's claim
    /// may: nobody else can be using the lock file then. (A process that opened it just before it
    /// goes finds the task busy once, which is true.)
    pub fn remove(&self, name: &TaskName, _claim: &TaskClaim) -> Result<(), StateError> {
        for log in [self.log_path(name), self.runs_path(name)] {
            match fs::remove_dir_all(&log) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("remove", &log)(e)),
            }
        }
        for path in [self.record_path(name), self.lock_path(name)] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("remove", &path)(e)),
            }
        }
        Ok(())
    }

    /// Every task record, sorted by name; the first one that cannot be read fails the whole list
    /// (see [`list_all`](Self::list_all) for a list that goes on past it).
    pub fn list(&self) -> Result<Vec<TaskRecord>, StateError> {
        let listing = self.list_all()?;
        match listing.damaged.into_iter().next() {
            Some(damaged) => Err(damaged),
            None => Ok(listing.records),
        }
    }

    /// Every task record that can be read, sorted by name, and why each other one cannot: a
    /// damaged record keeps its own task from being looked at, never the others.
    pub fn list_all(&self) -> Result<Listing, StateError> {
        let dir = self.tasks_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Listing::default()),
            Err(e) => return Err(io_error("list", &dir)(e)),
        };
        let mut listing = Listing::default();
        for entry in entries {
            let entry = entry.map_err(io_error("list", &dir))?;
            let file_name = entry.file_name();
            let Some(stem) = file_name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            let Ok(name) = TaskName::parse(stem) else {
                continue;
            };
            match self.read(&name) {
                Ok(Some(record)) => listing.records.push(record),
                Ok(None) => {}
                Err(e) => listing.damaged.push(e),
            }
        }
        listing.records.sort_by(|a, b| a.name.cmp(&b.name));
        listing.damaged.sort_by_key(|e| e.task().cloned());
        Ok(listing)
    }
}

/// What [`StateDir::list_all`] found.
#[derive(Debug, Default)]
pub struct Listing {
    pub records: Vec<TaskRecord>,
    /// One error per record that could not be read, naming its task and file.
    pub damaged: Vec<StateError>,
}

impl StateError {
    /// The task whose record this is about, when it is about one.
    pub fn task(&self) -> Option<&TaskName> {
        match self {
            Self::Corrupt { task, .. } | Self::Damaged { task, .. } => Some(task),
            Self::Io { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::TaskState;
    use std::time::SystemTime;

    fn record(name: &str) -> TaskRecord {
        let name = TaskName::parse(name).unwrap();
        TaskRecord {
            branch: name.branch(),
            name,
            state: TaskState::Running,
            base: "HEAD".into(),
            base_commit: "0".repeat(40),
            image: "img".into(),
            command: vec!["true".into()],
            worktree: "/wt".into(),
            container_name: "c".into(),
            container_id: None,
            created_branch: true,
            supervisor_pid: 1,
            exit_code: None,
            started_at: SystemTime::UNIX_EPOCH,
            finished_at: None,
            snapshot_commit: None,
            error: None,
            ports: Default::default(),
            env: Vec::new(),
            own_files: Vec::new(),
            left_out: Vec::new(),
            oom_killed: false,
            memory_limit: None,
            pool_slot: None,
            tty: false,
            stdin: false,
            idle: false,
            sandbox: None,
        }
    }

    #[test]
    fn repo_id_is_readable_and_tells_same_named_repos_apart() {
        let a = repo_id("My App.git", Path::new("/a/My App.git"));
        let b = repo_id("My App.git", Path::new("/b/My App.git"));
        assert!(a.starts_with("my-app-git-"), "{a}");
        assert_ne!(a, b);
        assert_eq!(a, repo_id("My App.git", Path::new("/a/My App.git")));
    }

    #[test]
    fn records_round_trip_and_list_sorted() {
        let home = tempfile::tempdir().unwrap();
        let state = StateDir::new(home.path(), "r-1");
        assert!(state.list().unwrap().is_empty());
        state.write(&record("b")).unwrap();
        state.write(&record("a")).unwrap();
        let names: Vec<_> = state
            .list()
            .unwrap()
            .into_iter()
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(names, ["a", "b"]);
        let a = TaskName::parse("a").unwrap();
        assert_eq!(state.read(&a).unwrap(), Some(record("a")));
        let claim = state.try_claim(&a).unwrap().unwrap();
        state.remove(&a, &claim).unwrap();
        assert!(!state.lock_path(&a).exists(), "no lock file piles up");
        assert_eq!(state.read(&a).unwrap(), None);
    }

    #[test]
    fn a_claimed_task_cannot_be_claimed_twice() {
        let home = tempfile::tempdir().unwrap();
        let state = StateDir::new(home.path(), "r-1");
        let name = TaskName::parse("t").unwrap();
        let claim = state
            .try_claim(&name)
            .unwrap()
            .expect("first claim succeeds");
        assert!(state.try_claim(&name).unwrap().is_none());
        assert!(state.is_supervised(&name).unwrap());
        drop(claim);
        assert!(!state.is_supervised(&name).unwrap());
    }
}
