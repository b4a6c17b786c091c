//! Guarded git, tried as a hostile task would: a task can change nothing on the host but its own
//! branch and its own worktree. Each test plants the worst it can — a git dir with an fsmonitor, hooks
//! and filter drivers, a `commondir`, lock files, symlinks where agentbox writes, a setuid binary,
//! rewritten refs — and then checks that on the host every ref but the task's branch is unchanged,
//! `git fsck` is clean, nothing planted ran (no marker file exists), nothing outside the worktree was
//! written, and the task's genuine work is on `agentbox/<task>`.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// Every ref of the repository with its target, but the tasks' own (`agentbox/<task>` and
/// `refs/agentbox/<task>/…`).
fn refs_except(env: &TestEnv, tasks: &[&str]) -> BTreeMap<String, String> {
    let own = |name: &str| {
        tasks.iter().any(|task| {
            name == format!("refs/heads/agentbox/{task}")
                || name.starts_with(&format!("refs/agentbox/{task}/"))
        })
    };
    env.git(["for-each-ref", "--format=%(refname) %(objectname)"])
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(name, _)| !own(name))
        .map(|(name, id)| (name.to_owned(), id.to_owned()))
        .collect()
}

/// The files planted commands would create, all under the test's temporary root (which no task
/// can see: it is not mounted).
fn markers(env: &TestEnv) -> Vec<String> {
    let mut found: Vec<String> = fs::read_dir(&env.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("pwned"))
        .collect();
    found.sort();
    found
}

/// What the host looked like before a hostile task ran.
struct Before {
    refs: BTreeMap<String, String>,
    common: Vec<PathBuf>,
}

fn before(env: &TestEnv, tasks: &[&str]) -> Before {
    Before {
        refs: refs_except(env, tasks),
        common: files_under(&env.common_dir(), &["objects", "logs"]),
    }
}

