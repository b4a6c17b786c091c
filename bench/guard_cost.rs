//! Benchmark: what the guarded git layout costs per task, on the host, over a plain worktree.
//!
//!   cargo run --release --example guard-cost -- [-n N] [--files F] [--branches B]
//!
//! A guarded task gets a git dir of its own (made by agentbox: config, HEAD, a copy of the
//! repository's refs, objects borrowed through alternates), and at its end its branch is imported
//! into the repository with every object checked (fsck) and its git dir removed. A plain worktree
//! (`git worktree add`) needs none of that, and both check the same files out, so the guard's cost
//! is those three steps: timed here on a throwaway repository of F files and B branches, N tasks
//! each making one commit of 20 changed files (untimed). Prints per-task times on stderr and on
//! stdout the median and mean of each step and of their sum, against `git worktree add` +
//! `git worktree remove` of the same repository (the steps the guard adds to, for scale).

// A benchmark reports on stdout.
#![allow(clippy::print_stdout)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use agentbox::task::TaskName;
use agentbox::workspace::Workspace;

fn git(dir: &Path, args: &[&str], env: &[(&str, &Path)]) {
    let status = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "bench")
        .env("GIT_AUTHOR_EMAIL", "bench@agentbox.invalid")
        .env("GIT_COMMITTER_NAME", "bench")
        .env("GIT_COMMITTER_EMAIL", "bench@agentbox.invalid")
        .status()
        .expect("run git");
    assert!(status.success(), "git {args:?} failed");
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number"))
        })
        .unwrap_or(default)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[m - 1] + v[m]) / 2.0
    } else {
        v[m]
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n = arg(&args, "-n", 15);
    let files = arg(&args, "--files", 3000);
    let branches = arg(&args, "--branches", 50);

    let tmp = tempfile::tempdir().expect("temp dir");
    let root = tmp.path().canonicalize().unwrap();
    let repo = root.join("repo");
    std::fs::create_dir_all(repo.join("src")).unwrap();
    git(&repo, &["init", "-q", "-b", "main"], &[]);
    for i in 0..files {
        let dir = repo.join("src").join(format!("d{}", i % 50));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("f{i}.txt")), format!("file {i}\n")).unwrap();
    }
    git(&repo, &["add", "-A"], &[]);
    git(&repo, &["commit", "-q", "-m", "initial"], &[]);
    for b in 0..branches {
        git(&repo, &["branch", &format!("b{b}")], &[]);
    }
    let ws = Workspace::open(&repo, &root.join("state")).expect("open the repository");
    let start = ws.repo.resolve_commit("HEAD").unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let (mut create, mut import, mut remove, mut plain) = (vec![], vec![], vec![], vec![]);
    for i in 0..=n {
        let name = TaskName::parse(&format!("t{i}")).unwrap();
        let dirs = ws.task_dirs(&name, &ws.worktree_path(&name));

        let began = Instant::now();
        dirs.create(&ws.repo, start, &[])
            .expect("create the task git dir");
        let created = began.elapsed();
        // The checkout is the same work for a plain worktree: untimed.
        runtime
            .block_on(dirs.checkout(&ws.repo, 1))
            .expect("check out");
        for f in 0..20 {
            let path = dirs
                .worktree
                .join("src")
                .join(format!("d{}", f % 50))
                .join(format!("f{f}.txt"));
            std::fs::write(path, format!("changed {i}\n")).unwrap();
        }
        let task_env = [
            ("GIT_DIR", dirs.git_dir.as_path()),
            ("GIT_WORK_TREE", dirs.worktree.as_path()),
        ];
        git(&dirs.worktree, &["commit", "-q", "-am", "work"], &task_env);

        let began = Instant::now();
        runtime
            .block_on(agentbox::git::import::import(
                &ws.repo,
                &dirs,
                name.as_str(),
            ))
            .expect("import the branch");
        let imported = began.elapsed();
        std::fs::remove_dir_all(&dirs.worktree).unwrap();
        let began = Instant::now();
        dirs.remove().expect("remove the task git dir");
        let removed = began.elapsed();

        let wt = root.join(format!("plain-{i}"));
        let wt_arg = wt.display().to_string();
        let began = Instant::now();
        git(
            &repo,
            &[
                "worktree",
                "add",
                "-q",
                "-b",
                &format!("plain/{i}"),
                &wt_arg,
                "HEAD",
            ],
            &[],
        );
        git(&repo, &["worktree", "remove", "--force", &wt_arg], &[]);
        let plain_time = began.elapsed();
        if i == 0 {
            continue; // warm-up
        }
        eprintln!(
            "guard-cost: {i:2}/{n}  create {:6.1} ms  import {:6.1} ms  remove {:6.1} ms  worktree add+remove {:6.1} ms",
            ms(created),
            ms(imported),
            ms(removed),
            ms(plain_time)
        );
        create.push(ms(created));
        import.push(ms(imported));
        remove.push(ms(removed));
        plain.push(ms(plain_time));
    }
    let total: Vec<f64> = (0..create.len())
        .map(|i| create[i] + import[i] + remove[i])
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "guard cost per task: {files} files, {branches} branches, {n} tasks of one 20-file commit, 1 warm-up"
    );
    for (step, v) in [
        ("create git dir", &create),
        ("import branch", &import),
        ("remove git dir", &remove),
        ("guard total", &total),
        ("worktree add+rm", &plain),
    ] {
        println!(
            "{step:15} median {:7.1} ms   mean {:7.1} ms",
            median(v.clone()),
            mean(v)
        );
    }
    println!(
        "ratio(guard total / git worktree add+remove, median) = {:.2}",
        median(total.clone()) / median(plain.clone())
    );
}
