//! Host operations as root, shared by the local provider and `podfleet host prepare`:
//! commands, accounts, processes, acting as an unprivileged user and its rootless Podman
//! API service; and [`prepare`], which makes a host a podfleet executor.

mod accounts;
mod command;
pub mod prepare;
mod process;
mod user;

pub use accounts::{Account, account, accounts, accounts_in};
pub use command::{HostError, run, run_command, run_with_input};
pub use process::{
    cmdline, find_process, kill_all_processes, mounts_below, pid_alive, processes_of,
};
pub use user::{
    USER_PATH, ensure_runtime_dir, ping_docker_api, podman_socket, run_as, runtime_dir, set_mode,
    start_podman_service, user_command,
};