/// Files under `dir`, recursively, skipping the named top-level directories (which git itself
/// changes: new objects, reflogs).
fn files_under(dir: &Path, skip: &[&str]) -> Vec<PathBuf> {
    fn walk(dir: &Path, root: &Path, skip: &[&str], out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let relative = path.strip_prefix(root).unwrap().to_owned();
            if dir == root && skip.iter().any(|s| relative == Path::new(s)) {
                continue;
            }
            if path.is_dir() && !path.is_symlink() {
                walk(&path, root, skip, out);
            } else {
                out.push(relative);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, skip, &mut out);
    out.sort();
    out
}

/// The host after a hostile task: refs, files of the common dir, fsck, markers, and the user's own
/// `git status` and `git commit` in the main checkout run nothing planted.
fn assert_host_untouched(env: &TestEnv, tasks: &[&str], before: &Before) {
    assert_eq!(
        refs_except(env, tasks),
        before.refs,
        "no ref but the task's own changed"
    );
    let refs_files: Vec<PathBuf> = files_under(&env.common_dir(), &["objects", "logs"])
        .into_iter()
        .filter(|p| !p.starts_with("refs/heads/agentbox") && !p.starts_with("refs/agentbox"))
        .filter(|p| p != Path::new("packed-refs") && p != Path::new("index"))
        .collect();
    let expected: Vec<PathBuf> = before
        .common
        .iter()
        .filter(|p| !p.starts_with("refs/heads/agentbox") && !p.starts_with("refs/agentbox"))
        .filter(|p| *p != Path::new("packed-refs") && *p != Path::new("index"))
        .cloned()
        .collect();
    assert_eq!(refs_files, expected, "no file appeared in the common dir");
    assert!(!env.common_dir().join("commondir").exists());
    let fsck = env.git_raw(["fsck", "--full", "--no-dangling"]);
    assert!(fsck.is_some(), "git fsck --full is clean");
    if env.kind == RepoKind::Clone {
        env.git(["status", "--short"]);
        env.git([
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "the user's own commit",
        ]);
    }
    assert_eq!(markers(env), Vec::<String>::new(), "nothing planted ran");
}

/// Plants a git dir of its own in the worktree with every way config can run a command (an
/// fsmonitor, hooks, filter, diff and textconv drivers), points the worktree's `.git` file at it,
/// tries to change its real git dir's config and add a `commondir`, and leaves genuine work.
fn planted_git_dir(env: &TestEnv) -> String {
    let marker = env.root.join("pwned");
    let m = marker.display();
    format!(
        r#"set -e
real=$(git rev-parse --absolute-git-dir)
git commit -q --allow-empty -m "genuine commit"
evil=$PWD/.evil-git
git init -q "$PWD/.evil-repo" && mv "$PWD/.evil-repo/.git" "$evil" && rmdir "$PWD/.evil-repo"
mkdir -p .evil-hooks
for h in pre-commit post-commit reference-transaction post-checkout pre-auto-gc post-index-change fsmonitor-watchman; do
  printf '#!/bin/sh\ntouch {m}-hook-%s\n' "$h" > ".evil-hooks/$h"; chmod +x ".evil-hooks/$h"
done
cat >> "$evil/config" <<EOF
[core]
	fsmonitor = "touch {m}-fsmonitor; false"
	hooksPath = $PWD/.evil-hooks
	worktree = $PWD
[filter "evil"]
	clean = "touch {m}-filter-clean; cat"
	smudge = "touch {m}-filter-smudge; cat"
	process = "touch {m}-filter-process"
[diff "evil"]
	command = "touch {m}-diff"
	textconv = "touch {m}-textconv; cat"
EOF
echo '* filter=evil diff=evil' > .gitattributes
echo "gitdir: $evil" > .git
if printf '[core]\n\tfsmonitor = touch {m}-real-config\n' >> "$real/config" 2>/dev/null; then echo config=written; else echo config=denied; fi
echo "$evil" > "$real/commondir"
echo changed >> README.md
echo new > new.txt
"#
    )
}

#[test]
fn a_planted_git_dir_runs_nothing_on_diff_or_teardown() {
    let env = TestEnv::new("guard-gitdir");
    let before = before(&env, &["evil"]);
    let script = format!(
        "{}\necho ready; {}",
        planted_git_dir(&env),
        wait_for_release()
    );
    let mut run = env.spawn(["run", "evil", "--", "sh", "-c", &script]);
    run.wait_for_line("config=denied");
    run.wait_for_line("ready");
    // agentbox diff of the running task looks at the worktree with the host's git.
    let diff = env.output(["diff", "evil"]);
    diff.expect_code(0);
    assert!(diff.stdout.contains("+new"), "{diff}");
    assert_eq!(
        markers(&env),
        Vec::<String>::new(),
        "diff ran nothing planted"
    );

    env.release("evil");
    let out = run.wait();
    out.expect_code(0);
    assert_host_untouched(&env, &["evil"], &before);
    assert!(
        env.subjects("main..agentbox/evil")
            .contains(&"genuine commit".to_owned()),
        "{out}"
    );
    env.assert_snapshot_holds("evil", "new.txt", "new\n");
    assert_eq!(
        env.file_at("agentbox/evil", "README.md").as_deref(),
        Some("hello\nchanged\n")
    );
    assert_eq!(env.file_at("agentbox/evil", ".git"), None);
    env.assert_torn_down("evil");
}

#[test]
fn a_planted_git_dir_runs_nothing_when_gc_recovers_the_task() {
    let env = TestEnv::new("guard-gitdir-gc");
    let before = before(&env, &["evil"]);
    let script = format!("{}\necho ready; exec sleep 300", planted_git_dir(&env));
    let mut run = env.spawn(["run", "evil", "--", "sh", "-c", &script]);
    run.wait_for_line("ready");
    run.signal(Signal::KILL);
    run.wait();
    let gc = env.output(["gc", "--stop-timeout", "1"]);
    gc.expect_code(0);
    assert_host_untouched(&env, &["evil"], &before);
    assert!(
        env.subjects("main..agentbox/evil")
            .contains(&"genuine commit".to_owned()),
        "{gc}"
    );
    env.assert_snapshot_holds("evil", "new.txt", "new\n");
    assert_eq!(env.ls_task("evil").unwrap()["state"], "recovered");
}

#[test]
fn nothing_of_the_repositorys_git_dir_is_writable_from_a_task() {
    let env = TestEnv::new_bare("guard-common");
    let common = env.common_dir();
    let before = before(&env, &["t"]);
    let c = common.display();
    // Every path of the common dir a task could aim at; only the objects are visible (read-only).
    let script = format!(
        r#"for f in commondir config HEAD packed-refs index.lock refs/heads/main.lock info/exclude hooks/post-checkout worktrees/x/commondir; do
  if mkdir -p "$(dirname '{c}'/$f)" 2>/dev/null && echo hostile > '{c}'/$f 2>/dev/null; then :; fi
done
if touch '{c}'/objects/planted 2>/dev/null; then echo objects=written; else echo objects=denied; fi
if chmod -R u+w '{c}'/objects 2>/dev/null && rm -rf '{c}'/objects/pack 2>/dev/null; then echo pack=removed; else echo pack=kept; fi
echo work > work.txt
"#
    );
    let out = env.output(["run", "t", "--", "sh", "-c", &script]);
    out.expect_code(0);
    assert_eq!(
        out.stdout_lines(),
        ["objects=denied", "pack=kept"],
        "the repository's objects are read-only in the task\n{out}"
    );
    assert_host_untouched(&env, &["t"], &before);
    for f in [
        "commondir",
        "index.lock",
        "refs/heads/main.lock",
        "worktrees",
    ] {
        assert!(!common.join(f).exists(), "{f} appeared in the common dir");
    }
    assert_eq!(
        fs::read_to_string(common.join("HEAD")).unwrap(),
        "ref: refs/heads/main\n"
    );
    env.assert_snapshot_holds("t", "work.txt", "work\n");
}

#[test]
fn a_task_cannot_reach_another_tasks_worktree_or_git_dir() {
    let env = TestEnv::new("guard-cross");
    env.git(["branch", "release"]);
    let before = before(&env, &["victim", "attacker"]);
    let victim_script = format!(
        "echo mine > mine.txt; git add mine.txt; git commit -qm 'victim work'; echo ready; {}",
        wait_for_release()
    );
    let mut victim = env.spawn(["run", "victim", "--", "sh", "-c", &victim_script]);
    victim.wait_for_line("ready");

    let victim_wt = env.worktree_path("victim");
    let victim_git = env
        .state_root()
        .join(env.repo_id())
        .join("git")
        .join("victim");
    let attack = format!(
        r#"for d in '{wt}' '{git}'; do
  if [ -e "$d" ]; then echo "$d=visible"; else echo "$d=absent"; fi
done
mkdir -p '{git}' && echo 'ref: refs/heads/release' > '{git}/HEAD' && echo /tmp > '{git}/commondir'
mkdir -p '{wt}' && echo evil > '{wt}/mine.txt'
true"#,
        wt = victim_wt.display(),
        git = victim_git.display()
    );
    let out = env.output(["run", "attacker", "--", "sh", "-c", &attack]);
    out.expect_code(0);
    assert_eq!(
        out.stdout_lines(),
        [
            format!("{}=absent", victim_wt.display()),
            format!("{}=absent", victim_git.display())
        ],
        "another task's worktree and git dir are not in the container\n{out}"
    );
    assert!(!victim_git.join("commondir").exists());
    assert_eq!(
        fs::read_to_string(victim_wt.join("mine.txt")).unwrap(),
        "mine\n"
    );

    env.release("victim");
    victim.wait().expect_code(0);
    assert_host_untouched(&env, &["victim", "attacker"], &before);
    assert_eq!(env.subjects("main..agentbox/victim"), ["victim work"]);
    assert_eq!(
        env.file_at("agentbox/victim", "mine.txt").as_deref(),
        Some("mine\n")
    );
}

#[test]
fn refs_objects_and_history_of_the_repository_survive_a_hostile_task() {
    let env = TestEnv::new("guard-refs");
    env.git(["branch", "release"]);
    let other = env.output([
        "run",
        "other",
        "--",
        "sh",
        "-c",
        "echo o > o.txt; git add o.txt; git commit -qm 'other work'",
    ]);
    other.expect_code(0);
    let other_tip = env.rev("agentbox/other").unwrap();
    let before = before(&env, &["evil"]);
    let script = r#"set -e
echo real > real.txt; git add real.txt; git commit -qm "genuine commit"
git update-ref -d refs/heads/release
git branch -D agentbox/other
git update-ref refs/heads/main HEAD
git tag -f v-evil HEAD
git reflog expire --expire=now --all
git gc -q --prune=now
git prune --expire=now
echo 0000000000000000000000000000000000000000 refs/heads/garbage >> "$(git rev-parse --git-dir)/packed-refs"
echo wip > wip.txt
"#;
    let out = env.output(["run", "evil", "--", "sh", "-c", script]);
    out.expect_code(0);
    assert_host_untouched(&env, &["evil"], &before);
    assert_eq!(env.rev("agentbox/other"), Some(other_tip.clone()));
    assert!(env.git_try(["cat-file", "-e", &other_tip]).is_some());
    assert!(env.branch_exists("release"));
    assert!(env.rev("v-evil").is_none(), "a task's tags stay its own");
    let subjects = env.subjects("main..agentbox/evil");
    assert_eq!(
        subjects,
        [
            "agentbox: snapshot of uncommitted work in task evil",
            "genuine commit"
        ],
        "{out}"
    );
}

#[test]
fn lock_files_in_the_task_git_dir_break_nothing_on_the_host() {
    let env = TestEnv::new("guard-locks");
    let before = before(&env, &["locks"]);
    let script = r#"g=$(git rev-parse --absolute-git-dir)
echo w > w.txt
touch "$g/index.lock" "$g/HEAD.lock" "$g/packed-refs.lock" "$g/refs/heads/agentbox/locks.lock"
true"#;
    let out = env.output(["run", "locks", "--", "sh", "-c", script]);
    out.expect_code(0);
    env.assert_snapshot_holds("locks", "w.txt", "w\n");
    env.assert_torn_down("locks");
    // Includes the user's own commit, which the planted locks must not break.
    assert_host_untouched(&env, &["locks"], &before);
}

#[test]
fn the_env_file_is_never_written_through_a_symlink_the_task_committed() {
    let env = TestEnv::new("guard-envlink");
    let before = before(&env, &["t"]);
    let stolen = env.root.join("stolen-env");
    let first = format!(
        "rm -f .env.agentbox && ln -s '{}' .env.agentbox && git add -f .env.agentbox && \
         git commit -qm 'env file as a symlink'",
        stolen.display()
    );
    env.output(["run", "t", "--", "sh", "-c", &first])
        .expect_code(0);
    assert_eq!(
        env.git(["ls-tree", "agentbox/t", ".env.agentbox"])
            .split_whitespace()
            .next(),
        Some("120000"),
        "the task committed its env file as a symlink"
    );
    let tip = env.rev("agentbox/t");

    let second = env.output(["run", "t", "--env", "SECRET=hunter2", "--", "true"]);
    second.expect_code(125);
    second.expect_stderr_contains(".env.agentbox is a symlink");
    assert!(!stolen.exists(), "nothing was written through the symlink");
    assert_eq!(env.rev("agentbox/t"), tip, "the branch is as it was");
    assert!(!env.worktree_path("t").exists());
    assert_eq!(env.containers(), Vec::<String>::new());
    assert_host_untouched(&env, &["t"], &before);
}

#[test]
fn copy_never_writes_through_a_symlinked_parent_the_task_committed() {
    let env = TestEnv::new("guard-copylink");
    let outside = env.root.join("outside");
    fs::create_dir(&outside).unwrap();
    env.write_config("copy = [\"conf/local.yml\"]\n");
    fs::create_dir(env.repo.join("conf")).unwrap();
    fs::write(env.repo.join("conf/local.yml"), "secret: 1\n").unwrap();
    let before = before(&env, &["t"]);
    let first = format!(
        "rm -rf conf && ln -s '{}' conf && git add -A conf && git commit -qm 'conf as a symlink'",
        outside.display()
    );
    env.output(["run", "t", "--", "sh", "-c", &first])
        .expect_code(0);

    let second = env.output(["run", "t", "--", "true"]);
    second.expect_code(125);
    second.expect_stderr_contains("is a symlink");
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing was copied outside"
    );
    assert!(!env.worktree_path("t").exists());
    assert_host_untouched(&env, &["t"], &before);
}

