//! agentbox: a container-plus-worktree runtime. Each task gets its own git worktree on its own branch,
//! bind-mounted into its own container; a supervisor streams its output, waits for it and tears
//! everything down again while keeping every byte of the task's work on its branch.
//!
//! The library never prints and never reads the environment: the binary passes in what it needs
//! (engine address, state home) and renders the events and errors it gets back.

pub mod batch;
pub mod config;
pub mod control;
pub mod copy;
pub mod devcontainer;
pub mod docker;
pub mod doctor;
pub mod environment;
pub mod fs_guard;
pub mod git;
pub mod inspect;
pub mod land;
pub mod mcp;
pub mod output;
pub mod pool;
pub mod ports;
pub mod recovery;
pub mod runtime;
pub mod state;
pub mod supervisor;
pub mod task;
pub mod teardown;
pub mod trash;
pub mod workspace;

pub use supervisor::{RunEvent, RunOutcome, RunRequest, StopLevel};
pub use task::{TaskName, TaskRecord, TaskState};
pub use workspace::Workspace;
