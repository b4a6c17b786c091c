//! Slot records, their locks, making slots and removing them.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{POOL_LABEL, PoolError, Slot, SlotState, key, unpoolable};
use crate::git::{Identity, TaskDirs};
use crate::ports::Owner;
use crate::runtime::{Network, REPO_LABEL, Runtime, TASK_LABEL};
use crate::supervisor::RunRequest;
use crate::task::TaskName;
use crate::workspace::Workspace;

/// Proof that this process holds a slot's lock.
#[derive(Debug)]
pub(crate) struct SlotClaim {
    _lock: File,
}

fn pool_dir(ws: &Workspace) -> PathBuf {
    ws.state.root().join("pool")
}

fn record_path(ws: &Workspace, id: &str) -> PathBuf {
    pool_dir(ws).join(format!("{id}.json"))
}

fn lock_path(ws: &Workspace, id: &str) -> PathBuf {
    pool_dir(ws).join(format!("{id}.lock"))
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PoolError + 'a {
    move |source| PoolError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Who holds a slot's host ports in the ledger (no task name starts with a dot).
pub(crate) fn pool_owner(ws: &Workspace, id: &str) -> Owner {
    Owner {
        repo_id: ws.repo_id.clone(),
        task: format!(".{id}"),
    }
}

fn try_lock(ws: &Workspace, id: &str) -> Result<Option<SlotClaim>, PoolError> {
    let dir = pool_dir(ws);
    fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
    let path = lock_path(ws, id);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_error("open", &path))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(SlotClaim { _lock: file })),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(io_error("lock", &path)(e)),
    }
}

fn save(ws: &Workspace, slot: &Slot) -> Result<(), PoolError> {
    let path = record_path(ws, &slot.id);
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(slot).expect("a slot always serialises");
    fs::write(&tmp, bytes).map_err(io_error("write", &tmp))?;
    fs::rename(&tmp, &path).map_err(io_error("write", &path))
}

fn read(path: &Path) -> Result<Option<Slot>, PoolError> {
    match fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| PoolError::Corrupt {
                    path: path.to_owned(),
                    source,
                })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("read", path)(e)),
    }
}

/// Every slot of the repository, with whether its maker or taker is alive (holds the lock).
pub fn status(ws: &Workspace) -> Result<Vec<(Slot, bool)>, PoolError> {
    let dir = pool_dir(ws);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("list", &dir)(e)),
    };
    let mut slots = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        if let Some(slot) = read(&path)? {
            let busy = try_lock(ws, &slot.id)?.is_none();
            slots.push((slot, busy));
        }
    }
    slots.sort_by_key(|(slot, _)| slot.created_at);
    Ok(slots)
}

/// Takes a ready slot made for `key`, if there is one: the caller holds its lock (the returned
/// claim) and the record says `taken`.
pub(crate) fn claim_ready(
    ws: &Workspace,
    key: &str,
) -> Result<Option<(Slot, SlotClaim)>, PoolError> {
    for (slot, busy) in status(ws)? {
        if busy || slot.state != SlotState::Ready || slot.key != key {
            continue;
        }
        let Some(claim) = try_lock(ws, &slot.id)? else {
            continue;
        };
        // Holding the lock, look again: someone may have taken it meanwhile.
        let Some(mut slot) = read(&record_path(ws, &slot.id))? else {
            continue;
        };
        if slot.state != SlotState::Ready {
            continue;
        }
        slot.state = SlotState::Taken;
        save(ws, &slot)?;
        return Ok(Some((slot, claim)));
    }
    Ok(None)
}

/// Forgets a slot a task took: its record and lock (the task owns the rest now).
pub(crate) fn forget(ws: &Workspace, id: &str) {
    let _ = fs::remove_file(record_path(ws, id));
    let _ = fs::remove_file(lock_path(ws, id));
}

/// Makes slots for `request` (its key, its base) until `count` of them are ready or being made.
/// Returns how many it made.
pub async fn fill(
    ws: &Workspace,
    runtime: &dyn Runtime,
    request: &RunRequest,
    count: usize,
) -> Result<usize, PoolError> {
    if let Some(why) = unpoolable(request) {
        return Err(PoolError::NotPoolable { why });
    }
    // One filler at a time per repository: two runs refilling at once would otherwise both see
    // the pool short and overfill it.
    let dir = pool_dir(ws);
    fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
    let lock_path = dir.join("fill.lock");
    let fill_lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_error("open", &lock_path))?;
    let fill_lock = tokio::task::spawn_blocking(move || fill_lock.lock().map(|()| fill_lock))
        .await
        .expect("locking does not panic")
        .map_err(io_error("lock", &lock_path))?;
    let key = key(request);
    let present = status(ws)?
        .into_iter()
        .filter(|(slot, busy)| {
            slot.key == key
                && (slot.state == SlotState::Ready || (slot.state == SlotState::Creating && *busy))
        })
        .count();
    let mut made = 0;
    for _ in present..count {
        make(ws, runtime, request).await?;
        made += 1;
    }
    drop(fill_lock);
    Ok(made)
}