#[test]
fn a_replaced_info_dir_or_objects_dir_in_the_task_git_dir_is_never_followed() {
    let env = TestEnv::new("guard-info");
    let before = before(&env, &["t"]);
    let outside = env.root.join("outside-info");
    fs::create_dir(&outside).unwrap();
    let script = format!(
        r#"g=$(git rev-parse --absolute-git-dir)
rm -rf "$g/info" && ln -s '{o}' "$g/info"
if mv "$g/objects" "$g/objects.moved" 2>/dev/null; then echo objects=moved; else echo objects=kept; fi
if echo '/elsewhere' > "$g/objects/info/alternates" 2>/dev/null; then echo alternates=written; else echo alternates=denied; fi
echo w > w.txt"#,
        o = outside.display()
    );
    let out = env.output(["run", "t", "--", "sh", "-c", &script]);
    out.expect_code(0);
    assert_eq!(
        out.stdout_lines(),
        ["objects=kept", "alternates=denied"],
        "{out}"
    );
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    env.assert_snapshot_holds("t", "w.txt", "w\n");
    env.assert_torn_down("t");
    assert_host_untouched(&env, &["t"], &before);
}

#[test]
fn a_setuid_file_never_lands_in_the_repository() {
    let env = TestEnv::new("guard-setuid");
    let before = before(&env, &["t"]);
    let objects = env.common_dir().join("objects");
    let script = format!(
        "cp /bin/sh ./suid && chmod u+s ./suid && ls -l ./suid | cut -c4; \
         if cp /bin/sh '{o}/suid' 2>/dev/null; then echo planted; else echo refused; fi",
        o = objects.display()
    );
    let out = env.output(["run", "t", "--", "sh", "-c", &script]);
    out.expect_code(0);
    assert_eq!(out.stdout_lines(), ["s", "refused"], "{out}");
    let setuid: Vec<PathBuf> = files_under(&env.common_dir(), &[])
        .into_iter()
        .filter(|p| {
            fs::symlink_metadata(env.common_dir().join(p))
                .is_ok_and(|m| m.permissions().mode() & 0o4000 != 0)
        })
        .collect();
    assert_eq!(setuid, Vec::<PathBuf>::new());
    env.assert_torn_down("t");
    assert_host_untouched(&env, &["t"], &before);
}

