//! Host ports for tasks: one ledger for the whole machine (every repository's tasks), behind a file
//! lock, so no two tasks are ever promised the same port. Each port is also checked free by the OS
//! before it is promised, which catches everything that is not an agentbox task.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::PortRange;

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error(
        "no free host port left in range {range} for task {task} (wanted {wanted}); widen port_range in agentbox.toml or end other tasks"
    )]
    Exhausted {
        range: PortRange,
        task: String,
        wanted: usize,
    },
    #[error("cannot {action} port ledger {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("port ledger {} is corrupt: {source}", path.display())]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// A port of the task or of one of its services: where it listens inside, where it is on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    pub container: u16,
    pub host: u16,
}

impl PortMapping {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.host)
    }
}

/// Who holds a reservation: one task of one repository.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Owner {
    pub repo_id: String,
    pub task: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    owner: Owner,
    name: String,
}

/// host port -> who holds it, under which name.
type Ledger = BTreeMap<u16, Entry>;

#[derive(Debug, Clone)]
pub struct PortLedger {
    dir: PathBuf,
}

impl PortLedger {
    /// `state_home` is `$XDG_STATE_HOME` (or its default): the ledger is shared by every repository.
    pub fn new(state_home: &Path) -> Self {
        Self {
            dir: state_home.join("agentbox"),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("ports.json")
    }

    /// The machine-wide lock every change of the ledger takes.
    pub(crate) fn lock_path(&self) -> PathBuf {
        self.dir.join("ports.lock")
    }

    fn io(&self, action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PortError {
        let path = path.to_owned();
        move |source| PortError::Io {
            action,
            path,
            source,
        }
    }

    /// Runs `change` on the ledger under the machine-wide lock and saves what it returns.
    fn update<T>(
        &self,
        change: impl FnOnce(&mut Ledger) -> Result<T, PortError>,
    ) -> Result<T, PortError> {
        fs::create_dir_all(&self.dir).map_err(self.io("create the directory of", &self.path()))?;
        let lock_path = self.lock_path();
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(self.io("open the lock of", &lock_path))?;
        lock.lock().map_err(self.io("lock", &lock_path))?;
        let path = self.path();
        let mut ledger: Ledger = match fs::read(&path) {
            Ok(bytes) if bytes.is_empty() => Ledger::new(),
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| PortError::Corrupt {
                path: path.clone(),
                source,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ledger::new(),
            Err(e) => return Err(self.io("read", &path)(e)),
        };
        let before = ledger.clone();
        let result = change(&mut ledger)?;
        if ledger != before {
            let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
            let mut file = File::create(&tmp).map_err(self.io("write", &tmp))?;
            let bytes = serde_json::to_vec(&ledger).expect("the ledger always serialises");
            file.write_all(&bytes).map_err(self.io("write", &tmp))?;
            fs::rename(&tmp, &path).map_err(self.io("replace", &path))?;
        }
        Ok(result)
    }

    /// Reserves one host port per name for `owner`. Ports the owner already holds are kept (a task
    /// resumed after a crash gets the same ports); `preferred` ports (from an earlier run of the
    /// task) are tried first. Either every name gets a port or nothing is reserved.
    pub fn reserve(
        &self,
        owner: &Owner,
        names: &[String],
        range: PortRange,
        preferred: &BTreeMap<String, u16>,
    ) -> Result<BTreeMap<String, u16>, PortError> {
        if names.is_empty() {
            return Ok(BTreeMap::new());
        }
        self.update(|ledger| {
            let mut granted: BTreeMap<String, u16> = ledger
                .iter()
                .filter(|(_, e)| &e.owner == owner && names.contains(&e.name))
                .map(|(port, e)| (e.name.clone(), *port))
                .collect();
            let mut candidates = (range.first..=range.last).filter(|p| !ledger.contains_key(p));
            for name in names {
                if granted.contains_key(name) {
                    continue;
                }
                let wanted = preferred
                    .get(name)
                    .copied()
                    .filter(|p| !ledger.contains_key(p) && !granted.values().any(|g| g == p))
                    .filter(|p| is_free(*p));
                let port = match wanted {
                    Some(port) => port,
                    None => candidates
                        .by_ref()
                        .find(|p| !granted.values().any(|g| g == p) && is_free(*p))
                        .ok_or_else(|| PortError::Exhausted {
                            range,
                            task: owner.task.clone(),
                            wanted: names.len(),
                        })?,
                };
                granted.insert(name.clone(), port);
            }
            for (name, port) in &granted {
                ledger.insert(
                    *port,
                    Entry {
                        owner: owner.clone(),
                        name: name.clone(),
                    },
                );
            }
            Ok(granted)
        })
    }

    /// Releases every port `owner` holds.
    pub fn release(&self, owner: &Owner) -> Result<(), PortError> {
        self.update(|ledger| {
            ledger.retain(|_, e| &e.owner != owner);
            Ok(())
        })
    }

    /// [`release`](Self::release) on a blocking thread: the ledger's lock is machine-wide, and
    /// waiting for it must not stall the other tasks an async caller drives.
    pub async fn release_off_runtime(&self, owner: &Owner) -> Result<(), PortError> {
        let (ledger, owner) = (self.clone(), owner.clone());
        tokio::task::spawn_blocking(move || ledger.release(&owner))
            .await
            .expect("releasing ports does not panic")
    }

    /// Hands every port `from` holds to `to` (a pool slot's to the task that took it).
    pub fn transfer(&self, from: &Owner, to: &Owner) -> Result<BTreeMap<String, u16>, PortError> {
        self.update(|ledger| {
            let mut moved = BTreeMap::new();
            for (port, entry) in ledger.iter_mut() {
                if &entry.owner == from {
                    entry.owner = to.clone();
                    moved.insert(entry.name.clone(), *port);
                }
            }
            Ok(moved)
        })
    }

    /// Releases the ports `owner` holds under `names` (a service that could not start).
    pub fn release_names(&self, owner: &Owner, names: &[String]) -> Result<(), PortError> {
        self.update(|ledger| {
            ledger.retain(|_, e| &e.owner != owner || !names.contains(&e.name));
            Ok(())
        })
    }

    /// Every port the ledger holds, for anyone.
    pub fn all_held(&self) -> Result<Vec<u16>, PortError> {
        self.update(|ledger| Ok(ledger.keys().copied().collect()))
    }

    /// The ports `owner` holds, by name.
    pub fn held_by(&self, owner: &Owner) -> Result<BTreeMap<String, u16>, PortError> {
        self.update(|ledger| {
            Ok(ledger
                .iter()
                .filter(|(_, e)| &e.owner == owner)
                .map(|(port, e)| (e.name.clone(), *port))
                .collect())
        })
    }
}

/// Whether nothing listens on the port on the loopback address the engine will publish it on.
/// Whether the OS lets a listener have `port` on 127.0.0.1 now.
pub fn is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(task: &str) -> Owner {
        Owner {
            repo_id: "r".into(),
            task: task.into(),
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reservations_are_unique_stable_and_released() {
        let home = tempfile::tempdir().unwrap();
        let ledger = PortLedger::new(home.path());
        let range = PortRange {
            first: 41000,
            last: 41099,
        };
        let none = BTreeMap::new();
        let a = ledger
            .reserve(&owner("a"), &names(&["web", "api"]), range, &none)
            .unwrap();
        let b = ledger
            .reserve(&owner("b"), &names(&["web"]), range, &none)
            .unwrap();
        assert_ne!(a["web"], a["api"]);
        assert!(!a.values().any(|p| *p == b["web"]));
        assert_eq!(
            ledger
                .reserve(&owner("a"), &names(&["web", "api"]), range, &none)
                .unwrap(),
            a
        );
        assert_eq!(ledger.held_by(&owner("a")).unwrap(), a);
        ledger.release(&owner("a")).unwrap();
        assert!(ledger.held_by(&owner("a")).unwrap().is_empty());
        assert_eq!(ledger.held_by(&owner("b")).unwrap(), b);
    }

    #[test]
    fn an_exhausted_range_names_it_and_reserves_nothing() {
        let home = tempfile::tempdir().unwrap();
        let ledger = PortLedger::new(home.path());
        let range = PortRange {
            first: 41100,
            last: 41101,
        };
        let none = BTreeMap::new();
        ledger
            .reserve(&owner("a"), &names(&["x"]), range, &none)
            .unwrap();
        let err = ledger
            .reserve(&owner("b"), &names(&["x", "y"]), range, &none)
            .unwrap_err();
        assert!(err.to_string().contains("41100-41101"), "{err}");
        assert!(ledger.held_by(&owner("b")).unwrap().is_empty());
    }

    #[test]
    fn a_port_in_use_by_another_program_is_skipped() {
        let home = tempfile::tempdir().unwrap();
        let ledger = PortLedger::new(home.path());
        let busy = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = busy.local_addr().unwrap().port();
        let range = PortRange {
            first: port,
            last: port.saturating_add(1).max(port),
        };
        let preferred = BTreeMap::from([("web".to_owned(), port)]);
        match ledger.reserve(&owner("a"), &names(&["web"]), range, &preferred) {
            Ok(granted) => assert_ne!(granted["web"], port),
            Err(PortError::Exhausted { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
}