fn new_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{:08x}",
        (nanos as u32) ^ std::process::id().rotate_left(16)
    )
}

/// Makes one slot; on failure removes whatever it made.
async fn make(
    ws: &Workspace,
    runtime: &dyn Runtime,
    request: &RunRequest,
) -> Result<Slot, PoolError> {
    let id = new_id();
    let claim = try_lock(ws, &id)?.expect("a new slot's lock is free");
    let base = request.base.clone().unwrap_or_else(|| ws.repo.head_name());
    let base_commit = ws.repo.resolve_commit(&base)?;
    let dirs = ws.slot_dirs(&id);
    let mut slot = Slot {
        id: id.clone(),
        state: SlotState::Creating,
        key: key(request),
        image: request.image.clone(),
        base,
        base_commit: base_commit.to_string(),
        worktree: dirs.worktree.clone(),
        git_dir: dirs.git_dir.clone(),
        scratch: dirs.scratch.clone(),
        container: None,
        container_name: format!("agentbox-{}--{id}", ws.repo_id),
        ports: Default::default(),
        image_defaults: Default::default(),
        created_at: SystemTime::now(),
    };
    save(ws, &slot)?;
    match make_parts(ws, runtime, request, &mut slot, &dirs).await {
        Ok(()) => {
            slot.state = SlotState::Ready;
            save(ws, &slot)?;
            drop(claim);
            Ok(slot)
        }
        Err(e) => {
            let _ = remove_slot(ws, runtime, &slot).await;
            drop(claim);
            Err(e)
        }
    }
}

async fn make_parts(
    ws: &Workspace,
    runtime: &dyn Runtime,
    request: &RunRequest,
    slot: &mut Slot,
    dirs: &TaskDirs,
) -> Result<(), PoolError> {
    let wanted = crate::supervisor::port_names(request);
    let (ledger, owner, range) = (
        ws.ports.clone(),
        pool_owner(ws, &slot.id),
        request.port_range,
    );
    slot.ports = tokio::task::spawn_blocking(move || {
        ledger.reserve(&owner, &wanted, range, &Default::default())
    })
    .await
    .expect("reserving ports does not panic")?;
    save(ws, slot)?;

    let start: gix::ObjectId = slot.base_commit.parse().expect("written from an object id");
    let own = crate::supervisor::own_files(request);
    let (repo, owned_dirs) = (ws.repo.clone(), dirs.clone());
    tokio::task::spawn_blocking(move || owned_dirs.create(&repo, start, &own))
        .await
        .expect("creating directories does not panic")?;

    // The plan of a task, made for a stand-in name and then made the slot's: its own names and
    // labels, no environment (the task's comes with its command), and an idle command.
    let stand_in = TaskName::parse(&format!("pool-{}", slot.id)).expect("a valid name");
    let stand_in_request = RunRequest {
        task: stand_in,
        setup: Vec::new(),
        ..request.clone()
    };
    let identity = ws.repo.identity().unwrap_or_else(Identity::fallback);
    let (mut plan, _) =
        crate::supervisor::plan(ws, &stand_in_request, dirs, &identity, &slot.ports)?;
    let name_prefix = format!("agentbox-{}-pool-{}", ws.repo_id, slot.id);
    let retag = |labels: &mut std::collections::HashMap<String, String>| {
        labels.remove(TASK_LABEL);
        labels.remove("agentbox.branch");
        labels.insert(POOL_LABEL.to_owned(), slot.id.clone());
    };
    plan.task.name = slot.container_name.clone();
    retag(&mut plan.task.labels);
    plan.task.env = Vec::new();
    plan.task.entrypoint = Some(vec!["sleep".into(), "2147483647".into()]);
    plan.task.command = None;
    for service in &mut plan.services {
        retag(&mut service.labels);
        service.name = service.name.replace(&name_prefix, &slot.container_name);
    }
    if let Some(network) = plan.network.as_mut()
        && !network.shared_isolated
    {
        retag(&mut network.labels);
        let own = slot.container_name.clone();
        network.name = own.clone();
        for spec in std::iter::once(&mut plan.task).chain(plan.services.iter_mut()) {
            if let Network::Named { name, .. } = &mut spec.network {
                *name = own.clone();
            }
        }
    }

    let checkout = dirs.checkout(&ws.repo, request.checkout_workers);
    let sandbox = runtime.create_sandbox(&plan);
    let (checkout, sandbox) = tokio::join!(checkout, sandbox);
    let sandbox = sandbox.map_err(|(e, _)| e)?;
    checkout?;
    let container = sandbox
        .container
        .clone()
        .expect("a created sandbox has its container");
    slot.container = Some(container.clone());
    slot.image_defaults = sandbox.image_defaults.clone();
    save(ws, slot)?;
    runtime
        .start(&container)
        .await
        .map_err(|e| PoolError::Making {
            slot: slot.id.clone(),
            source: Box::new(crate::supervisor::RunError::Runtime(e.into_runtime_error(
                "starting the idle command of",
                &slot.container_name,
            ))),
        })?;
    Ok(())
}