#[test]
fn two_tasks_stashes_and_gc_never_touch_each_other() {
    let env = TestEnv::new("guard-stash");
    let before = before(&env, &["a", "b"]);
    let first = format!(
        "echo a > a.txt && git add a.txt && git commit -qm 'a work' && echo stash-a > s.txt && \
         git stash push -q -u -m from-a && echo ready; {} ; git stash list | wc -l; git stash list",
        wait_for_release()
    );
    let mut a = env.spawn(["run", "a", "--", "sh", "-c", &first]);
    a.wait_for_line("ready");
    let second = "echo stash-b > s.txt && git stash push -q -u -m from-b && git stash list | wc -l \
                  && git reflog expire --expire=now --all && git gc -q --prune=now && \
                  git prune --expire=now && echo pruned";
    let b = env.output(["run", "b", "--", "sh", "-c", second]);
    b.expect_code(0);
    assert_eq!(
        b.stdout_lines(),
        ["1", "pruned"],
        "b sees only its stash\n{b}"
    );

    env.release("a");
    let a = a.wait();
    a.expect_code(0);
    let lines = a.stdout_lines();
    assert_eq!(lines[1], "1", "a sees only its own stash\n{a}");
    assert!(lines[2].contains("from-a"), "{a}");
    assert_eq!(env.subjects("main..agentbox/a"), ["a work"]);
    // The stash is work too: it outlives the task's git dir.
    assert_eq!(
        env.file_at("refs/agentbox/a/stash^3", "s.txt").as_deref(),
        Some("stash-a\n"),
        "the stashed untracked file is kept"
    );
    assert_host_untouched(&env, &["a", "b"], &before);
}

#[test]
fn worktree_prune_and_removed_locks_in_one_task_strand_no_other_tasks_work() {
    let env = TestEnv::new("guard-prune");
    let before = before(&env, &["victim", "attacker"]);
    let victim_script = format!(
        "echo v > v.txt && git add v.txt && git commit -qm 'victim work' && echo wip > wip.txt && \
         echo ready; {}",
        wait_for_release()
    );
    let mut victim = env.spawn(["run", "victim", "--", "sh", "-c", &victim_script]);
    victim.wait_for_line("ready");
    let common = env.common_dir();
    let attack = format!(
        r#"c=$(git rev-parse --git-common-dir)
rm -f "$c"/worktrees/*/locked '{host}'/worktrees/*/locked 2>/dev/null
rm -rf '{host}'/worktrees/victim 2>/dev/null
git worktree prune --expire=now
git worktree list >/dev/null
echo a > a.txt"#,
        host = common.display()
    );
    env.output(["run", "attacker", "--", "sh", "-c", &attack])
        .expect_code(0);
    // The victim's worktree is still the host's and git's.
    let victim_wt = env.worktree_path("victim");
    assert!(victim_wt.join("wip.txt").exists());

    env.release("victim");
    victim.wait().expect_code(0);
    assert_host_untouched(&env, &["victim", "attacker"], &before);
    assert_eq!(
        env.subjects("main..agentbox/victim"),
        [
            "agentbox: snapshot of uncommitted work in task victim",
            "victim work"
        ]
    );
    env.assert_snapshot_holds("victim", "wip.txt", "wip\n");
    env.assert_snapshot_holds("attacker", "a.txt", "a\n");
}