/// Removes a slot and everything it made: containers and network (by their pool label), its
/// directories, its ports, its record.
pub async fn remove_slot(
    ws: &Workspace,
    runtime: &dyn Runtime,
    slot: &Slot,
) -> Result<(), PoolError> {
    let labels = [
        format!("{REPO_LABEL}={}", ws.repo_id),
        format!("{POOL_LABEL}={}", slot.id),
    ];
    for container in runtime.find_containers(&labels).await? {
        runtime.remove_container(&container.id).await?;
    }
    for network in runtime.find_networks(&labels).await? {
        runtime.remove_network(&network.id).await?;
    }
    let dirs = super::slot_dirs_of(slot);
    tokio::task::spawn_blocking(move || dirs.remove())
        .await
        .expect("removing directories does not panic")?;
    ws.ports
        .release_off_runtime(&pool_owner(ws, &slot.id))
        .await?;
    forget(ws, &slot.id);
    Ok(())
}

/// Slots whose maker died (`creating`) or whose taker died before the task owned it (`taken`,
/// and no task record names it), and containers labelled for a slot that has no record: removed.
/// Ready slots stay: they are the pool. Returns the ids removed.
pub async fn collect_dead(
    ws: &Workspace,
    runtime: &dyn Runtime,
    owned_by_tasks: &BTreeSet<String>,
) -> Result<Vec<String>, PoolError> {
    let mut removed = Vec::new();
    let slots = status(ws)?;
    let known: BTreeSet<String> = slots.iter().map(|(s, _)| s.id.clone()).collect();
    for (slot, busy) in slots {
        if busy || slot.state == SlotState::Ready {
            continue;
        }
        if slot.state == SlotState::Taken && owned_by_tasks.contains(&slot.id) {
            forget(ws, &slot.id);
            continue;
        }
        remove_slot(ws, runtime, &slot).await?;
        removed.push(slot.id);
    }
    let labels = [
        format!("{REPO_LABEL}={}", ws.repo_id),
        POOL_LABEL.to_owned(),
    ];
    for container in runtime.find_containers(&labels).await? {
        let Some(id) = container.labels.get(POOL_LABEL) else {
            continue;
        };
        if !known.contains(id) && !owned_by_tasks.contains(id) {
            runtime.remove_container(&container.id).await?;
            removed.push(id.clone());
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::time::Duration;

    use super::*;

    /// Whether some open file waits for the flock on the file with inode `ino` (a `->` line of
    /// /proc/locks, whose fields name the file as `major:minor:inode`).
    fn someone_waits_for(ino: u64) -> bool {
        let suffix = format!(":{ino}");
        fs::read_to_string("/proc/locks")
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("->"))
            .any(|line| line.split_whitespace().any(|f| f.ends_with(&suffix)))
    }

    #[tokio::test]
    async fn removing_a_slot_waits_for_the_port_ledger_off_the_async_runtime() {
        let fx = crate::supervisor::tests::fixture();
        let ws = fx.ws.clone();
        // Another agentbox is changing its ports: it holds the ledger's lock.
        ws.ports.all_held().unwrap();
        let lock_path = ws.ports.lock_path();
        let held = OpenOptions::new().write(true).open(&lock_path).unwrap();
        held.lock().unwrap();
        let ino = fs::metadata(&lock_path).unwrap().ino();
        let (go, told) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            // A removal that blocks the runtime never lets the test say so: the lock is then let
            // go after a while, and the test fails instead of hanging.
            let told_in_time = told.recv_timeout(Duration::from_secs(20)).is_ok();
            drop(held);
            told_in_time
        });
        let fake = crate::runtime::fake::FakeRuntime::default();
        let slot = Slot::placeholder(&ws, "s1");
        let removal = tokio::spawn({
            let ws = ws.clone();
            async move { remove_slot(&ws, &fake, &slot).await }
        });
        // This task runs again while the removal waits for the lock only if the removal waits on
        // a thread of its own.
        while !removal.is_finished() && !someone_waits_for(ino) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = go.send(());
        removal.await.unwrap().unwrap();
        assert!(
            holder.join().unwrap(),
            "the removal blocked the async runtime while it waited for the port ledger's lock"
        );
    }
}