#[test]
fn inside_a_task_the_repositorys_branches_are_there_to_log_diff_and_rebase_onto() {
    let env = TestEnv::new("guard-upstream");
    env.git(["checkout", "-q", "-b", "other"]);
    fs::write(env.repo.join("other.txt"), "from other\n").unwrap();
    env.git(["add", "other.txt"]);
    env.git(["commit", "-q", "-m", "other's change"]);
    env.git(["checkout", "-q", "main"]);
    let before = before(&env, &["t"]);
    let script = "set -e
echo mine > mine.txt && git add mine.txt && git commit -qm 'my change'
git log -1 --format=%s other
git diff --name-only main...HEAD
git rebase -q other
git log --format=%s main..HEAD";
    let out = env.output(["run", "t", "--", "sh", "-c", script]);
    out.expect_code(0);
    assert_eq!(
        out.stdout_lines(),
        ["other's change", "mine.txt", "my change", "other's change"],
        "{out}"
    );
    assert_eq!(
        env.subjects("main..agentbox/t"),
        ["my change", "other's change"],
        "the rebased branch is the task's"
    );
    assert_host_untouched(&env, &["t"], &before);
}

#[test]
fn a_commit_inside_shows_on_the_host_branch_while_the_task_runs() {
    let env = TestEnv::new("guard-live");
    let script = format!(
        "echo x > x.txt && git add x.txt && git commit -qm live && git rev-parse HEAD && echo ready; {}",
        wait_for_release()
    );
    let mut run = env.spawn(["run", "live", "--", "sh", "-c", &script]);
    let commit = run.next_line();
    run.wait_for_line("ready");
    let seen_at = poll_until(Duration::from_secs(10), || {
        env.rev("agentbox/live").as_deref() == Some(commit.as_str())
    });
    assert!(
        seen_at.is_some(),
        "the commit {commit} reached agentbox/live while the task ran"
    );
    eprintln!("live import took {:?}", seen_at.unwrap());
    env.release("live");
    run.wait().expect_code(0);
    assert_eq!(env.rev("agentbox/live").as_deref(), Some(commit.as_str()));
}

#[test]
fn a_task_that_rewrites_its_branch_keeps_the_old_tip_reachable() {
    let env = TestEnv::new("guard-rewrite");
    let script = format!(
        "echo one > f.txt && git add f.txt && git commit -qm first && git rev-parse HEAD && echo ready; {w}; \
         git reset -q --hard HEAD~1 && echo two > g.txt && git add g.txt && git commit -qm second && git rev-parse HEAD",
        w = wait_for_release()
    );
    let mut run = env.spawn(["run", "rw", "--", "sh", "-c", &script]);
    let first = run.next_line();
    run.wait_for_line("ready");
    poll_until(Duration::from_secs(10), || {
        env.rev("agentbox/rw").as_deref() == Some(first.as_str())
    })
    .expect("the first commit was imported");
    env.release("rw");
    let out = run.wait();
    out.expect_code(0);
    let second = out.stdout_lines()[2].clone();
    assert_eq!(env.rev("agentbox/rw").as_deref(), Some(second.as_str()));
    assert_eq!(
        env.rev("refs/agentbox/rw/previous/1").as_deref(),
        Some(first.as_str()),
        "the rewritten tip is kept"
    );
    let reflog = env.git(["reflog", "show", "--format=%H", "refs/heads/agentbox/rw"]);
    assert!(reflog.lines().any(|l| l == first), "{reflog}");
}

#[test]
fn a_tampered_task_git_dir_keeps_everything_and_says_so() {
    let env = TestEnv::new("guard-tampered");
    // The symlink comes first, so that no import (live or final) can have taken the commit.
    let script = "p=$(git rev-parse --absolute-git-dir)/objects/pack && rm -rf \"$p\" && ln -s /etc \"$p\" && \
                  echo k > k.txt && git add k.txt && git commit -qm 'kept work' && echo wip > wip.txt";
    let out = env.output(["run", "t", "--", "sh", "-c", script]);
    out.expect_code(0);
    out.expect_stderr_contains("was tampered with");
    out.expect_stderr_contains("is a symlink");
    let wt = env.worktree_path("t");
    assert!(wt.join("k.txt").is_file(), "the worktree is kept");
    let task = env.ls_task("t").unwrap();
    assert_eq!(task["state"], "kept", "{task}");
    assert!(
        task["error"]
            .as_str()
            .unwrap_or_default()
            .contains("tampered"),
        "{task}"
    );
    // The files are safe on the branch anyway; the commits stay in the kept git dir.
    env.assert_snapshot_holds("t", "wip.txt", "wip\n");
    let rm = env.output(["rm", "t"]);
    rm.expect_code(0);
    assert!(!wt.exists());
}

/// Calls `done` until it says yes or `limit` passes; returns how long it took.
fn poll_until(limit: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn commits_on_a_branch_of_the_tasks_own_are_kept_too() {
    let env = TestEnv::new("guard-side-branch");
    let script = "git switch -q -c experiment && echo e > e.txt && git add e.txt && \
                  git commit -qm 'on a side branch' && git switch -q agentbox/side";
    let out = env.output(["run", "side", "--", "sh", "-c", script]);
    out.expect_code(0);
    assert_eq!(
        env.subjects("main..refs/agentbox/side/heads/experiment"),
        ["on a side branch"],
        "{out}"
    );
    assert_eq!(
        env.rev("agentbox/side"),
        Some(env.head()),
        "the task's branch did not move"
    );
}

/// A repository the task made inside its worktree — committed as a submodule, or left untracked —
/// with a filter driver and an fsmonitor in its own config: git on the host, looking into it, would
/// start another git there that obeys that config. agentbox leaves such repositories out of the
/// snapshot (and keeps the worktree, so nothing is lost) instead of looking into them.
#[test]
fn a_repository_the_task_nests_in_its_worktree_runs_nothing_on_the_host() {
    let env = TestEnv::new("guard-nested");
    let before = before(&env, &["evil"]);
    let m = env.root.join("pwned").display().to_string();
    let script = format!(
        r#"set -e
git init -q sub && (cd sub && echo one > f && git add f && git -c user.name=t -c user.email=t@t commit -qm sub)
git add sub && git commit -qm "genuine commit with a submodule"
git init -q other
for repo in sub other; do
  printf '[core]\n\tfsmonitor = "touch {m}-fsmonitor-%s; false"\n[filter "evil"]\n\tclean = "touch {m}-filter-%s; cat"\n\tprocess = "touch {m}-process-%s"\n' "$repo" "$repo" "$repo" >> "$repo/.git/config"
  echo '* filter=evil' > "$repo/.gitattributes"
  echo changed > "$repo/f"
done
echo new > new.txt
echo ready; {}"#,
        wait_for_release()
    );
    let mut run = env.spawn(["run", "evil", "--", "sh", "-c", &script]);
    run.wait_for_line("ready");
    let diff = env.output(["diff", "evil"]);
    diff.expect_code(0);
    assert!(diff.stdout.contains("+new"), "{diff}");
    assert_eq!(
        markers(&env),
        Vec::<String>::new(),
        "diff ran nothing planted"
    );

    env.release("evil");
    let out = run.wait();
    out.expect_code(0);
    assert!(
        out.stderr
            .contains("left out of the snapshot commit: other, sub"),
        "{out}"
    );
    assert_host_untouched(&env, &["evil"], &before);
    env.assert_snapshot_holds("evil", "new.txt", "new\n");
    // The nested repositories' work is still there, in the kept worktree.
    let worktree = env.worktree_path("evil");
    assert_eq!(
        fs::read_to_string(worktree.join("sub/f")).unwrap(),
        "changed\n"
    );
    assert_eq!(
        fs::read_to_string(worktree.join("other/f")).unwrap(),
        "changed\n"
    );
    let task = env.ls_task("evil").unwrap();
    let kinds: Vec<(&str, &str)> = task["left_out"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["path"].as_str().unwrap(), l["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [("other", "nested_repository"), ("sub", "nested_repository")],
        "{task}"
    );
}

/// A task that makes the env file a tracked file (`git add -f`, without committing it) still never
/// gets it into the snapshot: its values (secrets among them) stay out of the repository.
#[test]
fn the_env_file_stays_out_of_the_snapshot_when_the_task_stages_it() {
    let env = TestEnv::new("guard-envfile-staged");
    env.write_config("[env]\nSECRETISH = \"s3cret-value\"\n");
    let script = "git add -f .env.agentbox && echo 'SECRETISH=changed' >> .env.agentbox \
                  && git status --porcelain -- .env.agentbox && echo work > work.txt";
    let out = env.output(["run", "stager", "--", "sh", "-c", script]);
    out.expect_code(0);
    assert_eq!(
        out.stdout_lines(),
        ["AM .env.agentbox"],
        "the task staged it\n{out}"
    );
    env.assert_snapshot_holds("stager", "work.txt", "work\n");
    assert_eq!(
        env.file_at("agentbox/stager", ".env.agentbox"),
        None,
        "{out}"
    );
    let everything = env.git(["log", "-p", "--all"]);
    // agentbox.toml holds `SECRETISH = "…"`; only the env file holds `SECRETISH=…` lines.
    assert!(
        !everything.contains("SECRETISH=s3cret-value"),
        "{everything}"
    );
    assert!(!everything.contains("SECRETISH=changed"), "{everything}");
    env.assert_torn_down("stager");
}

#[test]
fn a_branch_the_task_points_at_a_tree_is_refused_and_the_work_kept() {
    let env = TestEnv::new("guard-tree");
    let before = before(&env, &["t"]);
    // git refuses to point a branch at a tree; the ref file is the task's to write anyway.
    let script = "echo k > k.txt && git add k.txt && \
                  git write-tree > \"$(git rev-parse --absolute-git-dir)/refs/heads/agentbox/t\" && \
                  echo wip > wip.txt";
    let out = env.output(["run", "t", "--", "sh", "-c", script]);
    out.expect_code(0);
    out.expect_stderr_contains("was tampered with");
    out.expect_stderr_contains("points at a tree, not a commit");
    assert_eq!(env.ls_task("t").unwrap()["state"], "kept");
    assert!(env.worktree_path("t").join("wip.txt").is_file());
    assert_host_untouched(&env, &["t"], &before);
    env.output(["rm", "t"]).expect_code(0);
}
